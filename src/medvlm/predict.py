"""`medvlm generate PATH...`: reports (and label probabilities) for image files, folders, DICOM files and CT volumes
(a DICOM series folder, NIfTI, NRRD).

A file that cannot be read is reported on one line and skipped; the others are still processed, and the exit code
says that something failed. The model is whatever `--model` names (registry alias, version, URI or folder).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TextIO

from rich.console import Console

from medvlm.config import Config
from medvlm.errors import DataError, MedVLMError, first_line
from medvlm.progress import StageProgress

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

    from medvlm.data.volumes import VOLUME_SUFFIXES, is_series_folder

    found, problems = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            # a folder of CT slices (a DICOM series) is one volume, wherever it sits in the tree
            series = [d for d in [path, *sorted(p for p in path.rglob("*") if p.is_dir())] if is_series_folder(d)]
            found.extend(series)
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.parent in series:
                    continue
                if (child.suffix.lower() in IMAGE_SUFFIXES or child.name.lower().endswith(VOLUME_SUFFIXES)
                        or (not child.suffix and _safe_is_dicom(child, is_dicom))):
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
    explain_dir: str | Path | None = None,
    indication: str | None = None,
) -> Outcome:
    """Decode and predict in batches of generate.batch_size; undecodable files become one-line failures.

    study=True: the files are the views of one study (e.g. frontal + lateral): one report for all of them.
    explain_dir: also write per-label heatmap overlays <explain_dir>/<image stem>_<label>.png (medvlm.explain; in a
    study, each view's own), listed under "heatmaps" (label -> path) in each result.
    indication: the clinical indication of every image (the prompt carries it for models trained with it)."""
    from medvlm.features import load_view

    outcome = Outcome()
    stems: dict[str, int] = {}

    slices: dict[str, dict] = {}  # file stem -> a volume's kept slices per label (medvlm.explain_volume)

    def heatmaps(paths: list[Path], images: list) -> list[tuple[str, dict[str, str]]]:
        """(file stem, overlay name -> path) per image; a stem seen before gets a -2, -3... suffix."""
        if explain_dir is None:
            return [("", {}) for _ in images]
        from medvlm.explain import write_overlays

        out = []
        for path, image, exp in zip(paths, images, predictor.explain(images)):
            stem = image_stem(path)
            stems[stem] = stems.get(stem, 0) + 1
            stem = stem if stems[stem] == 1 else f"{stem}-{stems[stem]}"
            out.append((stem, write_overlays(image, exp, explain_dir, stem)))
            if hasattr(exp, "ranking"):
                slices[stem] = exp.ranking()
        return out

    def ranked(stem: str) -> dict:  # a volume: which slices were kept per label, with their mass shares
        return {"heatmap_slices": slices[stem]} if stem in slices else {}
    vision = getattr(getattr(predictor, "model", None), "vision", None)  # a volume encoder takes volumes whole
    view_cfg = getattr(predictor, "cfg", cfg)  # the model's own volume settings (those it was trained with)

    def decode(paths: list[Path]) -> tuple[list, list[Path]]:
        """Images of the decodable paths (and those paths); the others become one-line failures."""
        images, kept = [], []
        for path in paths:
            try:
                images.append(load_view(path, view_cfg, vision))
                kept.append(path)
            except DataError as exc:
                outcome.failures.append(str(exc))
        return images, kept

    def told(n: int) -> dict:  # only passed when given: predictors without indication support still work
        return {"indications": [indication] * n} if indication else {}

    def rounded(pred: dict) -> dict:
        return {k: round(float(v), 4) for k, v in pred.get("probabilities", {}).items()}

    def similar(pred: dict) -> dict:  # model.retrieval: the training cases its prompt showed
        return {"similar_cases": pred["similar_cases"]} if "similar_cases" in pred else {}

    if study:
        images, kept = decode(files)
        if images:
            pred = predictor.predict_studies([images], **told(1))[0]
            views = heatmaps(kept, images)  # each view's own maps; keys "<stem>:<label>" when there are several
            maps = {(f"{stem}:{k}" if len(views) > 1 else k): v for stem, m in views for k, v in m.items()}
            outcome.results.append({"path": ";".join(str(p) for p in kept), "views": len(kept), "report": pred["report"],
                                    "probabilities": rounded(pred), **similar(pred),
                                    **({"heatmaps": maps} if explain_dir is not None else {})})
        return outcome
    batch_size = cfg.generate.batch_size
    with StageProgress("reports", len(files), console, disable=len(files) < PROGRESS_FROM) as progress:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            images, kept = decode(batch)
            if images:
                for path, pred, (stem, maps) in zip(kept, predictor.predict(images, **told(len(images))), heatmaps(kept, images)):
                    outcome.results.append({"path": str(path), "report": pred["report"], "probabilities": rounded(pred),
                                            **similar(pred), **({"heatmaps": maps} if explain_dir is not None else {}),
                                            **ranked(stem)})
            progress.advance(len(batch))
    return outcome


def image_stem(path: Path) -> str:
    """File name without its suffix (both parts of .nii.gz)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def format_results(results: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    if fmt == "markdown":
        parts = ["# MedVLM reports\n"]
        for r in results:
            probs = " | ".join(f"{k} {v:.2f}" for k, v in r["probabilities"].items())
            parts.append(f"## {r['path']}\n\n{r['report']}\n\n*probabilities:* {probs}\n")
            if r.get("similar_cases"):
                parts.append("*similar cases:* " + ", ".join(f"{c['study_id']} ({c['similarity']:.2f})"
                                                            for c in r["similar_cases"]) + "\n")
            if r.get("heatmaps"):
                parts.append("*heatmaps:* " + ", ".join(f"[{k}]({v})" for k, v in r["heatmaps"].items()) + "\n")
        return "\n".join(parts)
    lines = []
    for r in results:
        probs = ", ".join(f"{k}={v:.2f}" for k, v in r["probabilities"].items())
        lines += [f"== {r['path']}", r["report"], f"probabilities: {probs}"]
        if r.get("similar_cases"):
            lines.append("similar cases: " + ", ".join(f"{c['study_id']} ({c['similarity']:.2f})" for c in r["similar_cases"]))
        if r.get("heatmaps"):
            lines.append("heatmaps: " + ", ".join(r["heatmaps"].values()))
        lines.append("")
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
    explain_dir: str | Path | None = None,
    indication: str | None = None,
) -> int:
    """The logic behind `medvlm generate`. Returns the exit code: 0 all done, 1 some files failed, 2 none read.

    predictor_factory(model_dir, cfg) builds the predictor (default medvlm.inference.Predictor.load).
    study=True: all images found are views of one study, reported together (multi-view models).
    explain_dir: per-label heatmap overlays are written there (a model without DEM stops with one line first)."""
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
    if explain_dir is not None:
        check_explainable(predictor)
    trained = getattr(getattr(predictor, "cfg", None), "model", None)
    if indication and trained is not None and not getattr(trained, "indication", False):
        console.print("note: this model was trained without model.indication; --indication does not reach its prompt",
                      highlight=False)
    outcome = run_predictions(files, predictor, cfg, console, study=study, explain_dir=explain_dir,
                              indication=indication)
    for line in outcome.failures:
        console.print(f"[red]skipped:[/red] {line}", highlight=False, soft_wrap=True)
    text = format_results(outcome.results, fmt)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        console.print(f"wrote {len(outcome.results)} report(s) to {out}", highlight=False)
    else:
        (stdout or sys.stdout).write(text)
    if explain_dir is not None:
        n_maps = sum(len(r.get("heatmaps", {})) for r in outcome.results)
        console.print(f"wrote {n_maps} heatmap(s) to {explain_dir}", highlight=False)
    if not outcome.results:
        return EXIT_NOTHING_READ
    return EXIT_SOME_FAILED if (outcome.failures or problems) else EXIT_OK


def check_explainable(predictor) -> None:
    """One-line ModelError unless the predictor can draw per-label heatmaps (a DEM, a 2-D image encoder)."""
    from medvlm.errors import ModelError

    check = getattr(predictor, "check_explainable", None)
    if check is None or not hasattr(predictor, "explain"):
        raise ModelError("this model cannot produce heatmaps (it has no per-finding classifier to explain)")
    check()


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

        raise ModelError(f"{model_dir}: cannot load the model ({first_line(exc)})") from None

