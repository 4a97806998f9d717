"""Running the cells of an experiment grid: one after the other, or as Prefect tasks on a Dask cluster.

`medvlm experiment run` runs the shared stages and the baselines itself, then hands the cells still to run to
`run_cells`. With experiment.workers <= 1 and no experiment.cluster_address the cells run one after the other in
this process (the default). Otherwise every cell becomes a Prefect task submitted to a prefect_dask.DaskTaskRunner:
a local Dask cluster of experiment.workers worker processes (one thread each), or the existing cluster at
experiment.cluster_address (`tcp://scheduler:8786`), whose workers must see the same experiment root (shared file
system) and the same Python environment.

Why Dask (prefect-dask) and not Ray (prefect-ray): a cell is a plain Python function over files, with no actors,
GPUs scheduling or object store needs; Dask's distributed is a small pure-Python install (11 packages) that starts a
local cluster in seconds, while ray[default] brings a large binary wheel, its own dashboard and agents. Users who
already run Ray can wrap `run_cell` the same way.

The task calls `run_cell`, the same function the sequential path calls: orchestration adds no computation.
Idempotent and resumable: a cell whose metrics file exists is never run again (checked again inside the task, so a
cell finished by another run meanwhile is skipped), training resumes from the cell's checkpoint, and a per-cell lock
file (<cell>/.lock, created atomically) keeps two workers, or two `experiment run`s, from writing the same cell. A
lock whose process is gone (same host, pid not alive) is stale and taken over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from medvlm.config import Config, config_from_dict
from medvlm.experiment_cells import Cell, cell_config, cell_dir, cell_metrics_path, write_cell_settings

# Local cluster shape (experiment.workers processes): one thread per worker, since a cell already uses every core
# torch gives it; tests add a preload module here.
LOCAL_CLUSTER: dict = {"threads_per_worker": 1, "processes": True, "dashboard_address": None}


class CellLocked(Exception):
    """Another live process holds the cell's lock."""


def uses_cluster(cfg: Config) -> bool:
    return bool(cfg.experiment.cluster_address) or cfg.experiment.workers > 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def cell_lock(folder: Path):
    """Hold <folder>/.lock while the cell runs; CellLocked if a live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", 0))):
                path.unlink(missing_ok=True)  # its process is gone (killed): stale
                continue
            raise CellLocked(f"{folder}: locked by {holder.get('host', '?')}:{holder.get('pid', '?')}") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise CellLocked(f"{folder}: lock could not be taken")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def run_cell(cfg: Config, cell) -> dict[str, float]:
    """Pretrain (when the cell's variant asks for it), train and evaluate one cell; returns {step name: seconds}.

    A finished cell (its metrics file exists) returns {} without running anything."""
    from medvlm.evaluate import evaluate
    from medvlm.pretrain import pretrain_vision
    from medvlm.train import train

    timings: dict[str, float] = {}
    if cell_metrics_path(cfg, cell).is_file():
        return timings

    def timed(name: str, fn, *args):
        started = time.perf_counter()
        fn(*args)
        timings[f"{name} {cell.key}"] = round(time.perf_counter() - started, 1)

    with cell_lock(cell_dir(cfg, cell)):
        if cell_metrics_path(cfg, cell).is_file():  # finished by another process while we waited
            return timings
        ccfg = cell_config(cfg, cell)
        if ccfg.pretrain.enabled and not (Path(ccfg.pretrain.out_dir) / "config.json").is_file():
            timed("pretrain_vision", pretrain_vision, ccfg)  # the cell's own seed
        timed("train", train, ccfg, cell.strategy)
        timed("evaluate", evaluate, ccfg, cell.strategy)
        write_cell_settings(cfg, cell, ccfg)
    return timings


def run_cells(cfg: Config, todo: list, log=print) -> dict[str, float]:
    """Run the cells in `todo` (sequentially, or on Dask: see the module docstring); returns their timings."""
    if not todo:
        return {}
    if not uses_cluster(cfg):
        timings: dict[str, float] = {}
        for cell in todo:
            try:
                done = run_cell(cfg, cell)
            except CellLocked as exc:
                log(f"[experiment {cfg.experiment.name}] skipped {cell.key}: {exc}")
                continue
            for name, seconds in done.items():
                log(f"[experiment {cfg.experiment.name}] {name}: {seconds} s")
            timings.update(done)
        return timings
    return _run_on_dask(cfg, todo, log)


def _cell_task(raw_cfg: dict, raw_cell: dict) -> dict:
    """The Prefect task body: run_cell on a Dask worker; a locked cell is reported, not failed. Settings and cell
    travel as plain JSON-like dicts (what Prefect walks and records as task inputs)."""
    cfg, cell = config_from_dict(raw_cfg), Cell(**raw_cell)
    try:
        return {"timings": run_cell(cfg, cell), "worker_pid": os.getpid(), "host": socket.gethostname()}
    except CellLocked as exc:
        return {"timings": {}, "locked": str(exc)}


def task_runner(cfg: Config):
    from prefect_dask import DaskTaskRunner

    if cfg.experiment.cluster_address:
        return DaskTaskRunner(address=cfg.experiment.cluster_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": max(1, cfg.experiment.workers), **LOCAL_CLUSTER})


def _run_on_dask(cfg: Config, todo: list, log) -> dict[str, float]:
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    cell_task = task(_cell_task, name="experiment-cell", cache_policy=NO_CACHE)

    raw_cfg = cfg.model_dump(mode="json", by_alias=True)

    @flow(name="experiment-grid", task_runner=task_runner(cfg), log_prints=False)
    def grid() -> list:
        futures = [cell_task.with_options(task_run_name=f"cell {c.key}").submit(raw_cfg, dataclasses.asdict(c))
                   for c in todo]
        return [f.result(raise_on_failure=False) for f in futures]

    where = cfg.experiment.cluster_address or f"local Dask cluster, {cfg.experiment.workers} workers"
    log(f"[experiment {cfg.experiment.name}] {len(todo)} cells on {where}")
    results = grid()
    timings: dict[str, float] = {}
    failures = []
    for cell, out in zip(todo, results):
        if isinstance(out, BaseException):
            failures.append((cell, out))
            continue
        if "locked" in out:
            log(f"[experiment {cfg.experiment.name}] skipped {cell.key}: {out['locked']}")
        for name, seconds in out["timings"].items():
            log(f"[experiment {cfg.experiment.name}] {name}: {seconds} s (worker {out['host']}:{out['worker_pid']})")
        timings.update(out["timings"])
    for cell, exc in failures:
        log(f"[experiment {cfg.experiment.name}] {cell.key} failed: {exc}")
    if failures:  # the finished cells are kept; a re-run retries only the failed ones
        raise failures[0][1]
    return timings
