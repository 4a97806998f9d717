"""Per-finding heatmaps (medvlm.explain): maps of a tiny model trained a few steps on phantom images, the CLI and
REST outputs, the examples page, the one-line error without DEM, and the phantom region measure."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file
from tiny_medvlm import REPORTS, tiny_config

from lifecycle_fakes import FakePredictor, make_model_dir
from medvlm.data.phantom import finding_regions, label_regions, render_slice
from medvlm.data.phantom_study import labels_for
from medvlm.errors import ModelError
from medvlm.explain import cam_grids, explain_images, phantom_hit_rates, region_score, top_label_grids
from medvlm.features import feature_signature, trunk_features
from medvlm.inference import Predictor
from medvlm.predict import generate_reports
from medvlm.serve import create_app

LABELS = ["pneumonia", "effusion"]
SIZE = 128  # features.image_size: 4 x 4 visual tokens
EFFUSION = dict(type="effusion", side="right", zone="lower", distribution="dependent", extent="extensive")
GGO = dict(type="ground_glass", side="left", zone="lower", distribution="peripheral", extent="extensive")
CONSOLIDATION = dict(type="consolidation", side="right", zone="lower", distribution="central", extent="patchy")


def _study(i: int) -> tuple[list[dict], str]:
    findings = [[], [EFFUSION], [GGO], [EFFUSION, GGO]][i % 4]
    report = {0: REPORTS[0], 1: REPORTS[2], 2: REPORTS[1], 3: REPORTS[2]}[i % 4]
    return findings, report


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Phantom images on disk + their real trunk features as the features stage caches them, and a tiny freeze model
    trained on them for a few steps, loaded back as a Predictor."""
    from medvlm.model.vision import build_vision
    from medvlm.train import train

    tmp = tmp_path_factory.mktemp("explain")
    cfg = tiny_config(tmp, features={"image_size": SIZE}, train={"epochs": 1},
                      generate={"num_beams": 1, "max_new_tokens": 3})  # 4 steps; short reports (not tested here)
    images_dir = tmp / "data" / "images"
    images_dir.mkdir(parents=True)
    torch.manual_seed(0)
    vision = build_vision(cfg).eval()
    for split, n in (("train", 8), ("test", 4)):
        rows, images = [], []
        for i in range(n):
            findings, report = _study(i)
            seed = [0, int(split == "test"), i, 1]
            name = f"{split}_{i}"
            pixels = render_slice("lower", findings, 256, seed)
            Image.fromarray(pixels).save(images_dir / f"{name}.png")
            images.append(Image.fromarray(pixels))
            rows.append({"study_id": name, "images": [f"images/{name}.png"], "report": report, "report_zh": None,
                         "labels": labels_for(findings, LABELS), "split": None, "group": name, "source_row": i,
                         "findings": findings, "slice_level": "lower", "render_seed": seed})
        (tmp / "split").mkdir(exist_ok=True)
        (tmp / "split" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "features").mkdir(exist_ok=True)
        save_file({"features": trunk_features(vision, images, 4).contiguous()},
                  tmp / "features" / f"{split}.safetensors", metadata={**feature_signature(cfg), "study_ids": json.dumps([r["study_id"] for r in rows])})
    train(cfg, "freeze")
    return cfg, Predictor.load(tmp / "models" / "freeze", device="cpu"), tmp


def _phantom(i: int, size: int = 256) -> Image.Image:
    findings, _ = _study(i)
    return Image.fromarray(render_slice("lower", findings, size, [0, 1, i, 1]))


def test_maps_have_the_image_size_lie_in_0_1_and_are_not_uniform(trained):
    _, predictor, _ = trained
    images = [_phantom(3), _phantom(1).resize((200, 160))]
    explanations = predictor.explain(images)
    for image, exp in zip(images, explanations):
        assert exp.label_names == LABELS and exp.maps.shape == (2, image.size[1], image.size[0])
        assert exp.maps.min() >= 0.0 and exp.maps.max() <= 1.0
        assert all(m.max() in (0.0, 1.0) for m in exp.maps)  # divided by its maximum (or no evidence at all)
        assert max(float(m.std()) for m in exp.maps) > 0.01  # not uniform
        assert set(exp.probabilities) == set(LABELS)


