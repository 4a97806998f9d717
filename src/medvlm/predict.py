"""`medvlm generate PATH...`: reports (and label probabilities) for image files, folders and DICOM files.

A file that cannot be read is reported on one line and skipped; the others are still processed, and the exit code
says that something failed. The model is whatever `--model` names (registry alias, version, URI or folder).
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medvlm.config import Config
from medvlm.errors import DataError, ImageDecodeError, MedVLMError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"}
FORMATS = ("text", "json", "markdown")
PROGRESS_FROM = 4  # show a progress bar from this many images on; for one or two it is only noise
EXIT_OK, EXIT_SOME_FAILED, EXIT_NOTHING_READ = 0, 1, 2


@dataclass
class Outcome:
    results: list[dict] = field(default_factory=list)  # {"path", "report", "probabilities"}
    failures: list[str] = field(default_factory=list)  # one line each


def collect_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Files named on the command line are taken as they are (extension-less DICOM included); folders are searched
    recursively for image suffixes and DICOM files (recognised by their DICM magic)."""
    from medvlm.data.images import is_dicom

    found, problems = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.suffix.lower() in IMAGE_SUFFIXES or (not child.suffix and _safe_is_dicom(child, is_dicom)):
                    found.append(child)
        else:
            problems.append(f"{path}: no such file or folder")
    unique = list(dict.fromkeys(found))  # a file named twice is reported once
    return unique, problems


def _safe_is_dicom(path: Path, is_dicom: Callable) -> bool:
    try:
        return is_dicom(path)
    except OSError:
        return False


def run_predictions(
    files: list[Path], predictor, cfg: Config, console: Console | None = None, study: bool = False,
    indication: str | None = None,
) -> Outcome:
    """Decode and predict in batches of generate.batch_size; undecodable files become one-line failures.

    study=True: the files are the views of one study (e.g. frontal + lateral): one report for all of them.
    indication: the clinical indication of every image (the prompt carries it for models trained with it)."""
    from medvlm.data.images import load_image

    outcome = Outcome()

    def decode(paths: list[Path]) -> tuple[list, list[Path]]:
        """Images of the decodable paths (and those paths); the others become one-line failures."""
        images, kept = [], []
        for path in paths:
            try:
                images.append(load_image(path, max_pixels=cfg.validation.max_image_pixels))
                kept.append(path)
            except DataError as exc:
                outcome.failures.append(str(exc))
        return images, kept

    def told(n: int) -> dict:  # only passed when given: predictors without indication support still work
        return {"indications": [indication] * n} if indication else {}

    def rounded(pred: dict) -> dict:
        return {k: round(float(v), 4) for k, v in pred.get("probabilities", {}).items()}

    if study:
        images, kept = decode(files)
        if images:
            pred = predictor.predict_studies([images], **told(1))[0]
            outcome.results.append({"path": ";".join(str(p) for p in kept), "views": len(kept), "report": pred["report"],
                                    "probabilities": rounded(pred)})
        return outcome
    batch_size = cfg.generate.batch_size
    progress = Progress(
        TextColumn("[bold]reports"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console or Console(stderr=True), disable=len(files) < PROGRESS_FROM, transient=False,
    )
    with progress:
        task = progress.add_task("generate", total=len(files))
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            images, kept = decode(batch)
            if images:
                for path, pred in zip(kept, predictor.predict(images, **told(len(images)))):
                    outcome.results.append({"path": str(path), "report": pred["report"], "probabilities": rounded(pred)})
            progress.advance(task, len(batch))
    return outcome


def format_results(results: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    if fmt == "markdown":
        parts = ["# MedVLM reports\n"]
        for r in results:
            probs = " | ".join(f"{k} {v:.2f}" for k, v in r["probabilities"].items())
            parts.append(f"## {r['path']}\n\n{r['report']}\n\n*probabilities:* {probs}\n")
        return "\n".join(parts)
    lines = []
    for r in results:
        probs = ", ".join(f"{k}={v:.2f}" for k, v in r["probabilities"].items())
        lines += [f"== {r['path']}", r["report"], f"probabilities: {probs}", ""]
    return "\n".join(lines)


def generate_reports(
    paths: list[str | Path],
    model_spec: str,
    cfg: Config,
    fmt: str = "text",
    out: str | Path | None = None,
    *,
    predictor_factory: Callable | None = None,
    stdout: TextIO | None = None,
    console: Console | None = None,
    study: bool = False,
    indication: str | None = None,
) -> int:
    """The logic behind `medvlm generate`. Returns the exit code: 0 all done, 1 some files failed, 2 none read.

    predictor_factory(model_dir, cfg) builds the predictor (default medvlm.inference.Predictor.load).
    study=True: all images found are views of one study, reported together (multi-view models)."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    console = console or Console(stderr=True)
    files, problems = collect_images(paths)
    for line in problems:
        console.print(f"[red]skipped:[/red] {line}", highlight=False, soft_wrap=True)
    if not files:
        console.print("[red]error:[/red] no image files found in the given paths", highlight=False)
        return EXIT_NOTHING_READ
    predictor = load_predictor(model_spec, cfg, predictor_factory)
    trained = getattr(getattr(predictor, "cfg", None), "model", None)
    if indication and trained is not None and not getattr(trained, "indication", False):
        console.print("note: this model was trained without model.indication; --indication does not reach its prompt",
                      highlight=False)
    outcome = run_predictions(files, predictor, cfg, console, study=study, indication=indication)
    for line in outcome.failures:
        console.print(f"[red]skipped:[/red] {line}", highlight=False, soft_wrap=True)
    text = format_results(outcome.results, fmt)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        console.print(f"wrote {len(outcome.results)} report(s) to {out}", highlight=False)
    else:
        (stdout or sys.stdout).write(text)
    if not outcome.results:
        return EXIT_NOTHING_READ
    return EXIT_SOME_FAILED if (outcome.failures or problems) else EXIT_OK


def load_predictor(model_spec: str, cfg: Config, predictor_factory: Callable | None = None):
    from medvlm.resolve import resolve_model

    model_dir = resolve_model(model_spec, cfg)
    if predictor_factory is None:
        import functools

        from medvlm.inference import Predictor

        predictor_factory = functools.partial(Predictor.load, runtime=True)  # no transformers import: seconds saved
    try:
        return predictor_factory(model_dir, cfg=cfg)
    except MedVLMError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        from medvlm.errors import ModelError

        raise ModelError(f"{model_dir}: cannot load the model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def decode_image_bytes(data: bytes, max_pixels: int | None = None):
    """Image bytes (REST upload, pyfunc input) -> grayscale PIL image through the one image loader, which sniffs
    DICOM by content and guards against pixel bombs. It reads paths, hence the temporary file."""
    from medvlm.data.images import DEFAULT_MAX_PIXELS, load_image

    with tempfile.NamedTemporaryFile(suffix=".img") as tmp:
        tmp.write(data)
        tmp.flush()
        return load_image(tmp.name, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)


def decode_base64_image(text: str, max_pixels: int | None = None):
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("image: not valid base64") from None
    if not data:
        raise ImageDecodeError("image: empty after base64 decoding")
    return decode_image_bytes(data, max_pixels)
