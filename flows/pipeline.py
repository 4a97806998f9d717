"""The training pipeline as a Prefect flow: synthesize -> validate -> split -> features -> train@strategy ->
train_labeler -> evaluate@strategy (+ baselines) -> report -> register, with a results table as an artifact.
The order is read from dvc.yaml (`dvc_stage_order`), never kept here as a second copy; `monitor` is left to its
own flow (flows/monitor.py).

Each task runs its DVC stage (`dvc repro --single-item <stage>`), so DVC's cache and dvc.lock stay the one record
of what was computed from what: a stage whose inputs did not change is skipped by DVC, and `dvc repro` by hand
and this flow can never disagree. Prefect adds what DVC lacks: retries of transient failures, a UI, schedules,
and concurrency. A stage whose command stops on a user error (medvlm's exit code 2: a ConfigError or DataError,
one line) raises StageFailed, which is not retried; any other failure may be transient and is. DVC holds one
repository lock per `dvc repro`, so with several GPUs the strategies train as concurrent `medvlm train` processes
(one GPU each) and `dvc commit` then records their outputs in dvc.lock; on CPU or one GPU they run one after the
other through DVC.

Every step is a plain function in `steps` (tests swap them for fakes).
"""

from __future__ import annotations

import heapq
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # `python flows/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from medvlm.config import Config, load_config  # noqa: E402
from medvlm.errors import ConfigError, MedVLMError, StageFailed  # noqa: E402

DVC = "dvc"  # found on the stages' PATH (_venv_env)
DVC_YAML = REPO / "dvc.yaml"
OWN_FLOW = {"monitor"}  # dvc.yaml stages this flow leaves out: the drift monitor runs as its own flow
USER_ERROR_EXIT = 2  # medvlm's CLI exit code for a MedVLMError (medvlm.cli.user_errors)


def _venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """DVC stage commands call `medvlm`: put this interpreter's bin folder on PATH, first unless the caller's PATH
    already has it (then the caller's order stands)."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = f"{bin_dir}{os.pathsep}{path}"
    env.update(extra or {})
    return env


def stage_error(what: str, code: int, output: str | None) -> Exception:
    """The error for a failed stage command: StageFailed (not retried) for a user error, RuntimeError otherwise.

    A user error is exit code 2, from the command itself or, through `dvc repro` (which exits 255 for a failed
    stage), named on DVC's last line ("failed to run: <cmd>, exited with 2"); its message is the CLI's one line.
    """
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in (output or "").splitlines()]
    lines = [line for line in lines if line]
    tail = lines[-1] if lines else "no output"
    stage_exit = re.search(r"exited with (-?\d+)\W*$", tail)
    if code == USER_ERROR_EXIT or (stage_exit and int(stage_exit.group(1)) == USER_ERROR_EXIT):
        said = next((line for line in reversed(lines) if line.startswith("error:")), None)
        reason = said.removeprefix("error:").strip() if said else f"exit {USER_ERROR_EXIT}, see its output"
        return StageFailed(f"{what} stopped on a user error: {reason}")
    return RuntimeError(f"{what} failed (exit {code}): {tail}")


def run_dvc_stage(stage: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([DVC, "repro", "--single-item", stage], cwd=REPO, env=_venv_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise stage_error(f"dvc repro {stage}", proc.returncode, proc.stderr or proc.stdout)
    return {"stage": stage, "seconds": round(time.perf_counter() - started, 1)}


def train_on_gpu(strategy: str, gpu: int) -> dict:
    """One strategy on one GPU outside DVC's repository lock (recorded afterwards by `dvc commit`)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medvlm.cli", "train", "--strategy", strategy], cwd=REPO,
                          env=_venv_env({"CUDA_VISIBLE_DEVICES": str(gpu)}))  # its output goes to the console
    if proc.returncode != 0:
        raise stage_error(f"medvlm train --strategy {strategy}", proc.returncode, None)
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


