"""Drift monitor: an unshifted batch shows no drift, a shifted one does; bad and empty batches are handled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lifecycle_fakes import FakePredictor
from medvlm.config import config_from_dict
from medvlm.errors import DataError
from medvlm.monitor import pixel_embedding, run_monitor, text_columns

LABELS = ["pneumonia", "nodule"]
WORDS_NORMAL = ["lungs are clear", "no focal consolidation", "heart size normal", "no pleural effusion"]
WORDS_SICK = ["patchy consolidation in the right lower lobe", "ground glass opacity bilateral", "small nodule"]
WORDS_NEW = ["extensive honeycombing with traction bronchiectasis", "pneumothorax apex collapsed segment"]


def write_study(root: Path, name: str, rng, sick: bool, shift: float, noise: float, vocab_new: bool) -> dict:
    base = (180 if sick else 60) + shift
    pixels = np.clip(rng.normal(base, 12 * noise, (40, 40)), 0, 255).astype(np.uint8)
    path = root / "images" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)
    pool = WORDS_NEW if vocab_new else (WORDS_SICK if sick else WORDS_NORMAL)
    report = ". ".join(rng.choice(pool, size=2)) + "."
    return {"study_id": name, "image": f"images/{name}.png", "images": [f"images/{name}.png"], "report": report,
            "labels": {"pneumonia": int(sick), "nodule": 0}, "group": name, "source_row": 0}


def write_batch(root: Path, n: int, seed: int, prevalence: float, shift=0.0, noise=1.0, vocab_new=False) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [write_study(root, f"s{seed}_{i}", rng, i < prevalence * n, shift, noise, vocab_new) for i in range(n)]
    with (root / "annotation.jsonl").open("w") as fh:
        for i, r in enumerate(rows):
            fh.write(json.dumps({**r, "source_row": i}) + "\n")
    return rows


@pytest.fixture
def env(tmp_path):
    data_root = tmp_path / "phantom"
    rows = write_batch(data_root, 60, seed=1, prevalence=0.5)
    split = tmp_path / "split"
    split.mkdir()
    with (split / "train.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps({k: v for k, v in r.items() if k != "image"}) + "\n")
    cfg = config_from_dict(
        {
            "data": {"label_names": LABELS, "primary_label": "pneumonia", "root": str(data_root)},
            "split": {"out_dir": str(split)},
            "register": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"},
            "monitor": {"out_dir": str(tmp_path / "drift"), "incoming_dir": str(tmp_path / "incoming"),
                        "pca_components": 3},
        }
    )
    return cfg, tmp_path


def monitor(cfg, incoming):
    return run_monitor(cfg, incoming, embed_fn=lambda ims: pixel_embedding(ims, 8),
                       predictor=FakePredictor(0.0, LABELS))


def test_unshifted_batch_shows_no_drift(env):
    cfg, tmp = env
    write_batch(tmp / "same", 30, seed=2, prevalence=0.5)
    summary = monitor(cfg, tmp / "same")
    assert summary["drift_detected"] is False, summary["features"]
    assert summary["drifted_share"] < cfg.monitor.drift_share
    assert {"intensity_mean", "entropy", "embed_pc1", "report_oov_rate", "diagnosis", "label_pneumonia"} <= set(
        summary["features"])
    assert summary["n_reference"] == 60 and summary["n_current"] == 30 and summary["skipped"] == {}
    out = Path(cfg.monitor.out_dir)
    assert (out / "drift.html").stat().st_size > 1000 and json.loads((out / "summary.json").read_text()) == summary
    assert "metrics" in json.loads((out / "drift.json").read_text())


def test_shifted_batch_drifts_and_broken_files_are_quarantined(env):
    cfg, tmp = env
    batch = tmp / "shifted"
    write_batch(batch, 30, seed=3, prevalence=0.9, shift=40, noise=3.0, vocab_new=True)
    (batch / "images" / "s3_0.png").write_bytes(b"broken")  # one unreadable file in the batch
    summary = monitor(cfg, batch)
    assert summary["drift_detected"] is True
    feats = summary["features"]
    assert feats["intensity_std"]["drifted"] and feats["report_oov_rate"]["drifted"] and feats["diagnosis"]["drifted"]
    assert summary["n_quarantined"] == 1 and summary["n_current"] == 29


def test_images_only_batch_and_empty_folder(env):
    cfg, tmp = env
    batch = tmp / "bare"
    write_batch(batch, 20, seed=4, prevalence=0.5)
    (batch / "annotation.jsonl").unlink()
    summary = run_monitor(cfg, batch, embed_fn=lambda ims: pixel_embedding(ims, 8), predictor=None)
    assert "report_text" in summary["skipped"] and "batch_labels" in summary["skipped"]
    assert "diagnosis" in summary["skipped"]  # no champion registered in this temporary store
    (tmp / "empty").mkdir()
    with pytest.raises(DataError, match="empty") as err:
        run_monitor(cfg, tmp / "empty")
    assert "\n" not in str(err.value)


def test_oov_rate_is_leave_one_out():
    ref, cur = text_columns(["a b c", "a b", "a b d"], ["a b z z"])
    assert list(ref["report_oov_rate"].round(3)) == [round(1 / 3, 3), 0.0, round(1 / 3, 3)]
    assert cur.loc[0, "report_oov_rate"] == 0.5 and cur.loc[0, "report_words"] == 4
