"""REST serving: round trips (TestClient and one real uvicorn on 127.0.0.1) and bad payloads -> 4xx, never 500."""

from __future__ import annotations

import base64
import pickle
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from lifecycle_fakes import FakePredictor, make_model_dir, write_png
from medvlm.config import config_from_dict
from medvlm.serve import create_app
from test_predict import write_dicom

MAX_BYTES = 4096


@pytest.fixture
def client(tmp_path):
    cfg = config_from_dict({"data": {"label_names": ["pneumonia", "nodule"], "primary_label": "pneumonia"},
                            "serve": {"max_bytes": MAX_BYTES}})
    predictor = FakePredictor.load(make_model_dir(tmp_path / "m", bias=0.0))
    return TestClient(create_app(predictor, cfg, {"model": "fake"})), tmp_path


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_health_and_round_trips(client):
    c, tmp = client
    assert c.get("/health").json() == {"status": "ok", "labels": ["pneumonia", "nodule"], "model": "fake"}
    bright = write_png(tmp / "bright.png", value=230, size=24)
    r = c.post("/predict", json={"image": b64(bright)})
    assert r.status_code == 200 and "consolidation" in r.json()["report"]
    assert r.json()["probabilities"]["nodule"] > 0.8
    dark = write_png(tmp / "dark.png", value=20, size=24)
    r = c.post("/predict", files={"file": ("dark.png", dark.read_bytes(), "image/png")})
    assert r.status_code == 200 and "no acute" in r.json()["report"]
    dcm = write_dicom(tmp / "ct.dcm", size=16)
    r = c.post("/predict", files={"image": ("ct.dcm", dcm.read_bytes(), "application/dicom")})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        ({"json": {"img": "abc"}}, 422, "missing field 'image'"),
        ({"json": {"image": 3}}, 422, "base64 string"),
        ({"json": ["image"]}, 422, "missing field"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {"image": "***not base64***"}}, 400, "not valid base64"),
        ({"json": {"image": ""}}, 422, "empty"),
        ({"json": {"image": base64.b64encode(b"hello, not an image").decode()}}, 415, "not a readable image"),
        ({"json": {"image": base64.b64encode(pickle.dumps({"x": 1})).decode()}}, 415, "not a readable image"),
        ({"content": b"raw bytes", "headers": {"content-type": "image/png"}}, 415, "content type"),
        ({"content": b"raw"}, 415, "content type"),
        ({"files": {"other": ("a.txt", b"abc", "text/plain")}}, 422, "missing file field"),
        ({"files": {"file": ("a.txt", b"plain text", "text/plain")}}, 415, "not a readable image"),
        ({"json": {"image": base64.b64encode(b"\0" * (MAX_BYTES + 1)).decode()}}, 413, "exceeds"),
        ({"files": {"file": ("big.png", b"\0" * (MAX_BYTES * 3), "image/png")}}, 413, "exceeds"),
        ({"content": b"x" * 200_000, "headers": {"content-type": "application/json"}}, 413, "exceeds"),
    ],
)
def test_bad_payloads_are_4xx_with_a_message(client, kwargs, status, words):
    c, _ = client
    r = c.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"] and "\n" not in r.json()["error"]


def test_real_uvicorn_round_trip(client):
    import uvicorn

    c, tmp = client
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(c.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health", timeout=5).json()["status"] == "ok"
        image = write_png(tmp / "x.png", value=200, size=24)
        r = httpx.post(url + "/predict", json={"image": b64(image)}, timeout=10)
        assert r.status_code == 200 and r.json()["report"]
        r = httpx.post(url + "/predict", content=b"x" * 300_000, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 413
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()
