"""Screenshots of what a user of medvlm sees, for the README: docs/screenshots/*.png (listed in docs/screenshots.md).

    python docs/screenshots.py [--root DIR] [--out docs/screenshots] [--only NAME ...]     (or: make screenshots)

The inputs are the outputs of a finished pipeline run (`make run`) under --root (default: the current directory):

    examples.png            reports/examples.html: test-set reports and heatmaps (zoomed out to show the first)
    mlflow-run.png          the MLflow run of the registered model version (reports/registry.json, mlruns.db)
    mlflow-model.png        the registered model's page in the MLflow registry
    prefect-flow-run.png    a real run of the pipeline deployment (every task checks its DVC stage; all are up to date)
    prefect-deployment.png  the pipeline deployment's page
    drift.png               the Evidently drift report, reports/drift/drift.html
    data-docs.png           the Great Expectations Data Docs, reports/validation/docs/index.html
    data-docs-validation.png  their result page of the per-row suite (manifest_rows)

MLflow (`mlflow server`, on a copy of mlruns.db so the run's store is only read) and Prefect (`prefect server start`,
its database in a temporary folder, plus flows/serve.py serving the deployments) run on free localhost ports for the
time of the screenshots and are stopped afterwards. The flow run is refused when `dvc status` says a stage is out of
date: it would recompute that stage. Headless Chromium is Debian's (/usr/bin/chromium), driven by playwright
(docs/requirements-screenshots.txt); playwright's own browser download is never used. Each PNG is 1280x800,
optimized, and reduced to a 256-colour palette when it would exceed --max-kb.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM = "/usr/bin/chromium"
MAX_KB = 250
MIN_ZOOM = 0.7
QUIET = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
PIPELINE_DEPLOYMENT = "pipeline/medvlm-pipeline"  # flows/serve.py
# MLflow 3's UI: the "Model training" view of a run (not the GenAI one), its assistant panel closed
MLFLOW_UI_PREFS = """try {
  localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
} catch (e) {}"""
PREFECT_UI_PREFS = """try { localStorage.setItem('color-scheme', '"light"'); } catch (e) {}"""  # its default is dark
NAMES = ("examples", "mlflow-run", "mlflow-model", "prefect-flow-run", "prefect-deployment", "drift", "data-docs",
         "data-docs-validation")
ROW_SUITE = "manifest_rows"  # medvlm.data.validate's per-row suite: its result page is the one shown


class ScreenshotError(Exception):
    """One line: which input is missing or which service did not come up."""


@dataclass(frozen=True)
class Shot:
    """One screenshot: a local file (kind "file"), or a page of the MLflow or Prefect UI (a route filled in once
    the service runs). wait_for: a CSS selector or text= selector that shows the page has rendered; scroll_to:
    an element to bring into view first."""

    name: str
    kind: str  # "file" | "mlflow" | "prefect"
    target: str
    wait_for: str = "body"
    scroll_to: str | None = None
    what: str = ""
    init_script: str | None = None  # run before the page's own scripts (UI preferences in localStorage)
    fit: str | None = None  # an element that must be in the picture: the page is zoomed out (down to MIN_ZOOM) to fit


@dataclass
class Plan:
    root: Path
    shots: list[Shot]
    tracking_db: Path | None = None
    model_name: str | None = None
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)


def _need(path: Path, why: str) -> Path:
    if not path.exists():
        raise ScreenshotError(f"{path}: missing ({why}); run the pipeline there first (make run) or pass --root")
    return path


def plan(root: Path, only: list[str] | None = None) -> Plan:
    """The screenshots to take for the run outputs under root, checking that each input exists."""
    root = Path(root)
    wanted = set(only or NAMES)
    unknown = wanted - set(NAMES)
    if unknown:
        raise ScreenshotError(f"unknown screenshot(s) {', '.join(sorted(unknown))}; choose from {', '.join(NAMES)}")
    result = Plan(root=root, shots=[])
    shots = result.shots
    if "examples" in wanted:
        page = _need(root / "reports" / "examples.html", "the report stage writes it")
        shots.append(Shot("examples", "file", page.resolve().as_uri(), "table img", None, "test-set examples",
                          fit="img[alt=heatmap] + .p"))  # the first heatmap and its caption
    if wanted & {"mlflow-run", "mlflow-model"}:
        result.tracking_db = _need(root / "mlruns.db", "the MLflow tracking store of the register stage")
        registry = _need(root / "reports" / "registry.json", "the register stage writes it")
        try:
            summary = json.loads(registry.read_text(encoding="utf-8"))
            result.model_name = summary["model_name"]
            result.run_id = summary["registered"]["run_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ScreenshotError(f"{registry}: no model_name / registered.run_id ({exc})") from None
        if "mlflow-run" in wanted:
            shots.append(Shot("mlflow-run", "mlflow", "#/experiments/{experiment_id}/runs/{run_id}",
                              "text=About this run", None, f"MLflow run {result.run_id}", MLFLOW_UI_PREFS))
        if "mlflow-model" in wanted:
            name = urllib.parse.quote(result.model_name, safe="")
            shots.append(Shot("mlflow-model", "mlflow", f"#/models/{name}", "text=Version 1", None,
                              f"registered model {result.model_name}", MLFLOW_UI_PREFS))
    if wanted & {"prefect-flow-run", "prefect-deployment"}:
        _need(root / "flows" / "serve.py", "serves the Prefect deployments")
        _need(root / "dvc.lock", "the flow run only checks stages a finished run recorded")
        if "prefect-flow-run" in wanted:
            shots.append(Shot("prefect-flow-run", "prefect", "/runs/flow-run/{flow_run_id}", "text=Completed",
                              None, f"a run of {PIPELINE_DEPLOYMENT}", PREFECT_UI_PREFS))
        if "prefect-deployment" in wanted:
            shots.append(Shot("prefect-deployment", "prefect", "/deployments/deployment/{deployment_id}",
                              "text=medvlm-pipeline", None, f"deployment {PIPELINE_DEPLOYMENT}", PREFECT_UI_PREFS))
    if "drift" in wanted:
        drift_dir = _need(root / "reports" / "drift", "the monitor stage writes it")
        pages = sorted(drift_dir.glob("*.html"), key=lambda p: (p.name != "drift.html", p.name))
        if not pages:
            raise ScreenshotError(f"{drift_dir}: no drift report (*.html); run the monitor stage first")
        shots.append(Shot("drift", "file", pages[0].resolve().as_uri(), "body", None, f"Evidently {pages[0].name}"))
    docs = root / "reports" / "validation" / "docs"
    if "data-docs" in wanted:
        page = _need(docs / "index.html", "the validate stage writes it")
        shots.append(Shot("data-docs", "file", page.resolve().as_uri(), "table tbody tr", None, "GX Data Docs"))
    if "data-docs-validation" in wanted:
        pages = sorted((docs / "validations").glob("*/*/*/*.html"),
                       key=lambda p: (p.relative_to(docs / "validations").parts[0] != ROW_SUITE, str(p)))
        if not pages:
            raise ScreenshotError(f"{docs / 'validations'}: no validation result page; run the validate stage first")
        shots.append(Shot("data-docs-validation", "file", pages[0].resolve().as_uri(), "text=Overview", None,
                          f"GX validation result {pages[0].relative_to(docs)}"))
    return result


# ---------------------------------------------------------------- services
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **QUIET, **extra}
    bin_dir = str(Path(sys.executable).parent)  # mlflow, prefect, dvc of this interpreter's environment
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _get_json(url: str, data: dict | None = None, timeout: float = 10.0):
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"},
                                     method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def _wait_until(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ScreenshotError(f"{what}: exited with {proc.returncode} before it was ready{_tail(log)}")
        try:
            value = check()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
            pass
        time.sleep(1.0)
    raise ScreenshotError(f"{what}: not ready after {timeout:.0f} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.is_file():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f" (see {log}: {lines[-1].strip()[:200]})" if lines else f" (see {log})"


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]):
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:  # the whole process group: servers start workers of their own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def mlflow_server(p: Plan, work: Path, timeout: float):
    """`mlflow server` on a copy of the run's mlruns.db; yields (base URL, {experiment_id, run_id})."""
    store = work / "mlruns.db"
    shutil.copyfile(p.tracking_db, store)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    log = work / "mlflow.log"
    with _process(cmd, log, p.root, _env()) as proc:  # cwd root: relative artifact locations resolve there
        _wait_until("mlflow server", lambda: urllib.request.urlopen(f"{url}/health", timeout=5).status == 200,
                    timeout, proc, log)
        run = _get_json(f"{url}/api/2.0/mlflow/runs/get?run_id={p.run_id}")["run"]
        yield url, {"experiment_id": run["info"]["experiment_id"], "run_id": p.run_id}


