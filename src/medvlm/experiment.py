"""experiment: a grid of training runs (strategy x ablation variant x seed) on one data profile, in its own folder.

`dvc repro` reproduces the default pipeline; an experiment answers the questions one pipeline run cannot: how the
strategies compare with each switch flipped (ablation) and how much of a difference is seed noise. It calls the same
stage functions as dvc.yaml (validate, split, features, train, train_labeler, evaluate, report) with every output
path rebased under `<experiment.out_root>/<experiment.name>/` (medvlm.paths.rebase_outputs), so the default
pipeline's outputs are never touched:

    <root>/data/{manifest,split,features}   <root>/models/labeler   <root>/reports/validation
    <root>/baselines/reports/                       baselines, evaluated once (they do not depend on the model)
    <root>/cells/<strategy>/<variant>/seed<k>/      {models, checkpoints, reports} of one training run
    <root>/results.md, <root>/results.json          the aggregated table

A cell whose metrics file exists is skipped, and training resumes from its checkpoint, so a killed experiment
picks up where it stopped (`medvlm experiment run` again). Cells run seed by seed: the first seed of every cell
finishes before the second starts, so a partial run is still a complete table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from medvlm.config import Config
from medvlm.errors import ConfigError, EvaluationError
from medvlm.experiment_cells import (
    baseline_config,
    cell_config,
    cell_metrics_path,
    cells,
    check_finished_cells,
    experiment_root,
    restricted,
    shared_config,
    with_settings,
)
from medvlm.grid import run_cells
from medvlm.paths import DATA_OUTPUTS, without_outputs


def shared_signature(shared: Config) -> dict:
    """The settings the shared stages read; a change re-runs them."""
    dump = without_outputs(shared.model_dump(mode="json", by_alias=True), DATA_OUTPUTS)
    return {k: dump[k] for k in ("data", "validate", "split", "features", "labeler")} | {
        "vision": [dump["model"]["vision"], dump["model"]["tune_vision_blocks"]], "volume": dump["volume"]}


def run_experiment(cfg: Config, *, only: list[str] | None = None, dry_run: bool = False, log=print) -> dict:
    """Run every missing cell of the grid (and the shared stages first); returns what ran and the table's path.

    `only` restricts to cells whose key (strategy/variant/seedK) starts with one of the given prefixes.
    """
    from medvlm.data.split import run_split
    from medvlm.data.validate import run_validation
    from medvlm.evaluate import evaluate
    from medvlm.features import extract_features
    from medvlm.labeler import train_labeler

    grid = [c for c in cells(cfg) if not only or any(c.key.startswith(p) for p in only)]
    todo = [c for c in grid if not cell_metrics_path(cfg, c).is_file()]
    plan = {"root": str(experiment_root(cfg)), "cells": [c.key for c in grid], "todo": [c.key for c in todo]}
    if dry_run:
        return plan
    check_finished_cells(cfg, grid)
    shared = shared_config(cfg)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        started = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - started, 1)
        log(f"[experiment {cfg.experiment.name}] {name}: {timings[name]} s")
        return out

    root = experiment_root(cfg)
    stamp_path, stamp = root / "shared_stages.json", shared_signature(shared)
    stored = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
    if stored is not None:  # stamps of older versions also recorded the output folders
        stored = without_outputs(stored, DATA_OUTPUTS)
    if stored is None or restricted(stamp, stored) != stored:
        if stamp_path.is_file() and any((root / d).exists() for d in ("cells", "baselines")):
            raise ConfigError(f"{root}: this experiment was run with other data/feature/labeler settings "
                              f"(see {stamp_path.name}); pick another experiment.name or delete the folder")
        # data / feature / labeler settings changed (or first run): everything downstream is stale
        timed("validate", run_validation, shared)
        timed("split", run_split, shared)
        timed("features", extract_features, shared)
        timed("train_labeler", train_labeler, shared)
        root.mkdir(parents=True, exist_ok=True)
        stamp_path.write_text(json.dumps(stamp, indent=1))
    base = baseline_config(cfg)
    for name in cfg.experiment.baselines:
        if not (Path(base.evaluate.out_dir) / "metrics" / f"{name}.json").is_file():
            timed(f"baseline {name}", evaluate, base, name)
    timings.update(run_cells(cfg, todo, log))  # in this process, or on Dask (experiment.workers / cluster_address)
    table = write_results(cfg)
    registered = register_best(cfg) if cfg.experiment.register_best else None
    timing_path = root / "timings.json"
    previous = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    timing_path.write_text(json.dumps({**previous, **timings}, indent=1))
    return {**plan, "seconds": timings, "results": str(table), "registered": registered}


def register_best(cfg: Config) -> dict | None:
    """Register the best full-model cell of the first seed (register.primary_metric) in the MLflow registry under
    register.model_name; it becomes champion only through the usual gate (same test data, better metric)."""
    from medvlm.registry import register

    seed = cfg.experiment.seeds[0]
    full = [c for c in cells(cfg) if c.variant == "full" and c.seed == seed and cell_metrics_path(cfg, c).is_file()]
    if not full:
        return None
    primary = cfg.register.primary_metric
    best = max(full, key=lambda c: (_read(cell_metrics_path(cfg, c))["metrics"].get(primary) or {}).get("value") or 0.0)
    ccfg = with_settings(cell_config(cfg, best), {"train.strategies": [best.strategy]})
    return register(ccfg)


# ------------------------------------------------------------------------------------------------ aggregation
def collect(cfg: Config) -> dict:
    """Every finished cell and baseline: {"rows": {row name: {metric: {...}}}, "meta": ...}."""
    from medvlm.bootstrap import aggregate_runs

    rows: dict[str, dict] = {}
    seeds_done: dict[str, list[int]] = {}
    hashes: set[str] = set()
    first: dict | None = None
    by_row: dict[str, list[dict]] = {}
    for cell in cells(cfg):
        path = cell_metrics_path(cfg, cell)
        if not path.is_file():
            continue
        result = _read(path)
        hashes.add(str(result.get("test_data_hash")))
        first = first or result
        row = cell.strategy if cell.variant == "full" else f"{cell.strategy} − {cell.variant}"
        by_row.setdefault(row, []).append(result)
        seeds_done.setdefault(row, []).append(cell.seed)
    for row, results in by_row.items():
        if len(results) == 1:
            rows[row] = results[0]["metrics"]
            continue
        runs = [{k: m.get("value") for k, m in r["metrics"].items()} for r in results]
        agg = aggregate_runs(runs, cfg.evaluate.confidence)
        rows[row] = {k: {"value": a["mean"], "ci_low": a["ci_low"], "ci_high": a["ci_high"], "std": a["std"],
                         "n_runs": a["n_runs"]} for k, a in agg.items()}
    base_dir = Path(baseline_config(cfg).evaluate.out_dir) / "metrics"
    for name in cfg.experiment.baselines:
        path = base_dir / f"{name}.json"
        if path.is_file():
            result = _read(path)
            hashes.add(str(result.get("test_data_hash")))
            first = first or result
            rows[name] = result["metrics"]
            seeds_done[name] = []
    if len(hashes) > 1:
        raise EvaluationError(f"experiment {cfg.experiment.name}: rows were scored on different test splits {sorted(hashes)}")
    return {"rows": rows, "seeds": seeds_done, "test_data_hash": next(iter(hashes), None), "first": first}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{path}: not valid JSON ({exc.msg})") from None


def write_results(cfg: Config) -> Path:
    """<root>/results.md and results.json: one row per strategy/variant (mean over seeds) and per baseline."""
    from medvlm.report import TABLE_METRICS, _cell

    found = collect(cfg)
    root = experiment_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    rows = found["rows"]
    if not rows:
        raise EvaluationError(f"experiment {cfg.experiment.name}: nothing evaluated yet under {root}")
    columns = [m for m in TABLE_METRICS if any(m in r for r in rows.values())]
    first = found["first"] or {}
    lines = [f"# Experiment `{cfg.experiment.name}`", "",
             f"Data: `{cfg.data.source}` (split grouped by `{cfg.data.group_by}`, test data hash "
             f"`{found['test_data_hash']}`, {first.get('n_test', '?')} test images).",
             "Rows with one seed: value [95% bootstrap CI over test images]. Rows with several seeds: mean over seeds "
             "[Student-t interval of the mean over seeds]; the seeds column says which.", "",
             "| model | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, metrics in rows.items():
        seeds = ",".join(map(str, found["seeds"].get(name, []))) or "–"
        lines.append(f"| {name} | {seeds} | " + " | ".join(_cell(metrics.get(m)) for m in columns) + " |")
    quality = (first.get("clinical_efficacy") or {}).get("labeler_reference_quality")
    if quality:
        lines += ["", f"Labeler on the test reference reports: accuracy {quality['accuracy']:.3f}, "
                      f"micro F1 {quality['micro_f1']:.3f}, macro F1 {quality['macro_f1']:.3f} (n = {quality['n']})."]
    if first.get("conventions"):
        lines += ["", "Conventions:"] + [f"- **{k}**: {v}" for k, v in first["conventions"].items()]
    (root / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    flat = {name: {k: m.get("value") for k, m in metrics.items()} for name, metrics in rows.items()}
    (root / "results.json").write_text(json.dumps({"experiment": cfg.experiment.name, "rows": rows, "seeds": found["seeds"],
                                                   "test_data_hash": found["test_data_hash"], "flat": flat}, indent=1))
    return root / "results.md"
