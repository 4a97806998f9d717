"""Split stage: validated.jsonl -> train.jsonl / test.jsonl, seeded, stratified and leak-free.

The unit of splitting is a group of rows that must stay together:
    data.group_by = image_hash   rows sharing an image (same content hash) form a unit; units are split with
                                 train_test_split(test_size, stratify=primary label, random_state=seed),
                                 exactly test_size of the units, in first-appearance order.
    data.group_by = source       the loader's `group` (COV-CTR: source paper) joined with the image hash (two
                                 groups sharing an image become one); units are split with
                                 StratifiedGroupKFold(n_splits=round(1/test_size), shuffle, seed), fold 0 = test,
                                 so the test share is about 1/n_splits and each group sits on one side.
With split.use_official and a source whose every row has an official split (R2Gen), that split is kept;
its "val" rows go to train (the pipeline has no validation stage that would use them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from medvlm.config import Config
from medvlm.data.validate import VALIDATED
from medvlm.errors import DataError
from medvlm.manifest import read_manifest, write_manifest

SUMMARY = "summary.json"


def run_split(cfg: Config) -> dict:
    """Write split.out_dir/{train,test}.jsonl and summary.json; return the summary."""
    source = Path(cfg.validation.manifest_dir) / VALIDATED
    df = read_manifest(source)
    if df.empty:
        raise DataError(f"{source}: no validated rows to split")
    if "image_hash" not in df.columns:
        raise DataError(f"{source}: rows lack image_hash (was it written by `medvlm data validate`?)")
    primary = cfg.data.primary_label
    y = df["labels"].map(lambda labels: int(labels.get(primary, 0)) if isinstance(labels, dict) else 0)
    groups = split_groups(df, cfg.data.group_by)

    official = cfg.split.use_official and "split" in df.columns and df["split"].notna().all()
    notes = []
    if cfg.split.use_official and "split" in df.columns and df["split"].notna().any() and not official:
        notes.append(f"official split ignored: {int(df['split'].isna().sum())} rows have none")
    if official:
        is_test = (df["split"] == "test").to_numpy()
        method = "official (val -> train)"
    else:
        is_test, method = _grouped_split(df, groups, y, cfg)

    train, test = df[~is_test], df[is_test]
    out_dir = Path(cfg.split.out_dir)
    write_manifest(train, out_dir / "train.jsonl")
    write_manifest(test, out_dir / "test.jsonl")
    shared_groups = set(groups[~is_test]) & set(groups[is_test])
    shared_hashes = set(train["image_hash"]) & set(test["image_hash"])
    if not official and (shared_groups or shared_hashes):  # cannot happen by construction; guard the construction
        raise DataError(f"{source}: split leaks {len(shared_groups)} groups / {len(shared_hashes)} images across sides")
    summary = {
        "method": method,
        "group_by": cfg.data.group_by,
        "seed": cfg.split.seed,
        "test_size": cfg.split.test_size,
        "rows": {"train": len(train), "test": len(test)},
        "images": {"train": int(train["image_hash"].nunique()), "test": int(test["image_hash"].nunique())},
        "groups": {"train": len(set(groups[~is_test])), "test": len(set(groups[is_test]))},
        "test_fraction_rows": round(len(test) / len(df), 4),
        "labels": {"train": _label_balance(train, cfg), "test": _label_balance(test, cfg)},
        "leakage": {"shared_groups": len(shared_groups), "shared_image_hashes": len(shared_hashes)},
        "notes": notes,
    }
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def split_groups(df: pd.DataFrame, group_by: str) -> np.ndarray:
    """The unit id of every row. image_hash: the hash itself. source: connected components of the loader's
    `group` and the image hash (union-find), so neither a paper nor an image can straddle the split."""
    hashes = df["image_hash"].astype(str).tolist()
    if group_by == "image_hash":
        return np.asarray(hashes, dtype=object)
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    keys = df["group"].where(df["group"].notna(), df["study_id"]).astype(str).tolist()
    for key, digest in zip(keys, hashes):
        parent[find("g:" + key)] = find("h:" + digest)
    # name each component after its first group key in row order, so ids are readable and deterministic
    names: dict[str, str] = {}
    for key in keys:
        names.setdefault(find("g:" + key), key)
    return np.asarray([names[find("g:" + key)] for key in keys], dtype=object)


def split_group_keys(rows: pd.DataFrame, group_by: str) -> list[str]:
    """The group each training row belongs to, as the split stage groups them (data.group_by)."""
    if "image_hash" not in rows.columns:  # rows not written by the validate stage: each study its own image
        rows = rows.assign(image_hash=rows["study_id"].astype(str))
    return [str(g) for g in split_groups(rows, group_by)]


def _grouped_split(df: pd.DataFrame, groups: np.ndarray, y: pd.Series, cfg: Config) -> tuple[np.ndarray, str]:
    """Boolean test mask over rows. The samples are distinct images (image-hash units, first-appearance order);
    in source mode they carry their group, and StratifiedGroupKFold keeps each group on one side while
    balancing images per label, as the COV-CTR baselines do."""
    hashes = df["image_hash"].astype(str).to_numpy()
    _, first_row, row_unit = np.unique(hashes, return_index=True, return_inverse=True)
    order = np.argsort(first_row, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    row_unit = rank[row_unit]  # unit numbers now follow first appearance, independent of the hash spelling
    n_units = len(order)
    unit_y = np.zeros(n_units, dtype=int)
    np.maximum.at(unit_y, row_unit, y.to_numpy())  # validation removed images whose rows disagree on labels
    unit_group = np.empty(n_units, dtype=object)
    unit_group[row_unit] = groups
    n_groups = len(set(unit_group))
    if n_groups < 2:
        raise DataError(f"split: only {n_groups} group(s) of rows; cannot make a train and a test side")
    if cfg.data.group_by == "image_hash":
        stratify = unit_y if len(set(unit_y)) > 1 and np.bincount(unit_y).min() >= 2 else None
        _, test_units = train_test_split(
            np.arange(n_units), test_size=cfg.split.test_size, stratify=stratify, random_state=cfg.split.seed
        )
        method = "train_test_split over distinct images" + ("" if stratify is not None else " (unstratified)")
    else:
        n_splits = max(2, min(round(1 / cfg.split.test_size), n_groups))
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=cfg.split.seed)
        _, test_units = next(folds.split(np.zeros(n_units), unit_y, groups=unit_group))
        method = f"StratifiedGroupKFold(n_splits={n_splits}, shuffle, seed) fold 0 over images, grouped by source"
    return np.isin(row_unit, test_units), method


def _label_balance(df: pd.DataFrame, cfg: Config) -> dict:
    balance = {}
    for name in cfg.data.label_names:
        values = df["labels"].map(lambda labels: int(labels.get(name, 0)) if isinstance(labels, dict) else 0)
        balance[name] = {"positive": int(values.sum()), "fraction": round(float(values.mean()), 4) if len(df) else 0.0}
    return balance
