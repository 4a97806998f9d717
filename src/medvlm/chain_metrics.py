"""Where a finding is lost on the way image -> discrimination module -> text, and whether the text collapsed.

- Thresholds: one per label, chosen on the *training* split (the F1-best cut of the module's own probabilities),
  because a fixed 0.5 never fires for a rare finding whose probabilities stay low.
- Following: per label, how often a finding the discrimination module (DEM) detects is written in the report
  (`follow_<label>_written` = P(written | detected)) and how often a written finding was not detected
  (`follow_<label>_unsupported` = P(not detected | written)). High unsupported rates mean the text invents; a
  low written rate with a good DEM means the text loses what the vision side saw.
- Collapse (a generator that writes one report for every image can still score a good BLEU): the share of unique
  generated reports, distinct-1/2 (unique n-grams / all n-grams), the share that copies a training report exactly,
  and the mean BLEU-4 of each generation against its nearest training report.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

COLLAPSE_UNIQUE_SHARE = 0.2  # below this share of unique reports, results.md warns that the model collapsed


def f1_best_threshold(y_true: np.ndarray, y_prob: np.ndarray, default: float = 0.5) -> float:
    """The probability cut with the best F1 on (y_true, y_prob) of one label; `default` without positives.

    Candidates are midpoints between consecutive distinct probabilities, so the cut generalises to unseen scores;
    ties go to the candidate closest to `default`."""
    y_true = np.asarray(y_true).astype(bool)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_true.sum() == 0 or y_true.all():
        return default
    values = np.unique(y_prob)
    candidates = np.concatenate([[default], (values[:-1] + values[1:]) / 2]) if len(values) > 1 else np.array([default])
    best, best_f1 = default, -1.0
    for t in candidates:
        pred = y_prob > t
        tp = float(np.sum(pred & y_true))
        f1 = 2 * tp / (pred.sum() + y_true.sum()) if pred.sum() + y_true.sum() else 0.0
        if f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and abs(t - default) < abs(best - default)):
            best, best_f1 = float(t), f1
    return best


def choose_thresholds(y_true: np.ndarray, y_prob: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """Per-label F1-best thresholds (see f1_best_threshold); y_true/y_prob (n, L)."""
    return {name: round(f1_best_threshold(y_true[:, j], y_prob[:, j]), 6) for j, name in enumerate(label_names)}


def threshold_vector(thresholds: dict[str, float] | float | None, label_names: Sequence[str],
                     default: float = 0.5) -> np.ndarray:
    """(L,) thresholds from a per-label dict (missing labels -> default), a scalar, or None."""
    if thresholds is None:
        return np.full(len(label_names), default)
    if isinstance(thresholds, dict):
        return np.asarray([float(thresholds.get(n, default)) for n in label_names])
    return np.full(len(label_names), float(thresholds))


def follow_rates(detected: np.ndarray, written: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """follow_<label>_written / _unsupported per label and their macro means (labels where they are defined)."""
    detected, written = np.asarray(detected).astype(bool), np.asarray(written).astype(bool)
    out: dict[str, float] = {}
    kept, invented = [], []
    for j, name in enumerate(label_names):
        d, w = detected[:, j], written[:, j]
        if d.any():
            out[f"follow_{name}_written"] = float(np.mean(w[d]))
            kept.append(out[f"follow_{name}_written"])
        if w.any():
            out[f"follow_{name}_unsupported"] = float(np.mean(~d[w]))
            invented.append(out[f"follow_{name}_unsupported"])
    if kept:
        out["follow_macro_written"] = float(np.mean(kept))
    if invented:
        out["follow_macro_unsupported"] = float(np.mean(invented))
    out["follow_agreement"] = float(np.mean(detected == written))  # same decision per (image, label)
    return out


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def collapse_metrics(generated: Sequence[str], train_reports: Sequence[str]) -> dict[str, float]:
    """Diversity and copying of preprocessed generated reports against preprocessed training reports."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    gen = [g.split() for g in generated]
    out = {"collapse_unique_share": len(set(generated)) / max(1, len(generated))}
    for n in (1, 2):
        grams = [g for tokens in gen for g in _ngrams(tokens, n)]
        out[f"collapse_distinct_{n}"] = len(set(grams)) / max(1, len(grams))
    train_set = set(train_reports)
    out["collapse_train_copy_rate"] = float(np.mean([g in train_set for g in generated])) if generated else 0.0
    unique_train = [t.split() for t in sorted(train_set)]
    smooth = SmoothingFunction().method1
    best_for: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns about zero n-gram overlaps
        for text, tokens in zip(generated, gen):
            if text not in best_for:
                best_for[text] = max((sentence_bleu([t], tokens, smoothing_function=smooth) for t in unique_train),
                                     default=0.0)
    out["collapse_nearest_train_bleu4"] = float(np.mean([best_for[t] for t in generated])) if generated else 0.0
    return out


def collapsed(metrics: dict) -> bool:
    """Whether a metrics dict (name -> {"value": ...} or name -> float) shows a collapsed generator."""
    share = metrics.get("collapse_unique_share")
    value = share.get("value") if isinstance(share, dict) else share
    return value is not None and value < COLLAPSE_UNIQUE_SHARE
