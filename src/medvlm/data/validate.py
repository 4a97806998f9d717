"""Validation stage: every manifest row is checked, bad rows are quarantined with their reasons.

Per-row facts (does the image exist, decode, how large, its content hash, label domain, ...) are computed in
pandas, one column each; Great Expectations then judges those columns with one expectation per rule, and the
rows each failed expectation lists (unexpected_index_list) are what gets quarantined, under that expectation's
reason. So the Data Docs and quarantine.csv cannot disagree.

Duplicates: the same image with two different reports is legitimate (COV-CTR has 6: two radiologists' texts),
both rows are kept and listed in the summary. The same image with conflicting labels cannot be right for
both rows, so all rows of such an image are quarantined. A repeated study id quarantines the later rows.
These cross-row rules run in a second suite, over the rows that passed their own checks only: a row that is
already quarantined for its own defect (a label "yes", an empty report) takes no part, so it cannot drag a good
row of the same image or study id into quarantine. The summary still lists every image used by several rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from medvlm.config import Config
from medvlm.data.data_docs import make_offline
from medvlm.data.expectations import CROSS_ROW, ROW, expectation_specs, gx_context, run_suite
from medvlm.data.images import combine_digests, file_sha256, probe_image, resolve_in_root
from medvlm.data.sources import LOAD_ERROR, load_source
from medvlm.data.volumes import is_volume_path, probe_volume
from medvlm.errors import DataError, ImageDecodeError, ValidationFailed
from medvlm.manifest import COLUMNS, INDICATION, write_manifest

VALIDATED = "validated.jsonl"
QUARANTINE = "quarantine.csv"
SUMMARY = "summary.json"


def run_validation(cfg: Config) -> dict:
    """Validate the configured source; write validated.jsonl, quarantine.csv, summary.json and Data Docs.

    Raises ValidationFailed (one line) when the quarantined share exceeds validate.max_bad_fraction,
    after the outputs are written so the reasons can be read.
    """
    started = time.perf_counter()
    vcfg = cfg.validation
    df = load_source(cfg)
    rows_in = len(df)
    manifest = Path(cfg.data.root) / cfg.data.manifest
    if rows_in == 0:
        raise ValidationFailed(f"{manifest}: the manifest has no rows")
    loaded = time.perf_counter()

    checks = _row_checks(df, cfg)
    checked = time.perf_counter()
    expectations, reasons = _run_expectations(checks, cfg, Path(vcfg.out_dir) / "docs")
    judged = time.perf_counter()

    bad = sorted(reasons)
    kept = df.drop(index=bad).copy()
    kept["image_hash"] = checks.loc[kept.index, "image_hash"]
    quarantine = pd.DataFrame(
        {
            "source_row": df.loc[bad, "source_row"],
            "study_id": df.loc[bad, "study_id"],
            "file": [";".join(map(str, imgs)) if isinstance(imgs, list) else "" for imgs in df.loc[bad, "images"]],
            "reason": ["; ".join(reasons[i]) for i in bad],
        }
    )
    if rows_in != len(kept) + len(quarantine):  # every row is accounted for: kept or quarantined, never lost
        raise ValidationFailed(f"{manifest}: {rows_in} rows in but {len(kept)} kept + {len(quarantine)} quarantined")

    out_manifest = Path(vcfg.manifest_dir)
    extra = [INDICATION] if INDICATION in kept.columns else []  # optional column, kept where the source has it
    write_manifest(kept[[*COLUMNS, *extra, "image_hash"]], out_manifest / VALIDATED)
    quarantine.to_csv(out_manifest / QUARANTINE, index=False)
    reason_counts: dict[str, int] = {}
    for row_reasons in reasons.values():
        for reason in row_reasons:
            code = reason.split(":", 1)[0]
            reason_counts[code] = reason_counts.get(code, 0) + 1
    summary = {
        "source": cfg.data.source,
        "manifest": str(manifest),
        "rows_in": rows_in,
        "rows_kept": len(kept),
        "rows_quarantined": len(quarantine),
        "bad_fraction": round(len(quarantine) / rows_in, 6),
        "max_bad_fraction": vcfg.max_bad_fraction,
        "reasons": dict(sorted(reason_counts.items())),
        "expectations": expectations,
        "duplicate_images": _duplicate_groups(df, checks, reasons),
        "outputs": {
            "validated": str(out_manifest / VALIDATED),
            "quarantine": str(out_manifest / QUARANTINE),
            "data_docs": str(Path(vcfg.out_dir) / "docs" / "index.html"),
        },
        "seconds": {
            "load": round(loaded - started, 3),
            "row_checks": round(checked - loaded, 3),
            "expectations": round(judged - checked, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    }
    Path(vcfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(vcfg.out_dir) / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", "utf-8")
    if summary["bad_fraction"] > vcfg.max_bad_fraction:
        top = ", ".join(f"{k} {v}" for k, v in sorted(reason_counts.items(), key=lambda kv: -kv[1])[:3])
        raise ValidationFailed(
            f"{manifest}: {len(quarantine)} of {rows_in} rows quarantined ({summary['bad_fraction']:.1%} > "
            f"validate.max_bad_fraction {vcfg.max_bad_fraction:.1%}; {top}); see {out_manifest / QUARANTINE}"
        )
    return summary


def _row_checks(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """One column per fact a rule looks at. None means "not applicable" (e.g. no decode check for a missing
    file), which Great Expectations skips, so each broken row is blamed for its first real problem."""
    root = Path(cfg.data.root)
    vcfg = cfg.validation
    file_cache: dict[str, dict[str, Any]] = {}  # a file shared by several rows is hashed and decoded once
    facts = []
    for idx, row in df.iterrows():
        images = row["images"] if isinstance(row["images"], list) else []
        per_file = [_file_facts(root, rel, vcfg.max_image_pixels, file_cache, cfg.volume) for rel in images]
        in_root = all(f["in_root"] for f in per_file) if per_file else None
        exists = all(f["exists"] for f in per_file) if per_file and in_root else None
        decodes = all(f["decodes"] for f in per_file) if exists else None
        errors = [f["error"] for f in per_file if f["error"]]
        labels = row["labels"] if isinstance(row["labels"], dict) else {}
        report = row["report"]
        facts.append(
            {
                ROW: idx,
                "study_id": row["study_id"],
                "load_error": row[LOAD_ERROR],
                "report": report if isinstance(report, str) else None,
                "report_is_text": None if report is None else isinstance(report, str),
                "images_in_root": in_root,
                "images_exist": exists,
                "images_decode": decodes,
                "image_error": "; ".join(errors) or None,
                "image_min_side": min(f["min_side"] for f in per_file) if decodes else None,
                "image_hash": combine_digests([f["sha256"] for f in per_file]) if exists else None,
                "label_keys_match": sorted(labels) == sorted(cfg.data.label_names) if labels else None,
                **{f"label__{name}": labels.get(name) for name in cfg.data.label_names},
                "labels_json": json.dumps(labels, sort_keys=True, default=str),
                "split": row["split"],
                **_volume_row_facts(per_file if decodes else []),
            }
        )
    checks = pd.DataFrame(facts, index=df.index)
    return checks.astype(object).where(checks.notna(), None)


def _cross_row_checks(checks: pd.DataFrame, own_ok: pd.Series) -> pd.DataFrame:
    """The facts that compare rows, among the rows that passed their own checks (own_ok); None elsewhere, which
    Great Expectations skips, so a row with its own defect is blamed for that alone and decides nothing."""
    out = checks.copy()
    ok = checks[own_ok]
    out["study_id_repeat"] = ok["study_id"].duplicated(keep="first").reindex(checks.index)
    # a content hash whose (good) rows disagree on labels: every good row of it is suspect
    hashed = ok[ok["image_hash"].notna()]
    conflicting = hashed.groupby("image_hash")["labels_json"].nunique()
    conflict_hashes = set(conflicting[conflicting > 1].index)
    out["hash_label_conflict"] = hashed["image_hash"].map(lambda h: h in conflict_hashes).reindex(checks.index)
    return out.astype(object).where(out.notna(), None)


def _volume_row_facts(per_file: list[dict]) -> dict[str, Any]:
    """Volume facts of a row (None where it has no volume, so the volume expectations skip 2-D rows)."""
    vols = [f["volume"] for f in per_file if f.get("volume")]
    if not vols:
        return {key: None for key in (*VOLUME_FACTS, "volume_detail")}
    detail = "; ".join(f"{'x'.join(map(str, v.shape))} voxels, spacing {'x'.join(f'{s:.3g}' for s in v.spacing)} mm, "
                       f"HU {v.hu_min:.0f}..{v.hu_max:.0f}" for v in vols)
    return {
        "volume_detail": detail,
        "volume_slices": min(v.n_slices for v in vols),
        "volume_spacing_min": min(min(v.spacing) for v in vols),
        "volume_spacing_max": max(max(v.spacing) for v in vols),
        "volume_hu_min": min(v.hu_min for v in vols),
        "volume_hu_max": max(v.hu_max for v in vols),
        "volume_min_side": min(min(v.shape[:2]) for v in vols),
    }


VOLUME_FACTS = ("volume_slices", "volume_spacing_min", "volume_spacing_max", "volume_hu_min", "volume_hu_max",
                "volume_min_side")


def _file_facts(root: Path, rel: Any, max_pixels: int, cache: dict, volume_cfg=None) -> dict[str, Any]:
    key = str(rel)
    if key in cache:
        return cache[key]
    facts: dict[str, Any] = {"in_root": False, "exists": None, "decodes": None, "min_side": None, "error": None}
    try:
        path = resolve_in_root(root, key)
    except DataError as exc:
        facts["error"] = str(exc)
        cache[key] = facts
        return facts
    if volume_cfg is not None and is_volume_path(path) and (path.is_file() or path.is_dir()):
        cache[key] = _volume_facts(facts, path, key, volume_cfg)
        return cache[key]
    facts.update(in_root=True, exists=path.is_file())
    if not facts["exists"]:
        facts["error"] = f"{key}: image file not found"
    else:
        facts["sha256"] = file_sha256(path)
        try:
            info = probe_image(path, max_pixels=max_pixels)
            facts.update(decodes=True, min_side=min(info.width, info.height))
        except ImageDecodeError as exc:
            facts.update(decodes=False, error=str(exc).replace(str(path), key))
    cache[key] = facts
    return facts


def _volume_facts(facts: dict[str, Any], path: Path, key: str, volume_cfg) -> dict[str, Any]:
    """A volume (DICOM series folder or NIfTI / NRRD file): its files' hash, and what the volume expectations read."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    facts.update(in_root=True, exists=bool(files))
    if not files:
        facts["error"] = f"{key}: empty folder"
        return facts
    facts["sha256"] = combine_digests([file_sha256(p) for p in files])
    try:
        info = probe_volume(path, volume_cfg)
        facts.update(decodes=True, min_side=min(info.shape[:2]), volume=info)
    except ImageDecodeError as exc:
        facts.update(decodes=False, error=str(exc).replace(str(path), key))
    return facts


