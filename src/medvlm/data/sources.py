"""Data sources -> the one manifest shape (medvlm.manifest.COLUMNS, plus `load_error`).

`load_source(cfg)` dispatches on `data.source`:
    cov_ctr  COV-CTR annotation.jsonl {image_id, image, label, report, report_zh, source_row}
    r2gen    R2Gen annotation.json {"train": [...], "val": [...], "test": [...]} with {id, report, image_path[]};
             entries without `labels` get them from the report text (data.report_labeler, data/report_labels.py)
    csv      generic manifest, one row per study (see _generic_row for the accepted columns)
    jsonl    the same as JSON Lines (what the phantom generator writes)

A file that cannot be read is a DataError. A row that is malformed is kept with what it has and a `load_error`
saying what is wrong, so validation quarantines it with that reason: rows are never dropped silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import pandas as pd

from medvlm.config import Config
from medvlm.data.report_labels import KEYWORDS, report_labels  # noqa: F401  (KEYWORDS: re-exported, old import path)
from medvlm.errors import ConfigError, DataError, first_line
from medvlm.manifest import COLUMNS, INDICATION

LOAD_ERROR = "load_error"
SPLITS = ("train", "val", "test")

def load_source(cfg: Config) -> pd.DataFrame:
    """Read the configured source into a manifest DataFrame (COLUMNS + load_error), one row per study."""
    manifest = Path(cfg.data.root) / cfg.data.manifest
    loader = _LOADERS[cfg.data.source]
    rows = loader(manifest, cfg)
    # the optional `indication` column exists only where a source row has one (manifests without it stay unchanged)
    extra = [INDICATION] if any(INDICATION in r for r in rows) else []
    df = pd.DataFrame(rows, columns=[*COLUMNS, *extra, LOAD_ERROR])
    if df.empty:
        return df
    df["source_row"] = df["source_row"].astype(int)
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------- COV-CTR


def _load_cov_ctr(manifest: Path, cfg: Config) -> list[dict]:
    if cfg.data.label_names != [cfg.data.primary_label]:
        raise ConfigError(
            f"data.label_names {cfg.data.label_names}: COV-CTR has one label (COVID-19 or not); "
            f"set data.label_names: [{cfg.data.primary_label}]"
        )
    records = _read_jsonl(manifest)
    rows, seen = [], {}
    for lineno, rec, error in records:
        errors = [error] if error else []
        rec = rec or {}
        image = rec.get("image")
        image_id = rec.get("image_id") or (PurePosixPath(image).name if isinstance(image, str) else None)
        if not image_id:
            errors.append("missing image_id and image")
            image_id = f"line{lineno}"
        # a second report of the same image stays a second row; its id gets "#k" so study ids stay unique
        count = seen.get(image_id, 0)
        seen[image_id] = count + 1
        study_id = image_id if count == 0 else f"{image_id}#{count}"
        images = _image_list(image, cfg, errors)
        report, report_zh = _reports(rec, cfg, errors)
        if "label" not in rec:
            errors.append("missing label")
        rows.append(
            {
                "study_id": study_id,
                "images": images,
                "report": report,
                "report_zh": report_zh,
                "labels": {cfg.data.primary_label: _as_label(rec.get("label"))},
                "split": None,
                "group": None,
                "source_row": _source_row(rec, lineno - 1),
                LOAD_ERROR: "; ".join(errors) or None,
            }
        )
    names = [PurePosixPath(r["images"][0]).name if r["images"] else r["study_id"] for r in rows]
    for row, key in zip(rows, source_paper_keys(names)):
        row["group"] = key
    return rows


def source_paper_key(file_name: str) -> str:
    """COV-CTR source-paper key of one image file name (numeric .png names still unmerged: `png:N`).

    The rule of BASELINES_COV_CTR.md: drop a trailing `%k` panel index; `<paper>-p<page>-...` -> `<paper>`;
    `PIIS<digits>_k` -> `PIIS<digits>`; purely numeric names (UCSD non-COVID files) -> `jpg:N` / `png:N`.
    """
    path = PurePosixPath(file_name)
    stem = re.sub(r"%\d+$", "", path.stem)
    paper = re.match(r"^(.*?)-p\d+-", stem)
    if paper:
        return paper.group(1)
    pii = re.match(r"^(PIIS\d+)(_\d+)?$", stem)
    if pii:
        return pii.group(1)
    if re.fullmatch(r"\d+", stem):
        return ("jpg:" if path.suffix.lower() == ".jpg" else "png:") + stem
    return stem


def source_paper_keys(file_names: list[str]) -> list[str]:
    """source_paper_key for every name, with numeric .png names merged into runs of consecutive integers
    (neighbouring numbers are usually slices of one case, and there is no other source key): a run is
    named after its first number, e.g. 1210.png..1218.png -> png:1210."""
    keys = [source_paper_key(name) for name in file_names]
    numbers = sorted({int(k[4:]) for k in keys if k.startswith("png:")})
    run_start: dict[int, int] = {}
    for i, number in enumerate(numbers):
        run_start[number] = run_start[numbers[i - 1]] if i and numbers[i - 1] == number - 1 else number
    return [f"png:{run_start[int(k[4:])]}" if k.startswith("png:") else k for k in keys]


# ------------------------------------------------------------------------------------------------------ R2Gen


def _load_r2gen(manifest: Path, cfg: Config) -> list[dict]:
    data = _read_json(manifest)
    if not isinstance(data, dict) or not any(k in data for k in SPLITS):
        raise DataError(f"{manifest}: expected an R2Gen annotation object with train/val/test lists")
    rows, source_row = [], 0
    for split_name in SPLITS:
        entries = data.get(split_name, [])
        if not isinstance(entries, list):
            raise DataError(f"{manifest}: '{split_name}' must be a list of studies")
        for entry in entries:
            errors: list[str] = []
            if not isinstance(entry, dict):
                errors.append(f"entry is {type(entry).__name__}, not an object")
                entry = {}
            study_id = str(entry.get("id") or f"{split_name}-{source_row}")
            if "id" not in entry:
                errors.append("missing id")
            images = _image_list(entry.get("image_path"), cfg, errors)
            report, report_zh = _reports(entry, cfg, errors)
            labels = entry.get("labels")
            if isinstance(labels, dict):
                labels = {str(k): _as_label(v) for k, v in labels.items()}
            elif labels is None:
                # no labels in the source: read them from the report (data.report_labeler's rules)
                labels = keyword_labels(report, cfg.data.label_names, cfg.data.report_labeler,
                                        int(cfg.data.report_uncertain == "positive"))
            else:
                errors.append(f"labels is {type(labels).__name__}, not an object")
                labels = {}
            rows.append(
                {
                    "study_id": study_id,
                    "images": images,
                    "report": report,
                    "report_zh": report_zh,
                    "labels": labels,
                    "split": entry.get("split") or split_name,
                    # MIMIC entries carry the patient; a patient's studies must share a side of the split
                    "group": str(entry.get("subject_id") or study_id),
                    "source_row": source_row,
                    LOAD_ERROR: "; ".join(errors) or None,
                }
            )
            source_row += 1
    return rows


def keyword_labels(report: Any, label_names: list[str], labeler: str = "basic", uncertain_as: int = 0) -> dict[str, int]:
    """0/1 per label name read from the report text by a rule set of medvlm.data.report_labels."""
    return report_labels(report, label_names, labeler, uncertain_as)


# ---------------------------------------------------------------------------------------------- CSV / JSONL


def _load_csv(manifest: Path, cfg: Config) -> list[dict]:
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{manifest}: manifest file not found") from None
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{manifest}: not a readable CSV ({first_line(exc)})") from None
    _require_columns(manifest, set(table.columns), cfg)
    records = [(i + 2, rec, None) for i, rec in enumerate(table.to_dict(orient="records"))]  # +2: header, 1-based
    return _generic_rows(records, cfg, data_row=lambda lineno: lineno - 2)


def _load_jsonl(manifest: Path, cfg: Config) -> list[dict]:
    records = _read_jsonl(manifest)
    columns = set().union(*(rec.keys() for _, rec, _ in records if rec)) if records else set()
    _require_columns(manifest, columns, cfg)
    return _generic_rows(records, cfg, data_row=lambda lineno: lineno - 1)


def _require_columns(manifest: Path, columns: set[str], cfg: Config) -> None:
    """A column missing from the whole file is the file's problem, not a row's: one clear error."""
    if not columns & {"image", "images"}:
        raise DataError(f"{manifest}: no 'image' or 'images' column (found: {', '.join(sorted(columns)) or 'none'})")
    if "report" not in columns and not (cfg.data.report_language == "zh" and "report_zh" in columns):
        raise DataError(f"{manifest}: no 'report' column (found: {', '.join(sorted(columns))})")
    if not (columns & {"label", "labels"} or set(cfg.data.label_names) <= columns):
        raise DataError(
            f"{manifest}: no labels: need a 'label' column (for {cfg.data.primary_label}), a 'labels' column "
            f"or one column per name of data.label_names {cfg.data.label_names}"
        )


def _generic_rows(records: list[tuple[int, dict | None, str | None]], cfg: Config, data_row: Callable) -> list[dict]:
    rows, seen = [], {}
    for lineno, rec, error in records:
        rows.append(_generic_row(rec or {}, lineno, data_row(lineno), [error] if error else [], cfg, seen))
    return rows


def _generic_row(rec: dict, lineno: int, index: int, errors: list[str], cfg: Config, seen: dict) -> dict:
    """Columns: image | images (list, JSON list or ';'-separated); report; label (the primary label) | labels
    (dict or JSON object) | one column per label name; optional study_id, group, split, report_zh, source_row."""
    images = _image_list(rec.get("images", rec.get("image")), cfg, errors)
    report, report_zh = _reports(rec, cfg, errors)
    labels = _generic_labels(rec, cfg, errors)
    study_id = _blank_to_none(rec.get("study_id"))
    if study_id is None:
        # derived ids (from the image path) are ours to make unique; explicit duplicate ids are validation's job
        base = images[0] if images else f"row{index}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        study_id = base if count == 0 else f"{base}#{count}"
    split = _blank_to_none(rec.get("split"))
    indication = _blank_to_none(rec.get("indication"))
    return {
        "study_id": str(study_id),
        "images": images,
        "report": report,
        "report_zh": report_zh,
        "labels": labels,
        "split": split,
        "group": str(_blank_to_none(rec.get("group")) or study_id),
        "source_row": _source_row(rec, index),
        LOAD_ERROR: "; ".join(errors) or None,
        **({"indication": str(indication)} if indication is not None else {}),
    }


def _generic_labels(rec: dict, cfg: Config, errors: list[str]) -> dict:
    names = cfg.data.label_names
    if "labels" in rec:
        labels = rec["labels"]
        if isinstance(labels, str):
            try:
                labels = json.loads(labels)
            except json.JSONDecodeError:
                errors.append("labels is not a JSON object")
                return {}
        if not isinstance(labels, dict):
            errors.append(f"labels is {type(labels).__name__}, not an object")
            return {}
        return {str(k): _as_label(v) for k, v in labels.items()}
    if "label" in rec:
        return {cfg.data.primary_label: _as_label(rec["label"])}
    if all(name in rec for name in names):
        return {name: _as_label(rec[name]) for name in names}
    errors.append("missing labels")
    return {}


# ---------------------------------------------------------------------------------------------- shared parts


def _read_jsonl(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, record or None, error or None) per non-blank line; a broken line is a row error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: manifest file not found") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({first_line(exc)})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append((lineno, None, f"line {lineno}: not valid JSON ({exc.msg})"))
            continue
        if not isinstance(rec, dict):
            records.append((lineno, None, f"line {lineno}: a JSON {type(rec).__name__}, not an object"))
            continue
        records.append((lineno, rec, None))
    return records


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: manifest file not found") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({first_line(exc)})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def _image_list(value: Any, cfg: Config, errors: list[str]) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                errors.append("images is not a valid JSON list")
                return []
        else:
            value = [part.strip() for part in text.split(";") if part.strip()]
    if value is None:
        errors.append("missing image")
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.append("images must be a list of paths")
        return []
    if not value:
        errors.append("empty image list")
    prefix = cfg.data.image_dir.strip("/")
    return [f"{prefix}/{v}" if prefix else v for v in value]


def _reports(rec: dict, cfg: Config, errors: list[str]) -> tuple[Any, Any]:
    report_zh = _blank_to_none(rec.get("report_zh"))
    if cfg.data.report_language == "zh":
        if "report_zh" not in rec:
            errors.append("missing report_zh (data.report_language is zh)")
        return rec.get("report_zh"), report_zh
    if "report" not in rec:
        errors.append("missing report")
    return rec.get("report"), report_zh


def _as_label(value: Any) -> Any:
    """0/1 in any spelling a file may use ("1", 1.0, True) -> int; anything else is kept for validation to flag."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(value))
    return value


def _source_row(rec: dict, default: int) -> int:
    value = rec.get("source_row")
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _blank_to_none(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value != value:
        return None
    return value


_LOADERS: dict[str, Callable[[Path, Config], list[dict]]] = {
    "cov_ctr": _load_cov_ctr,
    "r2gen": _load_r2gen,
    "csv": _load_csv,
    "jsonl": _load_jsonl,
}
