"""dvc.yaml lists the training parameters per key: a setting that cannot change the weights (logging, checkpoint
cadence, output paths) does not re-train, and every setting that can does."""

from __future__ import annotations

from pathlib import Path

import yaml

from medvlm.strategies import REGISTRY

REPO = Path(__file__).resolve().parents[1]
# train.* keys that do not change what training learns
NOT_WEIGHTS = {"strategies", "checkpoint_every", "checkpoint_dir", "log_every", "out_dir", "rank_log"}


def _train_params() -> list[str]:
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]
    return [p if isinstance(p, str) else next(iter(p)) for p in stage["params"]]


def test_train_stage_params_are_the_keys_that_change_the_weights():
    listed = _train_params()
    assert "train" not in listed  # the whole section would re-train on train.log_every
    assert not any(p.removeprefix("train.") in NOT_WEIGHTS for p in listed)
    train_keys = set(yaml.safe_load((REPO / "params.yaml").read_text())["train"])
    covered = {p.removeprefix("train.") for p in listed if p.startswith("train.")}
    # the stage of a strategy depends on that strategy's own settings only (train.${item})
    assert "${item}" in covered and not covered & set(REGISTRY)
    assert train_keys - NOT_WEIGHTS - set(REGISTRY) == covered - {"${item}"}
    assert {"seed", "model", "data.label_names"} <= set(listed)
