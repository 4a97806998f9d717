"""Stand-ins for the train and evaluate stages of an experiment cell: cheap, deterministic, and recording which
process ran them. Imported by the tests, and preloaded by the Dask workers of tests/test_grid.py (a preload file
runs in every worker process at start), so cells on workers use them too."""

import json
import os
import time
from pathlib import Path


def fake_train(cfg, strategy):
    time.sleep(1.0)  # long enough that both workers of a two-worker cluster get cells
    out = Path(cfg.train.out_dir) / strategy
    out.mkdir(parents=True, exist_ok=True)
    (out / "trained_by").write_text(str(os.getpid()))
    return {}


def fake_evaluate(cfg, name):
    cider = 1.0 + cfg.seed + (0.5 if name == "lora" else 0.0) - (0.0 if cfg.model.discrimination else 0.3)
    path = Path(cfg.evaluate.out_dir) / "metrics" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"test_data_hash": "h", "n_test": 5, "metrics": {
        "CIDEr": {"value": cider, "ci_low": cider - 0.1, "ci_high": cider + 0.1},
        "BLEU_4": {"value": cider / 10, "ci_low": None, "ci_high": None}}}))
    return {}


def install() -> None:
    import medvlm.evaluate
    import medvlm.train

    medvlm.train.train = fake_train
    medvlm.evaluate.evaluate = fake_evaluate


def dask_setup(worker=None) -> None:  # Dask calls this when the file is a worker preload
    install()
