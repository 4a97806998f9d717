"""The report labeler reads the phantom's reference reports correctly (>= 95 %) and fails clearly on bad input."""

import json

import numpy as np
import pytest

from medvlm.config import config_from_dict
from medvlm.data.phantom import LABELS, labels_for, sample_study
from medvlm.data.phantom_report import write_report
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
