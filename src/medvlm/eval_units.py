"""Evaluation units: the test split's rows grouped by image, what every producer's generations are scored on.

A COV-CTR image can carry two report rows; it is one unit with both reports as references, so an image counts
once whichever of its rows a producer answers. Rows without an image hash (not written by the validate stage)
are units of their own.
"""

from __future__ import annotations

import pandas as pd


def evaluation_units(test: pd.DataFrame) -> list[dict]:
    """Test rows grouped by image: [{"unit_id", "row_ids", "references", "labels"}] in split order."""
    key = test["image_hash"] if "image_hash" in test.columns else test["study_id"]
    units: dict[str, dict] = {}
    for k, row in zip(key, test.to_dict(orient="records")):
        unit = units.setdefault(str(k), {"unit_id": str(row["study_id"]), "row_ids": [], "references": [],
                                         "labels": row.get("labels") or {}})
        unit["row_ids"].append(str(row["study_id"]))
        unit["references"].append(str(row["report"]))
    return list(units.values())
