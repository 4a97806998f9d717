"""The `medvlm` command line: one command per pipeline stage, plus generate / serve for users.

Every command is a thin shell around the one stage function in src/medvlm (the same function dvc.yaml and the
Prefect flows call). Heavy imports (torch, transformers, mlflow...) happen inside the commands so `medvlm --help`
stays instant. A MedVLMError (user mistake, bad data) prints one line and exits with code 2, no traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from medvlm.errors import MedVLMError


class _App(typer.Typer):
    """The top-level app. After a command that set _state["exit_now"] (generate), the process ends without the
    interpreter's module teardown: once torch is imported that teardown alone costs ~0.7 s of a `medvlm generate`
    (measured, bench/generate_cli.py) and frees nothing a finished process needs. Exit handlers still run and
    output is flushed first. Only the console entry goes through here: CliRunner (the tests) calls the command."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exc:
            if _state.get("exit_now"):
                _exit_now(exc.code)
            raise


def _exit_now(code) -> None:
    """sys.exit(code) minus the module teardown: atexit handlers, flushed streams, then os._exit. Falls back to
    the normal exit while another thread still runs (os._exit would cut it off)."""
    import atexit
    import threading

    if threading.active_count() > 1:
        return
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit("message") prints
        code = 1
    atexit._run_exitfuncs()  # logging.shutdown and any library's handlers, as a normal exit runs them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: a normal exit would not report it either
            pass
    os._exit(code)


app = _App(add_completion=False, no_args_is_help=True, help="MedVLM radiology report generation + MLOps.")
data_app = typer.Typer(no_args_is_help=True, help="Data: synthesize, validate, split, fetch.")
app.add_typer(data_app, name="data")
experiment_app = typer.Typer(no_args_is_help=True, help="Grids of training runs: strategy x ablation x seed.")
app.add_typer(experiment_app, name="experiment")

console = Console(stderr=True)
_state: dict = {"params": "params.yaml", "overlays": [], "overrides": [], "out_root": None}


@app.callback()
def main(
    params: Path = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (the single source of settings)"),
    overlay: list[Path] = typer.Option([], "--overlay", "-o", help="profile file merged over params (e.g. params/gpu.yaml)"),
    set_: list[str] = typer.Option([], "--set", "-S", help="override one setting: section.key=value (repeatable)"),
    out_root: Optional[Path] = typer.Option(
        None, "--out-root", help="write what a training run writes (models, checkpoints, pretraining, evaluation and "
        "drift reports) under this folder instead; the data stages' outputs (split, features, labeler) are read "
        "where params put them"),
) -> None:
    _state.update(params=params, overlays=list(overlay), overrides=list(set_), out_root=out_root)


def _config():
    from medvlm.config import load_config

    cfg = load_config(_state["params"], _state["overlays"], _state["overrides"])
    if _state["out_root"] is not None:
        from medvlm.paths import RUN_OUTPUTS, rebase_outputs

        cfg = rebase_outputs(cfg, _state["out_root"], RUN_OUTPUTS)
    return cfg


