"""docs/screenshots.py without a browser: which pages it takes for a run's outputs, the one-line error naming a
missing input, and the PNG size budget. The browser part runs in `make screenshots` only."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("screenshots", REPO / "docs" / "screenshots.py")
screenshots = importlib.util.module_from_spec(spec)
sys.modules["screenshots"] = screenshots
spec.loader.exec_module(screenshots)


def _finished_run(root: Path) -> Path:
    for rel in ("reports/examples.html", "reports/drift/drift.html", "reports/drift/other.html",
                "reports/validation/docs/index.html", "flows/serve.py", "dvc.lock",
                "reports/validation/docs/validations/manifest_cross_rows/__none__/20261202T1/a.html",
                "reports/validation/docs/validations/manifest_rows/__none__/20261202T1/b.html"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / "mlruns.db").write_bytes(b"")
    (root / "reports" / "registry.json").write_text(json.dumps(
        {"model_name": "medvlm", "registered": {"run_id": "abc123", "version": "1"}}))
    return root


def test_every_page_of_a_finished_run(tmp_path):
    root = _finished_run(tmp_path)
    p = screenshots.plan(root)
    assert [s.name for s in p.shots] == list(screenshots.NAMES)
    by_name = {s.name: s for s in p.shots}
    assert by_name["examples"].target == (root / "reports" / "examples.html").resolve().as_uri()
    assert by_name["drift"].target.endswith("/reports/drift/drift.html")  # drift.html first, not other.html
    assert by_name["data-docs"].target.endswith("/reports/validation/docs/index.html")
    assert by_name["data-docs-validation"].target.endswith("/manifest_rows/__none__/20261202T1/b.html")
    assert by_name["mlflow-model"].target == "#/models/medvlm"
    assert by_name["mlflow-run"].target.format(experiment_id="3", run_id=p.run_id) == "#/experiments/3/runs/abc123"
    assert by_name["prefect-flow-run"].target.format(flow_run_id="f1") == "/runs/flow-run/f1"
    assert p.tracking_db == root / "mlruns.db" and p.model_name == "medvlm"
    assert {s.kind for s in p.shots} == {"file", "mlflow", "prefect"}


def test_only_some_pages_need_only_their_inputs(tmp_path):
    (tmp_path / "reports" / "validation" / "docs").mkdir(parents=True)
    (tmp_path / "reports" / "validation" / "docs" / "index.html").write_text("x")
    p = screenshots.plan(tmp_path, ["data-docs"])
    assert [s.name for s in p.shots] == ["data-docs"] and p.tracking_db is None


@pytest.mark.parametrize("missing, only", [
    ("reports/examples.html", None),
    ("mlruns.db", ["mlflow-model"]),
    ("reports/registry.json", ["mlflow-run"]),
    ("flows/serve.py", ["prefect-deployment"]),
    ("reports/validation/docs/index.html", ["data-docs"]),
])
def test_a_missing_input_is_one_line_naming_it(tmp_path, missing, only):
    root = _finished_run(tmp_path)
    (root / missing).unlink()
    with pytest.raises(screenshots.ScreenshotError) as err:
        screenshots.plan(root, only)
    message = str(err.value)
    assert message.startswith(str(root / missing)) and "missing" in message and "\n" not in message


def test_no_drift_report_and_bad_registry_and_unknown_names(tmp_path):
    root = _finished_run(tmp_path)
    for page in (root / "reports" / "drift").glob("*.html"):
        page.unlink()
    with pytest.raises(screenshots.ScreenshotError, match=r"drift: no drift report"):
        screenshots.plan(root, ["drift"])
    (root / "reports" / "registry.json").write_text("{}")
    with pytest.raises(screenshots.ScreenshotError, match=r"registry\.json: no model_name"):
        screenshots.plan(root, ["mlflow-run"])
    with pytest.raises(screenshots.ScreenshotError, match=r"unknown screenshot\(s\) nope"):
        screenshots.plan(root, ["nope"])


def test_missing_chromium_is_named_before_any_server_starts(tmp_path):
    root = _finished_run(tmp_path)
    with pytest.raises(screenshots.ScreenshotError, match=r"nowhere/chromium: no Chromium there"):
        screenshots.run(root, tmp_path / "out", None, str(tmp_path / "nowhere" / "chromium"), 250, 1, 1)
    assert not (tmp_path / "out").exists()


def test_png_over_budget_becomes_a_palette_image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noisy.png"
    Image.fromarray(rng.integers(0, 256, (400, 640, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size > 250 * 1024
    size = screenshots.optimize_png(path, max_kb=250)
    with Image.open(path) as image:
        assert image.mode == "P" and image.size == (640, 400)
    assert size == path.stat().st_size
    flat = tmp_path / "flat.png"
    Image.new("RGB", (640, 400), (250, 250, 250)).save(flat)
    screenshots.optimize_png(flat, max_kb=250)
    with Image.open(flat) as image:
        assert image.mode == "RGB"  # small already: full colour kept