def _run_expectations(checks: pd.DataFrame, cfg: Config, docs_dir: Path) -> tuple[list[dict], dict[int, list[str]]]:
    """Run the per-row suite, then the cross-row suite over the rows it kept, with Great Expectations
    checkpoints (one Data Docs site shows both); return per-expectation results and row -> reasons."""
    context = gx_context(docs_dir)
    specs = expectation_specs(cfg)
    schema = [ROW, "load_error", "report", "images_exist", "images_decode", "image_hash", "label_keys_match"]
    own_specs = [spec for spec in specs if spec[0] not in CROSS_ROW]
    summaries, reasons = run_suite(context, "manifest_rows", own_specs, checks, schema)
    own_ok = pd.Series([row not in reasons for row in checks.index], index=checks.index)
    cross = _cross_row_checks(checks, own_ok)
    cross_specs = [spec for spec in specs if spec[0] in CROSS_ROW]
    more, cross_reasons = run_suite(context, "manifest_cross_rows", cross_specs, cross, [ROW])
    for row, why in cross_reasons.items():
        reasons.setdefault(row, []).extend(why)
    make_offline(docs_dir)  # the docs are complete: their CDN stylesheets and scripts become local copies
    return summaries + more, reasons


def _duplicate_groups(df: pd.DataFrame, checks: pd.DataFrame, reasons: dict[int, list[str]]) -> list[dict]:
    """Images that appear in more than one row: who they are, and whether reports/labels differ. Every row of
    the image is listed; labels_conflict is the decision, made among the rows without a defect of their own
    (those are named in own_defect_rows)."""
    own_defect = {row for row, why in reasons.items() if any(w.split(":", 1)[0] not in CROSS_ROW for w in why)}
    groups = []
    hashed = checks[checks["image_hash"].notna()]
    for digest, members in hashed.groupby("image_hash", sort=True):
        if len(members) < 2:
            continue
        rows = df.loc[members.index]
        judged = members[[row not in own_defect for row in members.index]]
        groups.append(
            {
                "image_hash": digest,
                "study_ids": rows["study_id"].tolist(),
                "source_rows": [int(r) for r in rows["source_row"]],
                "reports_differ": rows["report"].astype(str).nunique() > 1,
                "labels_conflict": judged["labels_json"].nunique() > 1,
                "own_defect_rows": [int(df.loc[row, "source_row"]) for row in members.index if row in own_defect],
            }
        )
    return groups
