"""One function moves every output path of a Config under a folder: experiment cells, retraining and `--out-root`
all use it, so none of them can write into the DVC-tracked pipeline outputs (checkpoints included)."""

import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from conftest import REPO
from medvlm.config import Config, config_from_dict, load_config
from medvlm.paths import DATA_OUTPUTS, NOT_OUTPUTS, OUTPUT_PATHS, RUN_OUTPUTS, rebase_outputs

sys.path.insert(0, str(REPO))

# a settings name that looks like a place on disk
PATH_LIKE = ("_dir", "_file", "_root", "root", "manifest", "workdir", "_uri", "_path")


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _leaves(sub, key + ".")
        else:
            yield key


def _get(cfg: Config, dotted: str):
    node = cfg.model_dump(mode="json", by_alias=True)
    for part in dotted.split("."):
        node = node[part]
    return node


def _under(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_every_path_setting_is_classified():
    """A new output path must be added to OUTPUT_PATHS (then every rebase moves it) or named as not an output."""
    path_like = {k for k in _leaves(Config) if k.rsplit(".", 1)[-1].endswith(PATH_LIKE)}
    assert path_like, "no path settings found: the enumeration is broken"
    unclassified = path_like - set(OUTPUT_PATHS) - set(NOT_OUTPUTS)
    assert not unclassified, f"classify these settings in medvlm/paths.py: {sorted(unclassified)}"
    assert set(OUTPUT_PATHS) <= set(_leaves(Config)) and set(NOT_OUTPUTS) <= set(_leaves(Config))
    assert not set(OUTPUT_PATHS) & set(NOT_OUTPUTS)
    assert set(DATA_OUTPUTS) | set(RUN_OUTPUTS) == set(OUTPUT_PATHS) and not set(DATA_OUTPUTS) & set(RUN_OUTPUTS)
    assert "train.checkpoint_dir" in RUN_OUTPUTS


def test_rebase_moves_every_output_and_nothing_else(tmp_path):
    cfg = load_config(REPO / "params.yaml")
    moved = rebase_outputs(cfg, tmp_path / "root")
    for key in _leaves(Config):
        if key in OUTPUT_PATHS:
            assert Path(_get(moved, key)) == tmp_path / "root" / _get(cfg, key), key  # params.yaml's layout
        else:
            assert _get(moved, key) == _get(cfg, key), key
    part = rebase_outputs(cfg, tmp_path / "run", RUN_OUTPUTS)
    assert all(_under(_get(part, k), tmp_path / "run") for k in RUN_OUTPUTS)
    assert all(_get(part, k) == _get(cfg, k) for k in DATA_OUTPUTS)
    with pytest.raises(KeyError):
        rebase_outputs(cfg, tmp_path, ["train.lr"])


def test_retrain_writes_every_output_under_its_workdir(tmp_path):
    from flows.retrain import retrain_config

    cfg = config_from_dict({"retrain": {"workdir": str(tmp_path / "ws")}})
    rcfg = retrain_config(cfg)
    outside = [k for k in OUTPUT_PATHS if not _under(_get(rcfg, k), tmp_path / "ws")]
    assert not outside, f"retraining writes {outside} outside retrain.workdir (into the pipeline's outputs)"
    assert Path(rcfg.data.root) == tmp_path / "ws" / "data" and rcfg.register == cfg.register


def test_experiment_cells_and_out_root_option_rebase_every_output(tmp_path):
    from medvlm import cli
    from medvlm import experiment_cells as xc

    cfg = config_from_dict({"experiment": {"name": "t", "out_root": str(tmp_path)}})
    cell = xc.cells(cfg)[0]
    ccfg, shared = xc.cell_config(cfg, cell), xc.shared_config(cfg)
    assert all(_under(_get(ccfg, k), xc.cell_dir(cfg, cell)) for k in RUN_OUTPUTS)
    assert all(_get(ccfg, k) == _get(shared, k) and _under(_get(shared, k), tmp_path / "t") for k in DATA_OUTPUTS)
    assert all(_under(_get(shared, k), tmp_path / "t") for k in OUTPUT_PATHS)

    params = tmp_path / "params.yaml"
    params.write_text("train: {out_dir: somewhere}\n")
    cli.main(params=params, overlay=[], set_=["evaluate.out_dir=elsewhere"], out_root=tmp_path / "abl")
    try:
        opt = cli._config()
    finally:
        cli.main(params=Path("params.yaml"), overlay=[], set_=[], out_root=None)
    assert all(_under(_get(opt, k), tmp_path / "abl") for k in RUN_OUTPUTS)
    assert opt.split.out_dir == "data/split" and opt.features.out_dir == "data/features"  # the data it reads
