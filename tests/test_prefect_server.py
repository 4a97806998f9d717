"""Integration: a real local Prefect server on 127.0.0.1 (random port, PREFECT_HOME in tmp), the deployments served
by flows/serve.py with the retrain cron from params, one triggered run, everything shut down in bounded time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration

CLIENT = """
import json, sys
from prefect import get_client
from prefect.deployments import run_deployment
with get_client(sync_client=True) as client:
    deadline = __import__("time").monotonic() + 60
    while True:  # serve registers the deployments one after another: wait for every one the run below needs
        try:
            dep = client.read_deployment_by_name("retrain/medvlm-retrain")
            client.read_deployment_by_name("monitor/medvlm-monitor"); break
        except Exception:
            if __import__("time").monotonic() > deadline: raise
            __import__("time").sleep(0.5)
    crons = [s.schedule.cron for s in dep.schedules]
run = run_deployment("monitor/medvlm-monitor", parameters={"params": sys.argv[1]}, timeout=120, poll_interval=1)
print(json.dumps({"crons": crons, "state": run.state.type.value, "name": run.state.name}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)  # the group holds only what this test started (start_new_session)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def test_served_deployments_on_a_local_server(tmp_path):
    started = time.monotonic()
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "incoming").mkdir()  # an empty batch: the served monitor run completes with "nothing monitored"
    raw["monitor"]["incoming_dir"] = str(tmp_path / "incoming")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server", "serve")}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=logs["server"], stderr=subprocess.STDOUT, start_new_session=True)
    runner = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        runner = subprocess.Popen([sys.executable, str(REPO / "flows" / "serve.py"), "--port", str(port),
                                   "--params", str(params)], env=env, stdout=logs["serve"],
                                  stderr=subprocess.STDOUT, start_new_session=True)
        out = subprocess.run([sys.executable, "-c", CLIENT, str(params)], env=env, capture_output=True, text=True,
                             timeout=150)
        assert out.returncode == 0, out.stderr[-3000:] + (tmp_path / "serve.log").read_text()[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["crons"] == [raw["retrain"]["cron"]]
        assert result["state"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        for proc in (runner, server):
            if proc is not None:
                stop(proc)
        for fh in logs.values():
            fh.close()
    assert server.poll() is not None and (runner is None or runner.poll() is not None)
    assert time.monotonic() - started < 150