def test_maps_are_grad_cam_of_the_dem_logits(trained):
    """The forward path is the model's own (same logits as visual_queries), and for the DEM's linear classifier on
    mean-pooled tokens Grad-CAM is the classic CAM: ReLU(classifier weights . feature map) / tokens."""
    _, predictor, _ = trained
    model = predictor.model
    feats = trunk_features(model.vision, [_phantom(3), _phantom(0)], 2)
    grids, probs = cam_grids(model, feats)
    with torch.no_grad():
        _, logits = model.visual_queries(feats)
        tokens = model.vision.tail(feats)  # (B, T, W)
    assert torch.allclose(probs, torch.sigmoid(logits), atol=1e-5)
    side = int(tokens.shape[1] ** 0.5)
    cam = torch.relu(torch.einsum("kw,btw->bkt", model.dem.classifier.weight, tokens)) / tokens.shape[1]
    assert grids.shape == (2, 2, side, side)
    assert torch.allclose(grids, cam.reshape(2, 2, side, side), atol=1e-5)


def test_model_without_dem_fails_with_one_line(trained, tmp_path):
    from medvlm.model.medvlm import MedVLM

    cfg = tiny_config(tmp_path, model={"discrimination": False}, features={"image_size": SIZE})
    model = MedVLM(cfg, "freeze")
    with pytest.raises(ModelError) as err:
        explain_images(model, [_phantom(1)], LABELS)
    assert "discrimination" in str(err.value) and "\n" not in str(err.value)
    assert top_label_grids(model, torch.zeros(1, 192, 4, 4), LABELS) is None  # evaluate: no heatmaps, no error
    no_dem = Predictor(model, cfg, {"label_names": LABELS, "strategy": "freeze"})
    path = tmp_path / "a.png"
    _phantom(1).save(path)
    with pytest.raises(ModelError, match="no DEM"):
        generate_reports([path], str(make_model_dir(tmp_path / "m")), cfg, explain_dir=tmp_path / "maps",
                         predictor_factory=lambda d, cfg: no_dem, stdout=io.StringIO(), console=Console(file=io.StringIO()))
    assert not (tmp_path / "maps").exists()
    r = TestClient(create_app(no_dem, cfg)).post("/predict?explain=true", files={"file": ("a.png", path.read_bytes())})
    assert r.status_code == 422 and "no DEM" in r.json()["error"] and "\n" not in r.json()["error"]


def test_region_score_on_synthetic_maps():
    region = np.zeros((10, 10), bool)
    region[2:4, 5:9] = True  # 8 of 100 pixels
    inside = region.astype(float)
    assert region_score(inside, region) == {"mass_share": 1.0, "area_share": 0.08, "hit": True, "pointing": True}
    uniform = region_score(np.ones((10, 10)), region)
    assert uniform["mass_share"] == pytest.approx(0.08) and not uniform["hit"] and not uniform["pointing"]
    outside = region_score(1.0 - inside, region)
    assert outside["mass_share"] == 0.0 and not outside["hit"]
    assert region_score(np.zeros((10, 10)), region) == {"mass_share": 0.0, "area_share": 0.08, "hit": False,
                                                         "pointing": False}
    half = inside * 0.5
    half[0, 0] = 4.0  # half the mass in the region, the peak outside it
    scored = region_score(half, region)
    assert scored["mass_share"] == pytest.approx(0.5) and scored["hit"] and not scored["pointing"]
    lungs = np.zeros((10, 10), bool)
    lungs[:5] = True  # 50 pixels, the region is 8 of them
    assert region_score(np.ones((10, 10)), region, within=lungs)["area_share"] == pytest.approx(0.16)
    with pytest.raises(ValueError):
        region_score(np.ones((4, 4)), region)


