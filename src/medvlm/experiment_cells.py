"""The experiment grid: its cells (strategy x ablation variant x seed), their settings and their folders.

Every output path of a cell is rebased under `<experiment.out_root>/<experiment.name>/` (medvlm.paths): the data
outputs shared by all cells at the root, each cell's run outputs (models, checkpoints, reports) under
cells/<strategy>/<variant>/seed<k>/, the baselines' reports under baselines/. medvlm.experiment runs the grid,
medvlm.grid runs its cells.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvlm.config import Config, config_from_dict
from medvlm.errors import ConfigError
from medvlm.paths import RUN_OUTPUTS, rebase_outputs


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
