"""Experiment cells as Prefect tasks on a local Dask cluster: same table as the sequential run, finished cells never
re-run, one writer per cell (lock file). Train/evaluate are the stand-ins of grid_fakes (also in the workers)."""

import json
import os
from pathlib import Path

import pytest

import grid_fakes
from medvlm import experiment as ex
from medvlm import experiment_cells as xc
from medvlm import grid
from medvlm.config import config_from_dict

FAKES = str(Path(grid_fakes.__file__).resolve())


def _cfg(tmp_path, name, **experiment):
    cfg = config_from_dict({
        "train": {"strategies": ["freeze", "lora"]},
        "register": {"tracking_uri": "none"},
        "experiment": {"name": name, "out_root": str(tmp_path), "seeds": [0, 1], "baselines": [],
                       "ablations": {"no_disc": {"model.discrimination": False, "model.prior_prompt": False}}, "ablation_strategies": ["freeze"],
                       **experiment},
    })
    root = xc.experiment_root(cfg)  # the shared stages count as done: the cells are what is tested here
    root.mkdir(parents=True, exist_ok=True)
    (root / "shared_stages.json").write_text(json.dumps(ex.shared_signature(xc.shared_config(cfg))))
    return cfg


def _table(cfg) -> tuple[dict, str]:
    root = xc.experiment_root(cfg)
    results = json.loads((root / "results.json").read_text())
    results.pop("experiment")
    return results, (root / "results.md").read_text().replace(f"`{cfg.experiment.name}`", "`NAME`")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three fresh interpreters import torch (test process, two workers) + a Prefect server
def test_two_dask_workers_give_the_sequential_table_and_never_rerun_a_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "LOCAL_CLUSTER", {**grid.LOCAL_CLUSTER, "preload": [FAKES]})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(ex.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    seq = _cfg(tmp_path, "seq")
    with monkeypatch.context() as m:  # the reference: the default path, cells one by one in this process
        import medvlm.evaluate
        import medvlm.train

        m.setattr(medvlm.train, "train", grid_fakes.fake_train)
        m.setattr(medvlm.evaluate, "evaluate", grid_fakes.fake_evaluate)
        ex.run_experiment(seq, log=lambda *_: None)

    par = _cfg(tmp_path, "par", workers=2)
    lines: list[str] = []
    with prefect_test_harness(server_startup_timeout=600):
        out = ex.run_experiment(par, log=lines.append)
    assert len(out["todo"]) == 6 and any("6 cells on local Dask cluster, 2 workers" in line for line in lines)
    assert _table(par) == _table(seq)
    pids = {(xc.cell_dir(par, c) / "models" / c.strategy / "trained_by").read_text() for c in xc.cells(par)}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two worker processes, not this one

    # a second run finds nothing to do: no cell runs again, the table is unchanged
    stamp = {c.key: xc.cell_metrics_path(par, c).stat().st_mtime_ns for c in xc.cells(par)}
    again = ex.run_experiment(par, log=lambda *_: None)
    assert again["todo"] == [] and again["seconds"] == {}
    assert {c.key: xc.cell_metrics_path(par, c).stat().st_mtime_ns for c in xc.cells(par)} == stamp


def test_a_locked_cell_is_skipped_and_a_stale_lock_is_taken_over(tmp_path, monkeypatch):
    import medvlm.evaluate
    import medvlm.train

    monkeypatch.setattr(medvlm.train, "train", grid_fakes.fake_train)
    monkeypatch.setattr(medvlm.evaluate, "evaluate", grid_fakes.fake_evaluate)
    cfg = _cfg(tmp_path, "locks", seeds=[0], ablations={})
    first, second = xc.cells(cfg)
    lines: list[str] = []
    with grid.cell_lock(xc.cell_dir(cfg, first)):  # another worker is on `first`
        with pytest.raises(grid.CellLocked, match="locked by"):
            grid.run_cell(cfg, first)
        done = grid.run_cells(cfg, [first, second], log=lines.append)
    assert not xc.cell_metrics_path(cfg, first).is_file() and xc.cell_metrics_path(cfg, second).is_file()
    assert any("skipped freeze/full/seed0" in line for line in lines) and list(done) == [
        "train lora/full/seed0", "evaluate lora/full/seed0"]
    assert not (xc.cell_dir(cfg, first) / ".lock").exists()  # released

    # a lock left by a killed process on this host is stale: the cell runs
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    import socket

    (xc.cell_dir(cfg, first) / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    assert "train freeze/full/seed0" in grid.run_cell(cfg, first)
    assert grid.run_cell(cfg, first) == {}  # finished: never run again


def test_sequential_unless_workers_or_an_address(tmp_path):
    assert not grid.uses_cluster(_cfg(tmp_path, "a"))
    assert grid.uses_cluster(_cfg(tmp_path, "b", workers=3))
    runner = grid.task_runner(_cfg(tmp_path, "c", cluster_address="tcp://10.0.0.5:8786"))
    assert runner.address == "tcp://10.0.0.5:8786"
    local = grid.task_runner(_cfg(tmp_path, "d", workers=3))
    assert local.cluster_kwargs["n_workers"] == 3