@contextlib.contextmanager
def prefect_server(p: Plan, work: Path, timeout: float, flow_timeout: float):
    """A Prefect server (database under work/), flows/serve.py serving the root's deployments, and one finished
    run of the pipeline deployment; yields (base URL, {flow_run_id, deployment_id})."""
    _check_dvc_up_to_date(p.root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = work / "prefect-home"
    home.mkdir()
    # the UI asks the API at PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says
    server_env = _env(PREFECT_HOME=str(home), PREFECT_UI_API_URL=f"{url}/api", PREFECT_SERVER_API_HOST="127.0.0.1",
                      PREFECT_SERVER_API_PORT=str(port))
    server_env.pop("PREFECT_API_URL", None)
    client_env = _env(PREFECT_HOME=str(home), PREFECT_API_URL=f"{url}/api")
    server_cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    serve_cmd = [sys.executable, str(p.root / "flows" / "serve.py"), "--port", str(port)]
    with _process(server_cmd, work / "prefect-server.log", p.root, server_env) as server:
        _wait_until("prefect server", lambda: _get_json(f"{url}/api/health") is True, timeout, server,
                    work / "prefect-server.log")
        with _process(serve_cmd, work / "prefect-serve.log", p.root, client_env) as serve:
            flow_name, _, name = PIPELINE_DEPLOYMENT.partition("/")
            deployment = _wait_until(
                f"{PIPELINE_DEPLOYMENT} (flows/serve.py)",
                lambda: _get_json(f"{url}/api/deployments/name/{flow_name}/{name}"), timeout, serve,
                work / "prefect-serve.log")
            run = _get_json(f"{url}/api/deployments/{deployment['id']}/create_flow_run", {})
            print(f"  prefect: flow run {run['name']} of {PIPELINE_DEPLOYMENT} ...", flush=True)
            state = _wait_until(f"flow run {run['name']}", lambda: _finished(url, run["id"]), flow_timeout, serve,
                                work / "prefect-serve.log")
            if state != "COMPLETED":
                raise ScreenshotError(f"flow run {run['name']} of {PIPELINE_DEPLOYMENT} ended {state}; see "
                                      f"{work / 'prefect-serve.log'}")
            yield url, {"flow_run_id": run["id"], "deployment_id": deployment["id"]}


def _finished(url: str, flow_run_id: str) -> str | None:
    state = (_get_json(f"{url}/api/flow_runs/{flow_run_id}").get("state") or {}).get("type")
    return state if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None


def _check_dvc_up_to_date(root: Path) -> None:
    proc = subprocess.run(["dvc", "status", "--quiet"], cwd=root, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ScreenshotError(f"{root}: `dvc status` reports stages out of date{': ' + detail[-1] if detail else ''}"
                              "; the pipeline flow run would recompute them (run `make run` there first)")


# ---------------------------------------------------------------- browser
def optimize_png(path: Path, max_kb: int = MAX_KB) -> int:
    """Re-save optimized; reduce to a 256-colour palette when still above max_kb. Returns the size in bytes."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    rgb.save(path, optimize=True)
    if path.stat().st_size > max_kb * 1024:
        rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path.stat().st_size


def _zoom_to_fit(page, selector: str) -> None:
    """Zoom the page out so that the first `selector` element ends inside the viewport (not below MIN_ZOOM; past
    that it is scrolled into view instead)."""
    bottom = page.evaluate("(sel) => { const el = document.querySelector(sel);"
                           " return el ? el.getBoundingClientRect().bottom + window.scrollY : null; }", selector)
    room = VIEWPORT["height"] - 12
    if bottom is None or bottom <= room:
        return
    zoom = max(MIN_ZOOM, room / bottom)
    page.evaluate("(z) => { document.documentElement.style.zoom = String(z); }", zoom)
    if zoom * bottom > room:
        page.locator(selector).first.scroll_into_view_if_needed()


def take(shots: list[tuple[Shot, str]], out: Path, chromium: str, max_kb: int) -> dict[str, int]:
    from playwright.sync_api import sync_playwright

    sizes = {}
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root: Chromium's sandbox off
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=args)
        try:
            for shot, url in shots:
                context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, color_scheme="light")
                if shot.init_script:
                    context.add_init_script(shot.init_script)
                page = context.new_page()
                page.goto(url, wait_until="load", timeout=180_000)
                with contextlib.suppress(Exception):  # a page that keeps polling never goes idle
                    page.wait_for_load_state("networkidle", timeout=15_000)
                try:
                    page.locator(f"{shot.wait_for} >> visible=true").first.wait_for(timeout=120_000)
                except Exception as exc:  # noqa: BLE001 - playwright's TimeoutError, one line
                    raise ScreenshotError(f"{shot.name}: {url} never showed {shot.wait_for!r} "
                                          f"({type(exc).__name__})") from None
                if shot.fit:
                    _zoom_to_fit(page, shot.fit)
                if shot.scroll_to:
                    page.locator(shot.scroll_to).first.scroll_into_view_if_needed()
                page.wait_for_timeout(1500)  # fonts, charts and transitions settle
                path = out / f"{shot.name}.png"
                page.screenshot(path=str(path))
                context.close()
                sizes[shot.name] = optimize_png(path, max_kb)
                print(f"  {path}  {sizes[shot.name] / 1024:.0f} KB  ({shot.what})", flush=True)
        finally:
            browser.close()
    return sizes


def run(root: Path, out: Path, only: list[str] | None, chromium: str, max_kb: int, timeout: float,
        flow_timeout: float) -> dict[str, int]:
    p = plan(root, only)
    if not Path(chromium).is_file():
        raise ScreenshotError(f"{chromium}: no Chromium there (Debian: apt-get install chromium) or pass --chromium")
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="medvlm-screenshots-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        resolved: list[tuple[Shot, str]] = []
        mlflow = [s for s in p.shots if s.kind == "mlflow"]
        prefect = [s for s in p.shots if s.kind == "prefect"]
        if mlflow:
            url, ids = stack.enter_context(mlflow_server(p, work, timeout))
            resolved += [(s, f"{url}/{s.target.format(**ids)}") for s in mlflow]
        if prefect:
            url, ids = stack.enter_context(prefect_server(p, work, timeout, flow_timeout))
            resolved += [(s, f"{url}{s.target.format(**ids)}") for s in prefect]
        resolved += [(s, s.target) for s in p.shots if s.kind == "file"]
        order = {s.name: i for i, s in enumerate(p.shots)}
        sizes = take(sorted(resolved, key=lambda r: order[r[0].name]), out, chromium, max_kb)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="checkout with a finished pipeline run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "screenshots")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="just these screenshots")
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--max-kb", type=int, default=MAX_KB, help="palette-reduce a PNG above this size")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for a server to come up")
    parser.add_argument("--flow-timeout", type=float, default=900, help="seconds for the Prefect flow run")
    args = parser.parse_args(argv)
    try:
        sizes = run(args.root.resolve(), args.out, args.only, args.chromium, args.max_kb, args.timeout,
                    args.flow_timeout)
    except ScreenshotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(sizes)} screenshots in {args.out}, largest {max(sizes.values()) / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