def test_phantom_regions_are_where_each_finding_is_drawn():
    seed, size = [0, 0, 9, 1], 128
    alone = finding_regions("lower", [EFFUSION], size, seed)[0]
    diff = np.abs(render_slice("lower", [EFFUSION], size, seed).astype(int)
                  - render_slice("lower", [], size, seed).astype(int)) > 8
    assert alone.any() and np.array_equal(alone, diff)
    findings = [EFFUSION, GGO, CONSOLIDATION]
    masks = finding_regions("lower", findings, size, seed)
    assert np.array_equal(masks[0], alone)  # drawn first: the later findings do not move it
    assert all(m.any() for m in masks) and not (masks[1] & masks[2]).sum() > 0.5 * masks[2].sum()
    regions = label_regions("lower", findings, size, seed, ["pneumonia", "effusion", "nodule"])
    assert set(regions) == {"pneumonia", "effusion"}  # only the labels the study has
    assert np.array_equal(regions["pneumonia"], masks[1] | masks[2])


def test_generate_explain_writes_one_overlay_per_label(trained, tmp_path):
    cfg, predictor, tmp = trained
    model_dir = str(tmp / "models" / "freeze")
    paths = []
    for i, name in enumerate(["a.png", "b.png"]):
        _phantom(i + 2).save(tmp_path / name)
        paths.append(tmp_path / name)
    out = io.StringIO()
    code = generate_reports(paths, model_dir, cfg, "json", explain_dir=tmp_path / "maps", stdout=out,
                            predictor_factory=lambda d, cfg: predictor, console=Console(file=io.StringIO()))
    assert code == 0
    results = json.loads(out.getvalue())
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert written == sorted(f"{s}_{lab}.png" for s in "ab" for lab in LABELS)
    assert results[0]["heatmaps"] == {lab: str(tmp_path / "maps" / f"a_{lab}.png") for lab in LABELS}
    img = Image.open(tmp_path / "maps" / "a_effusion.png")
    assert img.mode == "RGB" and img.size == (256, 256)
    text = io.StringIO()
    generate_reports(paths[:1], model_dir, cfg, "text", explain_dir=tmp_path / "maps", stdout=text,
                     predictor_factory=lambda d, cfg: predictor, console=Console(file=io.StringIO()))
    assert f"heatmaps: {tmp_path / 'maps' / 'a_pneumonia.png'}" in text.getvalue()


def test_rest_explain_returns_base64_overlays(trained, tmp_path):
    cfg, predictor, _ = trained
    client = TestClient(create_app(predictor, cfg))
    buf = io.BytesIO()
    _phantom(1).resize((96, 80)).save(buf, format="PNG")
    data = buf.getvalue()
    plain = client.post("/predict", json={"image": base64.b64encode(data).decode()})
    assert plain.status_code == 200 and "heatmaps" not in plain.json()
    for kwargs, url in [({"json": {"image": base64.b64encode(data).decode(), "explain": True}}, "/predict"),
                        ({"files": {"file": ("a.png", data)}, "data": {"explain": "true"}}, "/predict"),
                        ({"files": {"file": ("a.png", data)}}, "/predict?explain=1")]:
        r = client.post(url, **kwargs)
        assert r.status_code == 200, r.text
        maps = r.json()["heatmaps"]
        assert set(maps) == set(LABELS)
        img = Image.open(io.BytesIO(base64.b64decode(maps["effusion"])))
        assert img.format == "PNG" and img.size == (96, 80)
    bad = client.post("/predict?explain=maybe", files={"file": ("a.png", data)})
    assert bad.status_code == 422 and "explain must be true or false" in bad.json()["error"]
    fake = TestClient(create_app(FakePredictor.load(make_model_dir(tmp_path / "fake")), cfg))
    r = fake.post("/predict?explain=true", files={"file": ("a.png", data)})
    assert r.status_code == 422 and "cannot produce heatmaps" in r.json()["error"]