def dvc_stage_order(cfg: Config, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """Every stage of dvc.yaml, a foreach group expanded as DVC does (name@item for a list of plain values,
    name@key for a mapping, name@index for a list of mappings; `${...}` read from cfg), ordered so that a stage
    comes after every stage whose outputs (outs, metrics, plots) it depends on; otherwise in the file's order."""
    raw = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}
    params = cfg.model_dump(by_alias=True, mode="json")
    stages: dict[str, tuple[list[str], list[str]]] = {}  # name -> (deps, outputs)
    for name, spec in (raw.get("stages") or {}).items():
        if "matrix" in spec:
            raise ConfigError(f"{dvc_yaml}: stage {name}: matrix stages are not supported by the pipeline flow")
        if "foreach" not in spec:
            stages[name] = _stage_paths(spec, params)
            continue
        group = _interpolate(spec["foreach"], params)
        if isinstance(group, dict):
            items = [(_dvc_str(k), v) for k, v in group.items()]
        elif any(isinstance(v, (dict, list)) for v in group):
            items = [(str(i), v) for i, v in enumerate(group)]
        else:
            items = [(_dvc_str(v), v) for v in group]
        for key, item in items:
            stages[f"{name}@{key}"] = _stage_paths(spec["do"], {**params, "item": item, "key": key})

    names = list(stages)
    after: dict[str, set[str]] = {n: set() for n in names}  # stage -> the stages that read its outputs
    waits = {n: 0 for n in names}
    for up in names:
        for down in names:
            if up != down and any(_overlap(o, d) for o in stages[up][1] for d in stages[down][0]):
                after[up].add(down)
                waits[down] += 1
    ready = [(i, n) for i, n in enumerate(names) if waits[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for down in after[name]:
            waits[down] -= 1
            if waits[down] == 0:
                heapq.heappush(ready, (names.index(down), down))
    if len(order) != len(names):
        raise ConfigError(f"{dvc_yaml}: the stages' deps and outs form a cycle: {sorted(set(names) - set(order))}")
    return order


def _stage_paths(spec: dict, ctx: dict) -> tuple[list[str], list[str]]:
    def path(entry: Any) -> str:  # "path" or {"path": {options}}
        return str(_interpolate(next(iter(entry)) if isinstance(entry, dict) else entry, ctx))

    deps = [path(d) for d in spec.get("deps") or []]
    outs = [path(o) for key in ("outs", "metrics", "plots") for o in spec.get(key) or []]
    return deps, outs


def _interpolate(value: Any, ctx: dict) -> Any:
    """DVC's `${a.b}`: a whole-string reference keeps the value's type (a list for foreach), else it is text."""
    if not isinstance(value, str):
        return value
    whole = re.fullmatch(r"\$\{\s*([^}]+?)\s*\}", value)
    if whole:
        return _lookup(ctx, whole.group(1))
    return re.sub(r"\$\{\s*([^}]+?)\s*\}", lambda m: _dvc_str(_lookup(ctx, m.group(1))), value)


def _lookup(ctx: dict, dotted: str) -> Any:
    value: Any = ctx
    for part in dotted.split("."):
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ConfigError(f"dvc.yaml: ${{{dotted}}} is not in params") from None
    return value


def _dvc_str(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _overlap(a: str, b: str) -> bool:
    """The same path, or one inside the other (a folder output and a file dep in it, or the reverse)."""
    a, b = a.strip("/").removeprefix("./"), b.strip("/").removeprefix("./")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


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
    from medvlm.selection import metric_ci, metric_value

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


def _train_concurrently(strategies: list[str], gpus: int, cfg: Config, log) -> list[dict]:
    log.info("%d GPUs visible: training %s concurrently", gpus, strategies)
    gpu_train = with_retries(gpu_train_task, cfg)
    futures = [gpu_train.submit(s, i % gpus) for i, s in enumerate(strategies)]
    done = [f.result() for f in futures]
    return done + [steps.commit_stage(f"train@{s}") for s in strategies]


def with_retries(task_obj, cfg: Config):
    return task_obj.with_options(retries=cfg.retrain.task_retries, retry_delay_seconds=cfg.retrain.retry_delay_s)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    cfg = load_cfg(params, overrides)
    log = get_run_logger()
    stage = with_retries(stage_task, cfg)
    done: list[dict] = []
    order = [name for name in dvc_stage_order(cfg) if name.split("@", 1)[0] not in OWN_FLOW]
    trains = [name for name in order if name.startswith("train@")]
    gpus = None
    for name in order:
        if name in trains:
            gpus = steps.gpus() if gpus is None else gpus
            if gpus > 1:  # the train stages all at once, at the first one's place
                if name == trains[0]:
                    done += _train_concurrently([t.split("@", 1)[1] for t in trains], gpus, cfg, log)
                continue
        done.append(stage(name))
    table = results_markdown(cfg, list(cfg.train.strategies) + list(cfg.evaluate.baselines))
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
