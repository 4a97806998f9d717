"""Baselines produce generations in the model format from the phantom data, and score through evaluate."""

import json

import numpy as np
import pytest

from medvlm.baselines import consensus_report, generate_baseline
from medvlm.config import config_from_dict
from medvlm.errors import EvaluationError

NAMES = ["pneumonia", "ground_glass", "consolidation", "crazy_paving", "nodule", "effusion", "fibrosis"]


@pytest.fixture(scope="module")
def phantom_cfg(tmp_path_factory):
    from medvlm.data.synthesize import synthesize

    root = tmp_path_factory.mktemp("baselines")
    cfg = config_from_dict({
        "data": {"root": str(root / "phantom"), "label_names": NAMES},
        "synthesize": {"out_dir": str(root / "phantom"), "incoming_dir": str(root / "incoming"), "n_images": 40,
                       "n_incoming": 0, "image_size": 64},
        "split": {"out_dir": str(root / "split")},
        "features": {"out_dir": str(root / "features"), "image_size": 64},
        "labeler": {"out_dir": str(root / "no_labeler")},
        "evaluate": {"out_dir": str(root / "reports"), "bootstrap_iterations": 50,
                     "cnn_transformer": {"image_size": 32, "d_model": 32, "layers": 1, "heads": 2, "epochs": 2,
                                         "max_tokens": 40}},
        "register": {"tracking_uri": "none"},
    })
    synthesize(cfg)
    rows = [json.loads(line) for line in (root / "phantom" / "annotation.jsonl").read_text().splitlines()]
    (root / "split").mkdir()
    keep = ["study_id", "images", "report", "labels", "source_row"]
    for name, part in [("test", rows[:10]), ("train", rows[10:])]:
        (root / "split" / f"{name}.jsonl").write_text("".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in part))
    return cfg


def _check_format(rows, n=10):
    assert len(rows) == n and all(isinstance(r["generated"], str) and r["generated"].strip() for r in rows)
    assert [r["study_id"] for r in rows] == [f"phantom_{i:05d}" for i in range(n)]


def test_consensus_is_one_fixed_central_report():
    reports = ["normal lungs .", "normal lungs no effusion .", "normal lungs no effusion heart normal .", "nodule ."]
    index, text = consensus_report(reports, "r2gen")
    assert text == reports[index] and index in (1, 2)


def test_consensus_and_oracle(phantom_cfg):
    rows, facts = generate_baseline(phantom_cfg, "consensus")
    _check_format(rows)
    assert len({r["generated"] for r in rows}) == 1 and facts["baseline"] == "consensus"
    oracle, _ = generate_baseline(phantom_cfg, "oracle")
    _check_format(oracle)
    assert len({r["generated"] for r in oracle}) > 1


def test_cnn_transformer_trains_and_generates(phantom_cfg):
    rows, facts = generate_baseline(phantom_cfg, "cnn_transformer")
    _check_format(rows)
    assert facts["vocab_size"] > 4 and np.isfinite(facts["final_loss"])


def test_retrieval_copies_a_training_report_with_its_labels(phantom_cfg):
    from medvlm.features import extract_features

    extract_features(phantom_cfg)
    rows, _ = generate_baseline(phantom_cfg, "retrieval")
    _check_format(rows)
    train = [json.loads(line) for line in open(f"{phantom_cfg.split.out_dir}/train.jsonl")]
    by_report = {t["report"]: t["labels"] for t in train}
    for r in rows:
        assert r["generated"] in by_report and set(r["probabilities"]) == set(NAMES)


def test_unknown_baseline():
    with pytest.raises(EvaluationError, match="unknown baseline"):
        generate_baseline(config_from_dict({}), "majority")
