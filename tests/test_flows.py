"""Prefect flows on fakes under prefect_test_harness: order, GPU concurrency, retries, retrain ingestion, the drift
monitor's trigger."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lifecycle_fakes import FakePredictor  # noqa: E402
from medvlm.errors import DataError, MedVLMError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def write_params(tmp: Path, **sections) -> str:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["strategies"] = ["freeze", "lora"]
    raw["evaluate"]["baselines"] = ["retrieval"]
    raw["evaluate"]["out_dir"] = str(tmp / "reports")
    raw["retrain"].update(retry_delay_s=0, workdir=str(tmp / "retrain"))
    raw["register"]["tracking_uri"] = f"sqlite:///{tmp / 'mlruns.db'}"
    for key, value in sections.items():
        raw[key].update(value)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_pipeline_runs_stages_in_order_and_reports(tmp_path, monkeypatch):
    from flows import pipeline

    calls = []
    monkeypatch.setattr(pipeline.steps, "run_stage", lambda stage: calls.append(stage) or {"stage": stage})
    monkeypatch.setattr(pipeline.steps, "gpus", lambda: 0)
    params = write_params(tmp_path)
    metrics = tmp_path / "reports" / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "lora.json").write_text(json.dumps({"CIDEr": {"value": 0.4, "ci": [0.3, 0.5]}, "BLEU_4": 0.1}))
    result = pipeline.pipeline_flow(params=params)
    assert calls == ["synthesize", "validate", "split", "features", "pretrain_vision", "train@freeze", "train@lora",
                     "train_labeler", "evaluate@freeze", "evaluate@lora", "baseline@retrieval", "report", "register"]
    assert "| lora | 0.4000 | [0.3000, 0.5000] | 0.1000 |" in result["results"]
    assert "| freeze | (no metrics) |" in result["results"]


def test_pipeline_trains_concurrently_on_several_gpus(tmp_path, monkeypatch):
    from flows import pipeline

    both_running = threading.Barrier(2, timeout=20)  # only passes if the two trainings overlap in time
    trained, committed = [], []

    def fake_train(strategy, gpu):
        both_running.wait()
        trained.append((strategy, gpu))
        return {"stage": strategy}

    monkeypatch.setattr(pipeline.steps, "run_stage", lambda stage: {"stage": stage})
    monkeypatch.setattr(pipeline.steps, "gpus", lambda: 2)
    monkeypatch.setattr(pipeline.steps, "train_on_gpu", fake_train)
    monkeypatch.setattr(pipeline.steps, "commit_stage", lambda stage: committed.append(stage) or {})
    pipeline.pipeline_flow(params=write_params(tmp_path))
    assert sorted(trained) == [("freeze", 0), ("lora", 1)]
    assert committed == ["train@freeze", "train@lora"]


def test_transient_failures_are_retried_user_errors_are_not(tmp_path, monkeypatch):
    from flows import pipeline

    attempts = {}

    def flaky(stage):
        attempts[stage] = attempts.get(stage, 0) + 1
        if stage == "split" and attempts[stage] == 1:
            raise RuntimeError("Unable to acquire lock")  # transient
        if stage == "report":
            raise DataError("reports/metrics: nothing to report")  # a user/data problem
        return {"stage": stage}

    monkeypatch.setattr(pipeline.steps, "run_stage", flaky)
    monkeypatch.setattr(pipeline.steps, "gpus", lambda: 0)
    state = pipeline.pipeline_flow(params=write_params(tmp_path), return_state=True)
    assert state.is_failed()
    assert attempts["split"] == 2 and attempts["report"] == 1 and "register" not in attempts


def _stub_dvc(tmp: Path, monkeypatch, script: str) -> Path:
    """A `dvc` shell script first on PATH (this interpreter's bin folder after it); every call appends its
    arguments to calls.txt ($n: the call's number). The real run_dvc_stage then runs it as it would run DVC."""
    from flows import pipeline

    bin_dir = tmp / "stub_bin"
    bin_dir.mkdir(parents=True)
    calls = tmp / "calls.txt"
    stub = bin_dir / "dvc"
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nn=$(wc -l < "{calls}")\n{script}\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which(pipeline.DVC, path=pipeline._venv_env()["PATH"]) == str(stub)  # never the real DVC here
    return calls


def test_a_stage_that_stops_on_a_user_error_is_run_once(tmp_path, monkeypatch):
    """The real run_dvc_stage: a stage whose command exits 2 (the CLI's ConfigError/DataError) is not retried."""
    from flows import pipeline

    # what `dvc repro` prints and returns when the stage's `medvlm` command stops on a ConfigError
    calls = _stub_dvc(tmp_path, monkeypatch, 'echo "error: params.yaml: validate.max_bad_fraction must be <= 1" >&2\n'
                      'echo "ERROR: failed to reproduce \'$3\': failed to run: medvlm synthesize, exited with 2" >&2\n'
                      'exit 255')
    monkeypatch.setattr(pipeline.steps, "gpus", lambda: 0)
    state = pipeline.pipeline_flow(params=write_params(tmp_path), return_state=True)
    assert state.is_failed()
    assert calls.read_text().splitlines() == ["repro --single-item synthesize"]  # once, though task_retries is 2
    with pytest.raises(MedVLMError, match="validate.max_bad_fraction must be <= 1"):
        state.result()


def test_dvc_exiting_2_is_a_user_error_other_exits_are_not(tmp_path, monkeypatch):
    from flows import pipeline

    calls = _stub_dvc(tmp_path, monkeypatch, 'if [ "$n" -eq 1 ]; then echo "error: bad argument" >&2; exit 2; fi\n'
                                            'echo "ERROR: failed to reproduce \'$3\': failed to run: x, exited with 1"'
                                            ' >&2\nexit 255')
    with pytest.raises(MedVLMError, match="dvc repro split stopped on a user error: bad argument"):
        pipeline.run_dvc_stage("split")
    with pytest.raises(RuntimeError, match="exit 255") as err:  # the stage's command crashed (exit 1): may pass
        pipeline.run_dvc_stage("split")
    assert not isinstance(err.value, MedVLMError) and len(calls.read_text().splitlines()) == 2


def test_a_transient_stage_failure_is_retried_and_passes(tmp_path, monkeypatch):
    """The real run_dvc_stage: DVC failing once (a lock held by another run: exit 1), then passing, is retried
    and the flow goes on through every stage."""
    from flows import pipeline

    calls = _stub_dvc(tmp_path, monkeypatch, 'if [ "$n" -eq 1 ]; then echo "ERROR: Unable to acquire lock" >&2; '
                                            'exit 1; fi\nexit 0')
    monkeypatch.setattr(pipeline.steps, "gpus", lambda: 0)
    result = pipeline.pipeline_flow(params=write_params(tmp_path))
    ran = [line.split()[-1] for line in calls.read_text().splitlines()]
    assert ran[:2] == ["synthesize", "synthesize"] and ran[2:] == [s["stage"] for s in result["stages"][1:]]
    assert ran[-1] == "register" and "monitor" not in ran


def _write_base(tmp: Path):
    from test_monitor import write_batch

    base = tmp / "phantom"
    rows = write_batch(base, 10, seed=1, prevalence=0.5)
    split = tmp / "split"
    split.mkdir()
    for name, part in (("train", rows[:8]), ("test", rows[8:])):
        (split / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return base, split


def test_retrain_ingests_keeps_the_test_set_and_runs_every_stage(tmp_path, monkeypatch):
    from flows import retrain
    from test_monitor import write_batch

    base, split = _write_base(tmp_path)
    write_batch(tmp_path / "incoming", 6, seed=7, prevalence=0.9, shift=30)
    params = write_params(tmp_path, data={"root": str(base), "label_names": ["pneumonia", "nodule"]},
                          split={"out_dir": str(split)}, monitor={"incoming_dir": str(tmp_path / "incoming")})
    calls = []

    def fake(name):
        def step(cfg, *args):
            calls.append((name, *args))
            assert Path(cfg.data.root) == tmp_path / "retrain" / "data"  # never the DVC-tracked data
            return {"challenger": "2", "decision": {"promoted": True, "reason": "beats"}} if name == "register" else {}
        return step

    for name in ("validate", "split", "features", "train", "train_labeler", "evaluate", "register"):
        monkeypatch.setattr(retrain.steps, name, fake(name))
    out = retrain.retrain_flow(params=params)
    assert [c[0] for c in calls] == ["validate", "split", "features", "train", "train", "train_labeler",
                                     "evaluate", "evaluate", "register"]
    manifest = [json.loads(line) for line in (tmp_path / "retrain" / "data" / "annotation.jsonl").read_text().splitlines()]
    assert len(manifest) == 16 and out["ingested"]["rows"] == 16
    assert sum(r["split"] == "test" for r in manifest) == 2  # the held-out studies stay held out
    assert all(r["split"] == "train" for r in manifest if r["images"][0].startswith("batches/"))
    root = tmp_path / "retrain" / "data"
    assert all((root / r["images"][0]).is_file() for r in manifest)
    again = retrain.ingest(retrain.load_cfg(params))  # the same batch twice: nothing added
    assert again["rows"] == 16 and again["batches"] == 1


@pytest.mark.parametrize("shifted", [False, True])
def test_monitor_triggers_retraining_only_on_drift(tmp_path, monkeypatch, shifted):
    from flows import monitor as monitor_flow_module
    from medvlm.monitor import pixel_embedding, run_monitor
    from test_monitor import write_batch

    base, split = _write_base(tmp_path)
    write_batch(base, 60, seed=1, prevalence=0.5)  # a larger reference
    (split / "train.jsonl").write_text((base / "annotation.jsonl").read_text())
    incoming = tmp_path / "incoming"
    if shifted:
        write_batch(incoming, 30, seed=3, prevalence=0.9, shift=40, noise=3.0, vocab_new=True)
    else:
        write_batch(incoming, 30, seed=2, prevalence=0.5)
    params = write_params(tmp_path, data={"root": str(base), "label_names": ["pneumonia", "nodule"]},
                          split={"out_dir": str(split)},
                          monitor={"incoming_dir": str(incoming), "out_dir": str(tmp_path / "drift"),
                                   "pca_components": 3})
    triggered = []
    monkeypatch.setattr(monitor_flow_module.steps, "monitor", lambda cfg, inc: run_monitor(
        cfg, inc, embed_fn=lambda ims: pixel_embedding(ims, 8), predictor=FakePredictor(0.0, ["pneumonia", "nodule"])))
    monkeypatch.setattr(monitor_flow_module.steps, "trigger", lambda name, p: triggered.append((name, p)) or "run-1")
    out = monitor_flow_module.monitor_flow(params=params)
    if shifted:
        assert out["action"] == "retrain_triggered" and out["flow_run_id"] == "run-1"
        assert triggered == [("retrain/medvlm-retrain", {"params": params, "overrides": None, "incoming_dir": None})]
    else:
        assert out["action"] == "none" and "no drift" in out["reason"] and triggered == []


def test_monitor_flow_on_an_empty_batch_does_nothing(tmp_path):
    from flows import monitor as monitor_flow_module

    (tmp_path / "incoming").mkdir()
    params = write_params(tmp_path, monitor={"incoming_dir": str(tmp_path / "incoming")})
    out = monitor_flow_module.monitor_flow(params=params)
    assert out["action"] == "none" and "empty" in out["reason"]