def test_pyfunc_explain_param_returns_base64_overlays(trained, tmp_path):
    """The MLflow model: params={"explain": True} adds a heatmaps column, {label: base64 PNG} per row, the same
    overlays as the REST server; a model without DEM stops with one line."""
    import mlflow.pyfunc
    import pandas as pd

    from medvlm.explain import encoded_overlays
    from medvlm.model.medvlm import MedVLM
    from medvlm.pyfunc_model import ARTIFACT_KEY, MedVLMPyfunc, model_signature

    cfg, predictor, tmp = trained
    saved = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(saved), python_model=MedVLMPyfunc(LABELS),
                             artifacts={ARTIFACT_KEY: str(tmp / "models" / "freeze")},
                             signature=model_signature(LABELS), pip_requirements=[])
    model = mlflow.pyfunc.load_model(str(saved))
    buf = io.BytesIO()
    _phantom(1).resize((96, 80)).save(buf, format="PNG")
    frame = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]})
    assert "heatmaps" not in model.predict(frame).columns
    out = model.predict(frame, params={"explain": True})
    maps = out.loc[0, "heatmaps"]
    assert set(maps) == set(LABELS) and out.loc[0, "report"]
    img = Image.open(io.BytesIO(base64.b64decode(maps["effusion"])))
    assert img.format == "PNG" and img.size == (96, 80)
    image = Image.open(io.BytesIO(buf.getvalue()))
    assert maps == encoded_overlays(image, predictor.explain([image])[0])  # what REST returns for this image

    no_dem_cfg = tiny_config(tmp_path, model={"discrimination": False}, features={"image_size": SIZE})
    no_dem = MedVLMPyfunc(LABELS)
    no_dem._predictor = Predictor(MedVLM(no_dem_cfg, "freeze"), no_dem_cfg, {"label_names": LABELS, "strategy": "freeze"})
    with pytest.raises(ModelError, match="no DEM") as err:
        no_dem.predict(None, frame, params={"explain": True})
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="must be true or false"):
        no_dem.predict(None, frame, params={"explain": "maybe"})


def test_phantom_hit_rates_report_per_label_and_skip_images_they_cannot_redraw(trained):
    cfg, predictor, tmp = trained
    rows = [json.loads(line) for line in (tmp / "split" / "test.jsonl").read_text().splitlines()]
    split_rows = [{k: v for k, v in r.items() if k not in ("findings", "render_seed", "slice_level")} for r in rows]
    (tmp / "data" / "annotation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "split_only.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    tampered = tmp / "data" / "images" / "test_3.png"
    original = tampered.read_bytes()
    Image.fromarray(255 - np.asarray(Image.open(tampered))).save(tampered)
    try:
        summary = phantom_hit_rates(predictor, tmp / "split_only.jsonl", tmp / "data")  # completed by study id
    finally:
        tampered.write_bytes(original)
    assert summary["images"] == 2 and summary["skipped"]["not_reproduced"] == 1  # test_0 has no findings
    effusion = summary["per_label"]["effusion"]
    assert effusion["n"] == 1 and 0.0 <= effusion["mean_mass_share"] <= 1.0
    assert set(summary["per_label"]) == {"pneumonia", "effusion"}
    assert summary["per_label"]["pneumonia"]["n"] == 1 and "control_hit_rate" not in effusion  # one case: no control


def test_examples_page_draws_the_most_probable_finding(trained):
    from medvlm.features import load_features
    from medvlm.report import _examples

    from medvlm.evaluate import produce

    cfg, predictor, tmp = trained
    gens, _ = produce(cfg, "freeze")  # the evaluate stage's generations carry the heatmaps
    _, ids = load_features(cfg, "test")
    heat = [g["heatmap"] for g in gens]
    assert len(heat) == 4 and all(h["label"] in LABELS and np.asarray(h["grid"]).shape == (4, 4) for h in heat)
    assert all(max(map(max, h["grid"])) in (0.0, 1.0) for h in heat)
    assert all(set(h) == {"label", "probability", "grid"} for h in heat)  # 2-D entries name no slice
    out = tmp / "reports"
    (out / "generations").mkdir(parents=True)
    rows = [{"study_id": sid, "references": ["r"], "generated": "g", "probabilities": {}, "heatmap": h}
            for sid, h in zip(ids, heat)]
    (out / "generations" / "freeze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = _examples(cfg, out, ["freeze"]).read_text()
    assert page.count("data:image/jpeg;base64,") == 4 and f"heatmap: {heat[0]['label']}" in page
    assert "slice z=" not in page
