"""The training pipeline as a Prefect flow: synthesize -> validate -> split -> features -> train@strategy ->
train_labeler -> evaluate@strategy (+ baselines) -> report -> register, with a results table as an artifact.

Each task runs its DVC stage (`dvc repro --single-item <stage>`), so DVC's cache and dvc.lock stay the one record
of what was computed from what: a stage whose inputs did not change is skipped by DVC, and `dvc repro` by hand
and this flow can never disagree. Prefect adds what DVC lacks: retries of transient failures, a UI, schedules,
and concurrency. DVC holds one repository lock per `dvc repro`, so with several GPUs the strategies train as
concurrent `medvlm train` processes (one GPU each) and `dvc commit` then records their outputs in dvc.lock; on CPU
or one GPU they run one after the other through DVC.

Every step is a plain function in `steps` (tests swap them for fakes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # `python flows/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from medvlm.config import Config, load_config  # noqa: E402
from medvlm.errors import MedVLMError  # noqa: E402


def _venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """DVC stage commands call `medvlm`: put this interpreter's bin folder first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run_dvc_stage(stage: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=REPO, env=_venv_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"dvc repro {stage} failed (exit {proc.returncode}): {tail[0]}")
    return {"stage": stage, "seconds": round(time.perf_counter() - started, 1)}


def train_on_gpu(strategy: str, gpu: int) -> dict:
    """One strategy on one GPU outside DVC's repository lock (recorded afterwards by `dvc commit`)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medvlm.cli", "train", "--strategy", strategy], cwd=REPO,
                   env=_venv_env({"CUDA_VISIBLE_DEVICES": str(gpu)}), check=True)
    return {"stage": f"train@{strategy}", "gpu": gpu, "seconds": round(time.perf_counter() - started, 1)}


def commit_dvc_stage(stage: str) -> dict:
    subprocess.run(["dvc", "commit", "--force", stage], cwd=REPO, env=_venv_env(), check=True, capture_output=True)
    return {"stage": stage, "committed": True}


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class PipelineSteps:
    run_stage: Callable[[str], dict] = run_dvc_stage
    train_on_gpu: Callable[[str, int], dict] = train_on_gpu
    commit_stage: Callable[[str], dict] = commit_dvc_stage
    gpus: Callable[[], int] = visible_gpus


steps = PipelineSteps()


def load_cfg(params: str = "params.yaml", overrides: list[str] | None = None) -> Config:
    path = Path(params)
    return load_config(path if path.is_absolute() else REPO / path, overrides=overrides or [])


def transient(task_obj, task_run, state) -> bool:
    """Retry condition: a MedVLMError is a data or configuration problem that a retry cannot fix."""
    try:
        state.result()
    except MedVLMError:
        return False
    except Exception:  # noqa: BLE001 - any other failure (process, I/O, lock contention) may pass on retry
        return True
    return False


@task(task_run_name="{stage}", retry_condition_fn=transient)
def stage_task(stage: str) -> dict:
    return steps.run_stage(stage)


@task(task_run_name="train@{strategy}-gpu{gpu}", retry_condition_fn=transient)
def gpu_train_task(strategy: str, gpu: int) -> dict:
    return steps.train_on_gpu(strategy, gpu)


def results_markdown(cfg: Config, names: list[str]) -> str:
    from medvlm.registry import metric_ci, metric_value

    primary, tie = cfg.register.primary_metric, cfg.register.tie_break
    lines = [f"| model | {primary} | CI | {tie} |", "|---|---|---|---|"]
    for name in names:
        path = Path(cfg.evaluate.out_dir) / "metrics" / f"{name}.json"
        if not path.is_file():
            lines.append(f"| {name} | (no metrics) | | |")
            continue
        metrics = json.loads(path.read_text(encoding="utf-8"))
        value, ci, tb = metric_value(metrics, primary), metric_ci(metrics, primary), metric_value(metrics, tie)
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "n/a"
        lines.append(f"| {name} | {fmt(value)} | {ci_text} | {fmt(tb)} |")
    return "\n".join(lines)


def with_retries(task_obj, cfg: Config):
    return task_obj.with_options(retries=cfg.retrain.task_retries, retry_delay_seconds=cfg.retrain.retry_delay_s)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    cfg = load_cfg(params, overrides)
    log = get_run_logger()
    stage = with_retries(stage_task, cfg)
    done: list[dict] = []
    for name in ("synthesize", "validate", "split", "features", "pretrain_vision"):  # the last: a marker when off
        done.append(stage(name))
    strategies = list(cfg.train.strategies)
    gpus = steps.gpus()
    if gpus > 1:
        log.info("%d GPUs visible: training %s concurrently", gpus, strategies)
        gpu_train = with_retries(gpu_train_task, cfg)
        futures = [gpu_train.submit(s, i % gpus) for i, s in enumerate(strategies)]
        done += [f.result() for f in futures]
        done += [steps.commit_stage(f"train@{s}") for s in strategies]
    else:
        done += [stage(f"train@{s}") for s in strategies]
    done.append(stage("train_labeler"))
    done += [stage(f"evaluate@{s}") for s in strategies]
    done += [stage(f"baseline@{b}") for b in cfg.evaluate.baselines]
    done.append(stage("report"))
    done.append(stage("register"))
    table = results_markdown(cfg, strategies + list(cfg.evaluate.baselines))
    registry = Path(cfg.evaluate.out_dir) / "registry.json"
    decision = json.loads(registry.read_text())["decision"] if registry.is_file() else {"reason": "no registry.json"}
    create_markdown_artifact(
        key="medvlm-results",
        markdown=f"# MedVLM pipeline results\n\n{table}\n\n**Registry:** {decision.get('reason')}\n",
        description="test-split metrics per model (CIs: bootstrap)",
    )
    return {"stages": done, "results": table, "registry": decision}


if __name__ == "__main__":
    print(json.dumps(pipeline_flow(), indent=2, default=str))
