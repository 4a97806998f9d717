"""Monitor stage: does a new batch of images (and reports) look like the training data? Evidently drift report.

Reference = the training split (monitor.reference); current = monitor.incoming_dir ({images/, annotation.jsonl}
as the phantom writes it, or just image files). One row per study, features:
  image statistics   width, height, intensity mean / std, entropy (scanner and protocol changes)
  embedding PCs      monitor.pca_components principal components, fitted on the reference, of pretrained visual
                     embeddings (medvlm.features.embed_images; any embed_fn can be passed)
  report text        words per report, out-of-vocabulary rate (reference rows: leave-one-out, i.e. a word only
                     that report uses counts as OOV, so in-sample rows are not unfairly "perfect")
  diagnosis          predicted primary label of the champion on the batch vs the training prevalence, and the
                     batch's own labels when it carries them (prevalence shift)
A feature group that cannot be computed is skipped and the summary says why. The incoming batch is validated like
any data (medvlm.data.validate); quarantined rows are left out of the comparison and counted.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from medvlm.config import Config
from medvlm.errors import DataError, MedVLMError
from medvlm.manifest import read_manifest
from medvlm.progress import StageProgress

INCOMING_MANIFEST = "annotation.jsonl"
_WORD = re.compile(r"[a-z]+|[\u4e00-\u9fff]")  # English words; Chinese characters one by one


# ---------------------------------------------------------------- features
def image_stats(image: Image.Image) -> dict[str, float]:
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    hist = np.bincount(pixels.astype(np.uint8).ravel(), minlength=256) / pixels.size
    nonzero = hist[hist > 0]
    return {
        "width": float(image.width),
        "height": float(image.height),
        "intensity_mean": float(pixels.mean()),
        "intensity_std": float(pixels.std()),
        "entropy": float(-(nonzero * np.log2(nonzero)).sum()),
    }


def pixel_embedding(images: list[Image.Image], size: int) -> np.ndarray:
    """Downsampled pixels as a vector: a model-free embedding (tests, or where no vision weights exist)."""
    return np.stack([np.asarray(im.convert("L").resize((size, size)), dtype=np.float32).ravel() / 255.0 for im in images])


def default_embed_fn(cfg: Config) -> Callable[[list[Image.Image]], np.ndarray]:
    from medvlm.features import embed_images
    from medvlm.model.vision import build_vision

    vision = build_vision(cfg).eval()  # once: the monitor embeds its images a batch at a time
    return lambda images: embed_images(images, cfg, vision)


def _embed_in_batches(embed: Callable[[list[Image.Image]], np.ndarray], images: list[Image.Image],
                      batch_size: int, bar: StageProgress) -> np.ndarray:
    """`embed` over the images in batches of features.batch_size, the batches embed_images forms itself, so the
    embeddings are the ones of a single call; the bar hears of each."""
    out = []
    for start in range(0, len(images), batch_size):
        out.append(np.asarray(embed(images[start : start + batch_size])))
        bar.advance(len(out[-1]))
    return np.concatenate(out)


def pca_columns(ref_emb: np.ndarray, cur_emb: np.ndarray, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.decomposition import PCA

    k = max(1, min(k, ref_emb.shape[0] - 1, ref_emb.shape[1]))
    pca = PCA(n_components=k, random_state=0).fit(ref_emb)
    names = [f"embed_pc{i + 1}" for i in range(k)]
    return pd.DataFrame(pca.transform(ref_emb), columns=names), pd.DataFrame(pca.transform(cur_emb), columns=names)


def words(text) -> list[str]:
    return _WORD.findall(str(text).lower()) if isinstance(text, str) else []


def text_columns(ref_reports: list[str], cur_reports: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    ref_words = [words(r) for r in ref_reports]
    doc_freq: dict[str, int] = {}
    for ws in ref_words:
        for w in set(ws):
            doc_freq[w] = doc_freq.get(w, 0) + 1

    def frame(all_words: list[list[str]], own_doc_counts: int) -> pd.DataFrame:
        rows = []
        for ws in all_words:
            oov = sum(1 for w in ws if doc_freq.get(w, 0) <= own_doc_counts)
            rows.append({"report_words": float(len(ws)), "report_oov_rate": oov / len(ws) if ws else 0.0})
        return pd.DataFrame(rows, columns=["report_words", "report_oov_rate"])

    # a reference report's own words count once in doc_freq: "only this report has it" = OOV (leave-one-out)
    return frame(ref_words, 1), frame([words(r) for r in cur_reports], 0)


# ---------------------------------------------------------------- data
def _first_image(row, root: Path, max_pixels: int) -> Image.Image:
    from medvlm.data.images import load_image

    images = row["images"] if isinstance(row["images"], list) else [row["images"]]
    return load_image(root / images[0], max_pixels=max_pixels)


def _first_images(rows: pd.DataFrame, root: Path, max_pixels: int, bar: StageProgress) -> list[Image.Image]:
    images = []
    for _, row in rows.iterrows():
        images.append(_first_image(row, root, max_pixels))
        bar.advance()
    return images


def _model_inputs(predictor, rows: pd.DataFrame, root: Path, images: list[Image.Image]) -> list:
    """What the predictor's encoder takes: whole volumes for a volume encoder (the drift statistics and embeddings
    use the middle slice of each volume), the first images otherwise."""
    from medvlm.model.vision3d import VolumeEncoder

    vision = getattr(getattr(predictor, "model", None), "vision", None)
    if not isinstance(vision, VolumeEncoder):
        return images
    from medvlm.features import load_view

    firsts = [r["images"][0] if isinstance(r["images"], list) else r["images"] for _, r in rows.iterrows()]
    return [load_view(root / rel, getattr(predictor, "cfg", None), vision) for rel in firsts]


def reference_rows(cfg: Config) -> pd.DataFrame:
    path = Path(cfg.split.out_dir) / f"{cfg.monitor.reference}.jsonl"
    rows = read_manifest(path)
    if rows.empty:
        raise DataError(f"{path}: reference split has no rows (run `dvc repro split`)")
    return rows


def validate_incoming(cfg: Config, incoming: Path, out_dir: Path) -> tuple[pd.DataFrame, int, Path]:
    """The batch through the same validation as training data; returns kept rows, quarantined count, their root.

    A batch without annotation.jsonl (images only) gets the image checks (decode, size, pixel-bomb guard) only.
    """
    manifest = incoming / INCOMING_MANIFEST
    if manifest.is_file():
        from medvlm.data.validate import QUARANTINE, VALIDATED, run_validation

        sub = out_dir / "validation"
        batch_cfg = cfg.model_copy(
            update={
                "data": cfg.data.model_copy(update={"root": str(incoming), "manifest": INCOMING_MANIFEST,
                                                    "source": "jsonl", "image_dir": ""}),
                # the monitor reports a bad batch instead of failing on it: no bad-fraction limit here
                "validate_": cfg.validation.model_copy(update={"out_dir": str(sub), "manifest_dir": str(sub),
                                                                "max_bad_fraction": 1.0}),
            }
        )
        try:
            run_validation(batch_cfg)
        except DataError as exc:
            if "no rows" in str(exc):
                raise DataError(f"{incoming}: the incoming batch is empty ({manifest} has no rows)") from None
            raise
        kept = read_manifest(sub / VALIDATED)
        quarantined = sum(1 for _ in (sub / QUARANTINE).open(encoding="utf-8")) - 1
        return kept, max(quarantined, 0), incoming
    from medvlm.data.images import probe_image
    from medvlm.predict import collect_images

    files, _ = collect_images([incoming])
    kept, bad = [], []
    for path in files:
        try:
            probe_image(path, max_pixels=cfg.validation.max_image_pixels)
            kept.append({"study_id": path.stem, "images": [str(path.relative_to(incoming))], "report": None})
        except DataError as exc:
            bad.append({"file": str(path), "reason": str(exc)})
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(bad, columns=["file", "reason"]).to_csv(out_dir / "quarantine.csv", index=False)
    return pd.DataFrame(kept, columns=["study_id", "images", "report"]), len(bad), incoming


# ---------------------------------------------------------------- the stage
def run_monitor(
    cfg: Config,
    incoming_dir: str | Path | None = None,
    *,
    embed_fn: Callable[[list[Image.Image]], np.ndarray] | None = None,
    predictor=None,
) -> dict:
    """Drift of the incoming batch against the reference split -> drift.html, drift.json, summary.json.

    embed_fn: images -> (N, D) embeddings (default medvlm.features.embed_images). predictor: anything with
    .predict(images) (default the registry champion; skipped with a note when there is none)."""
    started = time.perf_counter()
    mcfg = cfg.monitor
    incoming = Path(incoming_dir or mcfg.incoming_dir)
    out_dir = Path(mcfg.out_dir)
    if not incoming.is_dir():
        raise DataError(f"{incoming}: incoming folder not found (monitor.incoming_dir)")
    if not any(p.is_file() for p in incoming.rglob("*")):
        raise DataError(f"{incoming}: the incoming folder is empty, nothing to monitor")
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_rows = reference_rows(cfg)
    cur_rows, n_quarantined, cur_root = validate_incoming(cfg, incoming, out_dir)
    if cur_rows.empty:
        raise DataError(f"{incoming}: no readable images in the incoming batch ({n_quarantined} quarantined)")

    max_pixels = cfg.validation.max_image_pixels
    with StageProgress("monitor: images", len(ref_rows) + len(cur_rows)) as bar:
        ref_images = _first_images(ref_rows, Path(cfg.data.root), max_pixels, bar)
        cur_images = _first_images(cur_rows, cur_root, max_pixels, bar)
    ref = pd.DataFrame([image_stats(im) for im in ref_images])
    cur = pd.DataFrame([image_stats(im) for im in cur_images])
    skipped: dict[str, str] = {}
    categorical: list[str] = []

    embed = embed_fn or default_embed_fn(cfg)
    with StageProgress("monitor: embeddings", len(ref_images) + len(cur_images)) as bar:
        ref_emb = _embed_in_batches(embed, ref_images, cfg.features.batch_size, bar)
        cur_emb = _embed_in_batches(embed, cur_images, cfg.features.batch_size, bar)
    ref_pc, cur_pc = pca_columns(ref_emb, cur_emb, mcfg.pca_components)
    ref, cur = pd.concat([ref, ref_pc], axis=1), pd.concat([cur, cur_pc], axis=1)

    cur_reports = [r for r in cur_rows.get("report", pd.Series(dtype=object)) if isinstance(r, str) and r.strip()]
    if len(cur_reports) == len(cur_rows):
        ref_text, cur_text = text_columns(list(ref_rows["report"]), cur_reports)
        ref, cur = pd.concat([ref, ref_text], axis=1), pd.concat([cur, cur_text], axis=1)
    else:
        skipped["report_text"] = "the incoming batch has no (or not all) reports"

    primary = cfg.data.primary_label
    ref_truth = [int((lab or {}).get(primary, 0)) for lab in ref_rows["labels"]]
    if "labels" in cur_rows and all(isinstance(lab, dict) and primary in lab for lab in cur_rows["labels"]):
        ref[f"label_{primary}"] = ref_truth
        cur[f"label_{primary}"] = [int(lab[primary]) for lab in cur_rows["labels"]]
        categorical.append(f"label_{primary}")
    else:
        skipped["batch_labels"] = "the incoming batch carries no labels"

    predictor, why_not = (predictor, None) if predictor is not None else _champion_predictor(cfg)
    if predictor is not None:
        preds = predictor.predict(_model_inputs(predictor, cur_rows, cur_root, cur_images))
        threshold = cfg.labeler.threshold
        if all(primary in p.get("probabilities", {}) for p in preds):
            ref["diagnosis"] = ref_truth  # the model should see the training prevalence if nothing shifted
            cur["diagnosis"] = [int(p["probabilities"][primary] >= threshold) for p in preds]
            categorical.append("diagnosis")
        else:
            skipped["diagnosis"] = f"the model gives no probability for {primary}"
    else:
        skipped["diagnosis"] = why_not

    result = _evidently(ref, cur, categorical, mcfg.drift_share, out_dir)
    summary = {
        **result,
        "drift_share_threshold": mcfg.drift_share,
        "n_reference": len(ref),
        "n_current": len(cur),
        "n_quarantined": n_quarantined,
        "incoming_dir": str(incoming),
        "skipped": skipped,
        "outputs": {"html": str(out_dir / "drift.html"), "json": str(out_dir / "drift.json"),
                    "summary": str(out_dir / "summary.json")},
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _champion_predictor(cfg: Config):
    if not cfg.monitor.predict_diagnosis:
        return None, "monitor.predict_diagnosis is off"
    from medvlm.predict import load_predictor

    try:
        return load_predictor("champion", cfg), None
    except MedVLMError as exc:
        return None, f"no champion model to predict with ({exc})"


def _evidently(ref: pd.DataFrame, cur: pd.DataFrame, categorical: list[str], drift_share: float, out_dir: Path) -> dict:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    numerical = [c for c in ref.columns if c not in categorical]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    report = Report([DataDriftPreset(drift_share=drift_share)], include_tests=True)
    snapshot = report.run(
        current_data=Dataset.from_pandas(cur.reset_index(drop=True), data_definition=definition),
        reference_data=Dataset.from_pandas(ref.reset_index(drop=True), data_definition=definition),
    )
    snapshot.save_html(str(out_dir / "drift.html"))
    snapshot.save_json(str(out_dir / "drift.json"))
    return parse_drift(snapshot.dict())


def parse_drift(result: dict) -> dict:
    """Evidently 0.7 snapshot dict -> {drift_detected, drifted_share, n_drifted, features{name: ...}}."""
    metrics = {m["id"]: m for m in result["metrics"]}
    status = {t["metric_config"]["metric_id"]: t["status"] for t in result.get("tests", [])}
    features, share, count, detected = {}, None, None, None
    for mid, metric in metrics.items():
        conf = metric["config"]
        if conf["type"].endswith("DriftedColumnsCount"):
            share, count = float(metric["value"]["share"]), int(metric["value"]["count"])
            detected = status.get(mid) == "FAIL"
        elif conf["type"].endswith("ValueDrift"):
            value = float(metric["value"])
            features[conf["column"]] = {
                "drifted": status.get(mid) == "FAIL",
                "score": None if math.isnan(value) else round(value, 6),
                "method": conf["method"],
                "threshold": conf["threshold"],
            }
    if share is None:
        raise DataError("Evidently result has no DriftedColumnsCount metric (unexpected Evidently version?)")
    return {"drift_detected": bool(detected), "drifted_share": round(share, 4), "n_drifted": count,
            "n_features": len(features), "features": features}
