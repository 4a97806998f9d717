"""fetch_dataset against a local HTTP server serving a tiny COV-CTR: checksums, errors, resume, layout."""

import functools
import hashlib
import http.server
import json
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from medvlm.data.fetch import download, fetch_dataset
from medvlm.errors import DataError

CSV = (
    "image_id,findings,terminologies,COVID,impression,reports_En\n"
    '1-p2-3%0.png,右肺磨玻璃影。,磨玻璃影,1,病毒性肺炎,"Ground glass opacity in the right lung.\n"\n'
    '7.jpg,双肺未见异常。,,0,未见异常,"Both lungs are clear.\n"\n'
    '99.png,左肺结节。,结节,0,结节,"Nodule in the left lung.\n"\n'
)


def _image_bytes(tmp_path, name, fmt, seed):
    path = tmp_path / name
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).save(path, format=fmt)
    return path.read_bytes()


@pytest.fixture()
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (threaded); yields (base_url, www dir, sha256 of the files)."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "reports_ZH_EN.csv").write_text(CSV, encoding="utf-8")
    covid_png = _image_bytes(tmp_path, "c.png", "PNG", 1)
    noncovid_jpg = _image_bytes(tmp_path, "n.jpg", "JPEG", 2)
    with zipfile.ZipFile(www / "CT_COVID.zip", "w") as zf:
        zf.writestr("CT_COVID/1-p2-3%0.png", covid_png)
        zf.writestr("CT_COVID/unreported.png", covid_png)
        zf.writestr("__MACOSX/CT_COVID/._1-p2-3%0.png", b"junk")
    with zipfile.ZipFile(www / "CT_NonCOVID.zip", "w") as zf:
        zf.writestr("CT_NonCOVID/7.jpg", noncovid_jpg)  # 99.png is in neither zip
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in www.iterdir()}
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, sums, {"1-p2-3%0.png": covid_png, "7.jpg": noncovid_jpg}
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_fetch_cov_ctr_builds_the_layout(server, tmp_path):
    base, www, sums, images = server
    dest = tmp_path / "cov_ctr"
    messages = []
    sources = {"reports_ZH_EN.csv": {"sha256": sums["reports_ZH_EN.csv"]}}
    assert fetch_dataset("cov-ctr", dest, sources, base_url=base, echo=messages.append) == dest
    rows = [json.loads(line) for line in (dest / "annotation.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["image_id"] for r in rows] == ["1-p2-3%0.png", "7.jpg", "99.png"]
    assert [r["label"] for r in rows] == [1, 0, 0]  # folder labels; 99.png falls back to the COVID column
    assert rows[0]["report"] == "Ground glass opacity in the right lung."  # trailing newline stripped
    assert rows[0]["report_zh"] == "右肺磨玻璃影。" and rows[2]["source_row"] == 2
    assert set(rows[0]) == {"image_id", "image", "label", "report", "report_zh", "source_row"}
    for name, data in images.items():
        assert (dest / "images" / name).read_bytes() == data  # original bytes
    assert sorted(p.name for p in (dest / "images").iterdir()) == ["1-p2-3%0.png", "7.jpg"]
    record = json.loads((dest / "fetch.json").read_text())
    assert record["missing_images"] == ["99.png"] and record["files"]["CT_COVID.zip"]["sha256"] == sums["CT_COVID.zip"]
    # zips have no published checksum: the computed one is printed so it can be pinned
    assert any(sums["CT_NonCOVID.zip"] in m and "no published checksum" in m for m in messages)

    messages.clear()
    fetch_dataset("cov_ctr", dest, sources, base_url=base, echo=messages.append)  # second run: nothing downloaded
    assert sum("already present" in m for m in messages) == 3


def test_checksum_mismatch_names_file_expected_and_got(server, tmp_path):
    base, www, sums, _ = server
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        download(f"{base}/CT_COVID.zip", tmp_path / "CT_COVID.zip", wrong, echo=lambda m: None)
    message = str(err.value)
    assert "CT_COVID.zip: sha256 mismatch" in message and wrong in message and sums["CT_COVID.zip"] in message
    assert not (tmp_path / "CT_COVID.zip").exists() and not (tmp_path / "CT_COVID.zip.part").exists()


def test_http_error_and_unknown_dataset(server, tmp_path):
    base, _, _, _ = server
    with pytest.raises(DataError, match="HTTP 404") as err:
        download(f"{base}/nothing.zip", tmp_path / "nothing.zip", None, echo=lambda m: None)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="unknown data set"):
        fetch_dataset("mimic-cxr", tmp_path)
    with pytest.raises(DataError, match="download failed"):
        download("http://127.0.0.1:9/x", tmp_path / "x", None, timeout=2, echo=lambda m: None)


def test_stale_part_file_does_not_corrupt_the_download(server, tmp_path):
    base, www, sums, _ = server
    target = tmp_path / "CT_COVID.zip"
    (tmp_path / "CT_COVID.zip.part").write_bytes(b"stale half download")  # this server ignores Range
    got = download(f"{base}/CT_COVID.zip", target, sums["CT_COVID.zip"], echo=lambda m: None)
    assert got == sums["CT_COVID.zip"] and target.read_bytes() == (www / "CT_COVID.zip").read_bytes()


class _RangeHandler(_QuietHandler):
    """Answers `Range: bytes=N-` with 206 and the tail, as GitHub's servers do."""

    def do_GET(self):
        spec = self.headers.get("Range")
        if not spec:
            return super().do_GET()
        self.server.ranges.append(spec)
        data = (self.server.www / self.path.lstrip("/")).read_bytes()
        start = int(spec.split("=")[1].rstrip("-"))
        self.send_response(206)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


def test_interrupted_download_resumes_with_range(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    payload = bytes(range(256)) * 400
    (www / "big.zip").write_bytes(payload)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(www)))
    httpd.www, httpd.ranges = www, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        target = tmp_path / "big.zip"
        (tmp_path / "big.zip.part").write_bytes(payload[:30_000])  # what an interrupted run left
        digest = hashlib.sha256(payload).hexdigest()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/big.zip"
        assert download(url, target, digest, echo=lambda m: None) == digest
        assert target.read_bytes() == payload and httpd.ranges == ["bytes=30000-"]
    finally:
        httpd.shutdown()
        httpd.server_close()
