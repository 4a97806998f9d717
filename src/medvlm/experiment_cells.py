"""The experiment grid: its cells (strategy x ablation variant x seed), their settings and their folders.

Every output path of a cell is rebased under `<experiment.out_root>/<experiment.name>/` (medvlm.paths): the data
outputs shared by all cells at the root, each cell's run outputs (models, checkpoints, reports) under
cells/<strategy>/<variant>/seed<k>/, the baselines' reports under baselines/. medvlm.experiment runs the grid,
medvlm.grid runs its cells.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.config import Config, config_from_dict
from medvlm.errors import ConfigError
from medvlm.paths import RUN_OUTPUTS, rebase_outputs, without_outputs


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    strategy: str
    variant: str  # "full" or ablation names joined by "+"
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return f"{self.strategy}/{self.variant}/seed{self.seed}"


def experiment_root(cfg: Config) -> Path:
    return Path(cfg.experiment.out_root) / cfg.experiment.name


def with_settings(cfg: Config, overrides: dict[str, Any]) -> Config:
    raw = cfg.model_dump(mode="json", by_alias=True)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"experiment override {dotted!r}: no settings section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"experiment override {dotted!r}: unknown setting {leaf!r}")
        node[leaf] = value
    return config_from_dict(raw)


def shared_config(cfg: Config) -> Config:
    """The profile with every output under the experiment root (the cells then move their own outputs again)."""
    return rebase_outputs(cfg, experiment_root(cfg))


def baseline_config(cfg: Config) -> Config:
    return rebase_outputs(shared_config(cfg), experiment_root(cfg) / "baselines", ["evaluate.out_dir"])


def variants(cfg: Config) -> dict[str, dict[str, Any]]:
    """Variant name -> settings. `full` is the profile itself; ablations are flipped one at a time, or in every
    combination when experiment.factorial is true."""
    abl = cfg.experiment.ablations
    out: dict[str, dict[str, Any]] = {"full": {}}
    names = sorted(abl)
    sizes = range(1, len(names) + 1) if cfg.experiment.factorial else [1]
    for size in sizes:
        for combo in itertools.combinations(names, size):
            merged: dict[str, Any] = {}
            for name in combo:
                merged.update(abl[name])
            out["+".join(combo)] = merged
    return out


def cells(cfg: Config) -> list[Cell]:
    ex = cfg.experiment
    strategies = ex.strategies or list(cfg.train.strategies)
    ablated = set(ex.ablation_strategies or strategies)
    unknown = ablated - set(strategies)
    if unknown:
        raise ConfigError(f"experiment.ablation_strategies {sorted(unknown)} are not in the experiment's strategies {strategies}")
    grid = []
    for seed in ex.seeds:
        for strategy in strategies:
            for name, overrides in variants(cfg).items():
                if name == "full" or strategy in ablated:
                    grid.append(Cell(strategy, name, seed, overrides))
    return grid


def cell_dir(cfg: Config, cell: Cell) -> Path:
    return experiment_root(cfg) / "cells" / cell.strategy / cell.variant / f"seed{cell.seed}"


def cell_config(cfg: Config, cell: Cell) -> Config:
    """The cell's settings: the data outputs of the experiment root, its own run outputs (models, checkpoints,
    reports) under its folder."""
    varied = with_settings(shared_config(cfg), {**cell.overrides, "seed": cell.seed})
    return rebase_outputs(varied, cell_dir(cfg, cell), RUN_OUTPUTS)


def cell_metrics_path(cfg: Config, cell: Cell) -> Path:
    return cell_dir(cfg, cell) / "reports" / "metrics" / f"{cell.strategy}.json"


CELL_SETTINGS = "cell_settings.json"  # next to a finished cell's reports: the settings its result came from
CELL_SECTIONS = ("seed", "model", "train", "pretrain", "generate", "evaluate")
NOT_RESULTS = ("train.strategies", "train.log_every", "train.checkpoint_every", "train.rank_log",
               "evaluate.baselines", "evaluate.meteor_timeout_s")  # settings a cell's numbers do not depend on


def restricted(new, old):
    """`new` limited to the keys `old` has: a setting added to medvlm since the experiment ran (its default keeps the
    old behaviour) does not make the experiment stale; a changed value of a known setting does."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: restricted(new[k], old[k]) for k in old if k in new} if set(old) <= set(new) else new
    return new


def cell_signature(ccfg: Config) -> dict:
    """What a cell's result is computed from: its seed, model, training, generation and evaluation settings."""
    dump = without_outputs(ccfg.model_dump(mode="json", by_alias=True))
    sig = {k: dump[k] for k in CELL_SECTIONS}
    for dotted in NOT_RESULTS:
        section, key = dotted.split(".")
        sig[section].pop(key, None)
    return sig


def _changes(new, old, prefix: str = "") -> list[str]:
    if isinstance(new, dict) and isinstance(old, dict):
        return [c for k in sorted(set(new) | set(old)) for c in _changes(new.get(k), old.get(k), f"{prefix}{k}.")]
    return [] if new == old else [f"{prefix.rstrip('.')} {json.dumps(old)} -> {json.dumps(new)}"]


def write_cell_settings(cfg: Config, cell: Cell, ccfg: Config) -> None:
    """Record next to a finished cell the settings (`ccfg`, its cell_config) its result came from."""
    (cell_dir(cfg, cell) / CELL_SETTINGS).write_text(json.dumps(cell_signature(ccfg), indent=1))


def check_finished_cells(cfg: Config, grid: list[Cell]) -> None:
    """Refuse to keep a finished cell whose recorded settings differ from what the profile now gives it: its row
    would pass for a run of the new settings. (Cells finished before settings were recorded cannot be checked.)"""
    stale = []
    for cell in grid:
        path = cell_dir(cfg, cell) / CELL_SETTINGS
        if not cell_metrics_path(cfg, cell).is_file() or not path.is_file():
            continue
        stored, now = json.loads(path.read_text()), cell_signature(cell_config(cfg, cell))
        changes = _changes(restricted(now, stored), stored)
        if changes:
            stale.append(f"{cell.key} ({', '.join(changes[:3])}{', ...' if len(changes) > 3 else ''})")
    if stale:
        raise ConfigError(f"{experiment_root(cfg)}: finished cells were run with other settings: {'; '.join(stale)}; "
                          "pick another experiment.name, or delete those cell folders to re-run them")
