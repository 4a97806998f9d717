"""Serve the flows as deployments against a running Prefect server (what `make serve-flows` runs):

    pipeline/medvlm-pipeline   on demand
    retrain/medvlm-retrain     cron retrain.cron (params.yaml), also started by the drift monitor
    monitor/medvlm-monitor     on demand (or give it a schedule in the UI)

Cron schedules fire only with a real server (`prefect server start`); against Prefect's ephemeral API they never
do, so this points PREFECT_API_URL at http://127.0.0.1:<--port>/api unless it is already set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.monitor import monitor_flow  # noqa: E402
from flows.pipeline import load_cfg, pipeline_flow  # noqa: E402
from flows.retrain import retrain_flow  # noqa: E402


def deployments(params: str = "params.yaml"):
    cfg = load_cfg(params)
    flow_name, _, deployment_name = cfg.retrain.deployment.partition("/")
    if flow_name != retrain_flow.name:
        raise SystemExit(f"retrain.deployment {cfg.retrain.deployment!r} must start with {retrain_flow.name}/")
    shared = {"parameters": {"params": params}}
    return [
        pipeline_flow.to_deployment(name="medvlm-pipeline", **shared),
        retrain_flow.to_deployment(name=deployment_name, cron=cfg.retrain.cron, **shared),
        monitor_flow.to_deployment(name="medvlm-monitor", **shared),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4200, help="port of the Prefect server on 127.0.0.1")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_API_URL", f"http://127.0.0.1:{args.port}/api")
    os.chdir(REPO)  # DVC stages and relative params paths are repository-relative
    from prefect import serve

    serve(*deployments(args.params))


if __name__ == "__main__":
    main()
