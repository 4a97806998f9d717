"""Where a Config writes: every output path setting, and the one function that moves them under a folder.

Experiment cells, scheduled retraining and `medvlm --out-root DIR` all call `rebase_outputs`, so a run apart from
the pipeline never writes into (or resumes from) the DVC-tracked outputs: checkpoints are outputs like any other.
A new output path setting goes into OUTPUT_PATHS; tests/test_paths.py fails on a path-like setting that is in
neither OUTPUT_PATHS nor NOT_OUTPUTS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from medvlm.config import Config, config_from_dict

# dotted setting -> its place under an output root (the layout of params.yaml, so a rebased root looks like the repo)
OUTPUT_PATHS: dict[str, str] = {
    "validate.out_dir": "reports/validation",
    "validate.manifest_dir": "data/manifest",
    "split.out_dir": "data/split",
    "features.out_dir": "data/features",
    "labeler.out_dir": "models/labeler",
    "train.out_dir": "models",
    "train.checkpoint_dir": "checkpoints",
    "pretrain.out_dir": "models/pretrain_vision",
    "pretrain.metrics_file": "reports/pretrain/pretrain_vision.json",
    "evaluate.out_dir": "reports",
    "monitor.out_dir": "reports/drift",
}

# What the data stages write; every training run on the same data reads them (an experiment shares them by its cells).
DATA_OUTPUTS: tuple[str, ...] = ("validate.out_dir", "validate.manifest_dir", "split.out_dir", "features.out_dir",
                                 "labeler.out_dir")
# What one training run writes (models, checkpoints, pretraining, evaluation reports): everything else.
RUN_OUTPUTS: tuple[str, ...] = tuple(k for k in OUTPUT_PATHS if k not in DATA_OUTPUTS)

# Path-like settings that are not outputs, and why they stay where they are.
NOT_OUTPUTS: dict[str, str] = {
    "synthesize.out_dir": "the phantom data set: an input (data.root) of every run",
    "synthesize.incoming_dir": "the phantom incoming batch: an input (monitor.incoming_dir)",
    "data.root": "input data", "data.manifest": "input data", "data.image_dir": "input data",
    "monitor.incoming_dir": "input data",
    "register.tracking_uri": "the one shared registry", "register.cache_dir": "downloads of the shared registry",
    "retrain.workdir": "an output root itself", "experiment.out_root": "an output root itself",
}


def rebase_outputs(cfg: Config, root: str | Path, keys: Iterable[str] | None = None) -> Config:
    """`cfg` with the output paths `keys` (default: all of OUTPUT_PATHS) at their place under `root`."""
    keys = list(OUTPUT_PATHS if keys is None else keys)
    unknown = [k for k in keys if k not in OUTPUT_PATHS]
    if unknown:
        raise KeyError(f"not output paths: {unknown}")
    raw = cfg.model_dump(mode="json", by_alias=True)
    for dotted in keys:
        section, key = dotted.split(".")
        raw[section][key] = str(Path(root) / OUTPUT_PATHS[dotted])
    return config_from_dict(raw)


def without_outputs(dump: dict, keys: Iterable[str] = OUTPUT_PATHS) -> dict:
    """A settings dump (model_dump by alias) without the output paths `keys`: where outputs live is not what they
    are computed from."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in dump.items()}
    for dotted in keys:
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out
