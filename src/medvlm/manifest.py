"""The one manifest shape every data source is loaded into.

One row per study:
    study_id     str            unique id of the study (COV-CTR: image id, +"#k" for a second report row)
    images       list[str]      image paths relative to the data root (several views per study allowed)
    report       str            the report text in the configured language
    report_zh    str | None     Chinese report where the source has one
    labels       dict[str,int]  0/1 per label name of data.label_names
    split        str | None     official split ("train" / "val" / "test") when the source has one
    group        str            grouping key for leak-free splits (COV-CTR: source paper); defaults to study_id
    source_row   int            row of the source file, so every message can name it
    indication   str (optional) clinical indication ("fever, cough for 5 days"); the column exists only where a
                                source row has one (model.indication puts it into the prompt)

Validation adds `image_hash` (sha256 of the image bytes, views joined) used for duplicate detection and
grouping. Manifests are JSON Lines so lists and dicts survive a round trip unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medvlm.errors import DataError

COLUMNS = ["study_id", "images", "report", "report_zh", "labels", "split", "group", "source_row"]
INDICATION = "indication"  # optional column: the clinical indication (free text), only where a source has it


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in df.to_dict(orient="records"):
            fh.write(json.dumps(_plain(record), ensure_ascii=False) + "\n")
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run the stage that writes it, e.g. `dvc repro`)")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not rows:
        return empty_manifest()
    return pd.DataFrame(rows)


def _plain(value):
    """numpy/pandas scalars -> plain Python, so json.dumps never fails on a manifest."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and value != value:  # NaN -> null
        return None
    return value


def study_indications(rows: pd.DataFrame) -> list[str | None]:
    """The optional `indication` column as a list (None where a study has none or the column is absent)."""
    if INDICATION not in rows.columns:
        return [None] * len(rows)
    return [value if isinstance(value, str) and value.strip() else None for value in rows[INDICATION]]
