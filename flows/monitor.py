"""Drift monitoring as a Prefect flow: run the Evidently monitor on the incoming batch; when drift passes
monitor.drift_share, trigger the retraining deployment (retrain.deployment) with run_deployment, otherwise record
that nothing happened. Both outcomes leave a markdown artifact, so "why did (not) it retrain" has an answer."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.pipeline import load_cfg  # noqa: E402
from medvlm.errors import DataError  # noqa: E402


def trigger_retraining(deployment: str, parameters: dict) -> str:
    """Start the retraining deployment and return at once (timeout=0): the monitor must not wait for training."""
    from prefect.deployments import run_deployment

    run = run_deployment(name=deployment, parameters=parameters, timeout=0, as_subflow=False)
    return str(run.id)


def _run_monitor(cfg, incoming_dir=None):
    from medvlm.monitor import run_monitor

    return run_monitor(cfg, incoming_dir)


@dataclass
class MonitorSteps:
    monitor: Callable = _run_monitor
    trigger: Callable[[str, dict], str] = trigger_retraining


steps = MonitorSteps()


@flow(name="monitor", log_prints=True)
def monitor_flow(params: str = "params.yaml", overrides: list[str] | None = None, incoming_dir: str | None = None) -> dict:
    cfg = load_cfg(params, overrides)
    log = get_run_logger()
    try:
        summary = steps.monitor(cfg, incoming_dir)
    except DataError as exc:  # an empty or missing batch is a normal "nothing to do", not a failed flow
        create_markdown_artifact(key="medvlm-drift", markdown=f"# Drift check\n\nNothing monitored: {exc}\n")
        return {"action": "none", "reason": str(exc)}
    drifted = [name for name, f in summary["features"].items() if f["drifted"]]
    verdict = (f"share of drifted features {summary['drifted_share']:.2f} "
               f"({'>=' if summary['drift_detected'] else '<'} monitor.drift_share {cfg.monitor.drift_share})")
    if summary["drift_detected"]:
        run_id = steps.trigger(cfg.retrain.deployment, {"params": params, "overrides": overrides,
                                                        "incoming_dir": incoming_dir})
        action = {"action": "retrain_triggered", "deployment": cfg.retrain.deployment, "flow_run_id": run_id}
        log.info("drift detected (%s): triggered %s, flow run %s", verdict, cfg.retrain.deployment, run_id)
    else:
        action = {"action": "none", "reason": f"no drift: {verdict}"}
        log.info("no drift (%s): nothing triggered", verdict)
    create_markdown_artifact(
        key="medvlm-drift",
        markdown=(f"# Drift check\n\n{verdict}\n\ndrifted: {', '.join(drifted) or 'none'}\n\n"
                  f"action: **{action['action']}**\n\nreport: {summary['outputs']['html']}\n"),
    )
    return {**action, "drift_detected": summary["drift_detected"], "drifted_share": summary["drifted_share"],
            "drifted_features": drifted}


if __name__ == "__main__":
    print(json.dumps(monitor_flow(), indent=2, default=str))
