"""The report labeler reads the phantom's reference reports correctly (>= 95 %) and fails clearly on bad input."""

import json

import numpy as np
import pytest

from medvlm.config import config_from_dict
from medvlm.data.phantom_report import write_report
from medvlm.data.phantom_study import LABELS, labels_for, sample_study
from medvlm.errors import DataError, ModelError
from medvlm.labeler import Labeler, train_labeler


def phantom_rows(n: int, stream: int, names: list[str]) -> list[dict]:
    """Reference reports + labels exactly as the phantom generator writes them (no images needed here)."""
    rows = []
    for i in range(n):
        _, findings = sample_study(np.random.default_rng([0, stream, i, 0]), i % 3 == 0)
        rows.append({"study_id": f"p{stream}_{i}", "report": write_report(findings, np.random.default_rng([0, stream, i, 2])),
                     "labels": labels_for(findings, names), "source_row": i})
    return rows


def write_split(folder, train, test):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in [("train", train), ("test", test)]:
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    names = list(LABELS)
    root = tmp_path_factory.mktemp("labeler")
    write_split(root / "split", phantom_rows(200, 0, names), phantom_rows(60, 1, names))
    cfg = config_from_dict({"data": {"label_names": names}, "split": {"out_dir": str(root / "split")},
                            "labeler": {"out_dir": str(root / "labeler")}})
    return cfg, train_labeler(cfg), root


def test_labeler_reads_phantom_references(trained):
    cfg, summary, root = trained
    quality = summary["test_reference"]
    assert quality["accuracy"] >= 0.95 and quality["primary_accuracy"] >= 0.95
    assert quality["n"] == 60
    assert json.loads((root / "labeler" / "metrics.json").read_text())["test_reference"] == quality


def test_loaded_labeler_predicts_the_same(trained):
    cfg, summary, root = trained
    labeler = Labeler.load(root / "labeler")
    texts = [r["report"] for r in phantom_rows(5, 2, list(LABELS))]
    proba = labeler.predict_proba(texts)
    assert proba.shape == (5, len(LABELS)) and np.all((proba >= 0) & (proba <= 1))
    assert labeler.predict_proba([]).shape == (0, len(LABELS))
    assert Labeler.recorded_quality(root / "labeler") == summary["test_reference"]


def test_missing_labeler_and_bad_labels(tmp_path):
    with pytest.raises(ModelError, match="no trained labeler"):
        Labeler.load(tmp_path)
    write_split(tmp_path / "split", [{"report": "x", "labels": {"pneumonia": 1}, "source_row": 7}], [])
    cfg = config_from_dict({"data": {"label_names": ["pneumonia", "nodule"]}, "split": {"out_dir": str(tmp_path / "split")}})
    with pytest.raises(DataError, match="row 7"):
        train_labeler(cfg)


def test_finetune_mode_trains_the_encoder_and_loads_like_frozen(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    from medvlm.labeler import base_model_path

    names = list(LABELS)
    write_split(tmp_path / "split", phantom_rows(12, 0, names), phantom_rows(6, 1, names))
    cfg = config_from_dict({"data": {"label_names": names}, "split": {"out_dir": str(tmp_path / "split")},
                            "labeler": {"out_dir": str(tmp_path / "labeler"), "mode": "finetune", "max_length": 64,
                                        "finetune_batch_size": 4, "finetune_max_steps": 2, "finetune_lr": 1e-4}})
    summary = train_labeler(cfg)
    assert summary["mode"] == "finetune" and summary["finetune"]["steps"] == 2
    assert summary["finetune"]["device"] == "cpu" and summary["finetune"]["seconds_per_step"] > 0
    assert set(summary["test_reference"]) >= {"accuracy", "micro_f1", "macro_f1", "per_label_f1"}
    assert summary["test_reference"]["n"] == 6
    # the encoder really moved away from the packaged weights
    tuned = load_file(tmp_path / "labeler" / "encoder" / "model.safetensors")
    base = AutoModel.from_pretrained(base_model_path()).state_dict()
    key = next(k for k in tuned if "layer.5.attention" in k and k.endswith("weight"))
    assert not torch.equal(tuned[key], base[key])
    labeler = Labeler.load(tmp_path / "labeler")  # the same class evaluation uses, whatever mode trained it
    texts = [r["report"] for r in phantom_rows(3, 2, names)]
    proba = labeler.predict_proba(texts)
    assert proba.shape == (3, len(names)) and np.all((proba > 0) & (proba < 1))
    assert Labeler.recorded_quality(tmp_path / "labeler") == summary["test_reference"]
    import shutil

    shutil.rmtree(tmp_path / "labeler" / "encoder")
    with pytest.raises(ModelError, match="fine-tuned labeler encoder missing"):
        Labeler.load(tmp_path / "labeler")


def test_ngram_head_is_averaged_in_and_saved(trained, tmp_path):
    """params.yaml's labeler.ngram_max > 0: a TF-IDF n-gram head is saved next to the embedding heads and its
    probability averaged with theirs; ngram_max 0 trains and loads the embedding heads alone."""
    cfg, _, root = trained
    assert cfg.labeler.ngram_max == 2
    labeler = Labeler.load(root / "labeler")
    assert labeler.ngram is not None and (root / "labeler" / "ngram.json").is_file()
    texts = [r["report"] for r in phantom_rows(4, 3, list(LABELS))]
    embedded = 1 / (1 + np.exp(-(labeler.encoder.encode(texts) @ labeler.coef.T + labeler.intercept)))
    np.testing.assert_allclose(labeler.predict_proba(texts), (embedded + labeler.ngram.predict_proba(texts)) / 2)
    off = config_from_dict({"data": {"label_names": list(LABELS)}, "split": {"out_dir": str(root / "split")},
                            "labeler": {"out_dir": str(tmp_path / "off"), "ngram_max": 0}})
    train_labeler(off)
    plain = Labeler.load(tmp_path / "off")
    assert plain.ngram is None and not (tmp_path / "off" / "ngram.json").exists()
    np.testing.assert_allclose(plain.predict_proba(texts), embedded)
    (root / "labeler" / "ngram.json").rename(tmp_path / "moved.json")
    try:
        with pytest.raises(ModelError, match="n-gram head is missing"):
            Labeler.load(root / "labeler")
    finally:
        (tmp_path / "moved.json").rename(root / "labeler" / "ngram.json")