def user_errors(fn: Callable) -> Callable:
    """Turn MedVLMError into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedVLMError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _print_summary(summary) -> None:
    if summary is not None:
        typer.echo(json.dumps(summary, indent=2, default=str))


# ---------------------------------------------------------------- data
@app.command()
@user_errors
def synthesize() -> None:
    """Write the embedded phantom CT data set (and the shifted incoming batch)."""
    from medvlm.data.synthesize import synthesize as run

    _print_summary(run(_config()))


@data_app.command("validate")
@user_errors
def data_validate() -> None:
    """Validate the manifest with Great Expectations; bad rows go to quarantine."""
    from medvlm.data.validate import run_validation

    _print_summary(run_validation(_config()))


@data_app.command("split")
@user_errors
def data_split() -> None:
    """Seeded, stratified, grouped train/test split."""
    from medvlm.data.split import run_split

    _print_summary(run_split(_config()))


@data_app.command("fetch")
@user_errors
def data_fetch(
    name: str = typer.Argument(..., help="data set name, e.g. cov-ctr"),
    dest: Optional[Path] = typer.Option(None, help="target folder (default data/<name>)"),
    base_url: Optional[str] = typer.Option(None, help="mirror to download from instead of the public sources"),
) -> None:
    """Download a public data set with checksum verification."""
    from medvlm.data.fetch import fetch_dataset

    kwargs = {"base_url": base_url} if base_url else {}
    path = fetch_dataset(name, dest or Path("data") / name.replace("-", "_"), **kwargs)
    typer.echo(str(path))


# ---------------------------------------------------------------- model
@app.command()
@user_errors
def features() -> None:
    """Cache frozen vision-trunk features of the split (what makes CPU training affordable)."""
    from medvlm.features import extract_features

    _print_summary(extract_features(_config()))


@app.command()
@user_errors
def train(
    strategy: str = typer.Option(..., "--strategy", "-s", help="a module of medvlm.strategies: freeze | lora | ptuning_v2 ..."),
    resume: bool = typer.Option(True, help="resume from the last checkpoint when there is one"),
    stop_after: Optional[int] = typer.Option(None, hidden=True, help="end after this many steps, as a kill would (tests)"),
) -> None:
    """Train MedVLM with one fine-tuning strategy (several processes: torchrun / accelerate launch, see README)."""
    from medvlm.train import train as run

    summary = run(_config(), strategy, resume=resume, stop_after=stop_after)
    if os.environ.get("RANK", "0") == "0":  # data parallel: one summary, not one per process
        _print_summary(summary)


@app.command("pretrain-vision")
@user_errors
def pretrain_vision() -> None:
    """Contrastive (CLIP-style) pre-training of the vision tail against report text; off unless pretrain.enabled."""
    from medvlm.pretrain import pretrain_vision as run

    _print_summary(run(_config()))


@app.command("train-labeler")
@user_errors
def train_labeler() -> None:
    """Train the report labeler (MiniLM encoder + per-label heads) on the training reports."""
    from medvlm.labeler import train_labeler as run

    _print_summary(run(_config()))


@app.command()
@user_errors
def evaluate(name: str = typer.Argument(..., help="a trained strategy or a baseline name")) -> None:
    """Generate reports for the test split and score them (metrics with CIs, clinical efficacy)."""
    from medvlm.evaluate import evaluate as run

    _print_summary(run(_config(), name))


@app.command()
@user_errors
def report() -> None:
    """Aggregate every evaluation into reports/results.md, plots and the examples page."""
    from medvlm.report import build_report

    _print_summary(build_report(_config()))


@app.command("report-ablation")
@user_errors
def report_ablation(
    variants: list[str] = typer.Argument(..., help="variant names: folders under --root"),
    strategy: str = typer.Option("freeze", help="the strategy the variants re-train"),
    root: Path = typer.Option(Path("runs/ablation"), help="the variants' runs: <root>/<variant> is a --out-root"),
) -> None:
    """Table of the full model vs its ablation variants -> reports/ablation.md."""
    from medvlm.report import build_ablation_table

    typer.echo(str(build_ablation_table(_config(), strategy, variants, root)))


# ---------------------------------------------------------------- experiments
@experiment_app.command("run")
@user_errors
def experiment_run(
    only: list[str] = typer.Option([], "--only", help="run only cells whose strategy/variant/seedK starts with this"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the grid and what is still to run"),
) -> None:
    """Run the missing cells of the experiment grid (params `experiment:`) and write its results table."""
    from medvlm.experiment import run_experiment

    _print_summary(run_experiment(_config(), only=only or None, dry_run=dry_run,
                                  log=lambda line: console.print(line, highlight=False)))


@experiment_app.command("table")
@user_errors
def experiment_table() -> None:
    """Rewrite <root>/results.md from the cells finished so far."""
    from medvlm.experiment import write_results

    typer.echo(str(write_results(_config())))


@experiment_app.command("compare")
@user_errors
def experiment_compare(
    names: list[str] = typer.Argument(..., help="experiment names under experiment.out_root"),
    out: Path = typer.Option(Path("reports/experiments.md"), help="markdown file to write"),
    title: str = typer.Option("Experiments", help="document title"),
    note: list[str] = typer.Option([], "--note", help="a paragraph under the title (repeatable)"),
) -> None:
    """One document over several experiments, published figures beside ours, goals checked."""
    from medvlm.experiment_report import compare_experiments

    typer.echo(str(compare_experiments(_config(), names, out, title, notes=note)))


# ---------------------------------------------------------------- lifecycle
@app.command()
@user_errors
def register() -> None:
    """Register the best model in MLflow as challenger; promote to champion if it beats the champion."""
    from medvlm.registry import register as run

    _print_summary(run(_config()))


@app.command()
@user_errors
def promote(
    version: str = typer.Argument(..., help="registered model version to make champion"),
    gate: bool = typer.Option(False, "--gate", help="apply the metric gate instead of promoting by hand"),
) -> None:
    """Make a registered version the champion (alias swap)."""
    from medvlm.registry import promote as run

    _print_summary(run(_config(), version, gate=gate))


@app.command()
@user_errors
def monitor(incoming: Optional[Path] = typer.Option(None, help="folder of new images (default monitor.incoming_dir)")) -> None:
    """Evidently drift report: training data vs a new batch."""
    from medvlm.monitor import run_monitor

    _print_summary(run_monitor(_config(), incoming_dir=incoming))


@app.command()
@user_errors
def generate(
    paths: list[Path] = typer.Argument(..., help="image files, folders (recursive) or DICOM files"),
    model: str = typer.Option("champion", help="registry alias, version number, runs:/ URI or a local model folder"),
    fmt: str = typer.Option("text", "--format", "-f", help="text | json | markdown"),
    out: Optional[Path] = typer.Option(None, help="write the output to this file"),
    study: bool = typer.Option(False, "--study", help="all images are views of one study (e.g. frontal + lateral): one report"),
    explain: Optional[Path] = typer.Option(
        None, "--explain", help="also write per-finding heatmaps to this folder: <image stem>_<label>.png "
        "(needs a DEM)"),
    indication: Optional[str] = typer.Option(None, "--indication", help='clinical indication for every image, e.g. "fever, cough for 5 days" (used by models trained with model.indication)'),
) -> None:
    """Generate a radiology report (and diagnosis probabilities) for images."""
    from medvlm.predict import generate_reports

    _state["exit_now"] = True  # a one-shot command: skip the interpreter's teardown (see _App)

    code = generate_reports(paths, model, _config(), fmt, out, study=study, explain_dir=explain,
                            indication=indication)
    raise typer.Exit(code=code)


@app.command("explain-phantom")
@user_errors
def explain_phantom(
    model: str = typer.Option("champion", help="registry alias, version number, runs:/ URI or a local model folder"),
    manifest: Optional[Path] = typer.Option(None, help="phantom rows to score (default: split.out_dir/test.jsonl)"),
    root: Optional[Path] = typer.Option(None, help="folder the manifest's image paths are relative to "
                                        "(default data.root)"),
    limit: Optional[int] = typer.Option(None, min=1, help="score only the first N rows with findings"),
) -> None:
    """How well the per-finding heatmaps fall on what the phantom drew: hit rate per label."""
    from medvlm.explain import phantom_hit_rates
    from medvlm.predict import check_explainable, load_predictor

    cfg = _config()
    predictor = load_predictor(model, cfg)
    check_explainable(predictor)
    _print_summary(phantom_hit_rates(predictor, manifest or Path(cfg.split.out_dir) / "test.jsonl",
                                     root or cfg.data.root, cfg.data.manifest, limit))


@app.command()
@user_errors
def serve(
    model: str = typer.Option("champion", help="registry alias, version, runs:/ URI or local model folder"),
    host: Optional[str] = typer.Option(None, help="default serve.host (127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="default serve.port"),
) -> None:
    """Serve the model over REST (GET /health, POST /predict)."""
    from medvlm.serve import serve as run

    run(_config(), model=model, host=host, port=port)


def run() -> None:  # pragma: no cover - console entry for `python -m medvlm.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
