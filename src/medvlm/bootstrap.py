"""Bootstrap confidence intervals over test studies, with corpus metrics recomputed exactly per resample.

A resample is a vector of multiplicities (how often each test study was drawn). Every metric family below turns a
(B, n) matrix of multiplicities into B metric values at once, from statistics precomputed once per study, so that
1000 resamples cost seconds instead of 1000 pycocoevalcap runs:

- BLEU: pycocoevalcap's per-study (testlen, closest reflen, guesses, correct n-grams) summed, then its formula.
- CIDEr-D: document frequencies of the resample (studies counted with multiplicity, as pycocoevalcap would see a
  duplicated study) -> idf weights -> the same cosine/penalty arithmetic, as sparse matrix products.
- METEOR: the jar's per-study statistics lines summed the way its EVAL command aggregates them
  (MeteorStats.addStats: chunks of perfect segments are not added) and scored with the jar's `-l en -norm`
  parameters; tests check it against the jar itself.
- ROUGE-L, MedVLM per-report scores: means of per-study values.
- clinical efficacy: the weighted confusion counts.

Point estimates are always the full-sample values (pycocoevalcap's own numbers); resamples only give the interval.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import sparse

from medvlm.metrics import clinical_efficacy
from medvlm.progress import Advance, unwatched

MetricFamily = Callable[[np.ndarray], dict[str, np.ndarray]]

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap BleuScorer's guards against zero division


def bleu_family(gts: dict[str, list[str]], res: dict[str, list[str]], n: int = 4) -> MetricFamily:
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    rows = []
    for i in gts:
        comps = cook_test(res[i][0], cook_refs(gts[i], n=n), n=n)
        testlen = comps["testlen"]
        reflen = min((abs(length - testlen), length) for length in comps["reflen"])[1]  # option="closest"
        rows.append([testlen, reflen, *comps["guess"], *comps["correct"]])
    stats = np.asarray(rows, dtype=float)

    def compute(counts: np.ndarray) -> dict[str, np.ndarray]:
        total = counts @ stats
        testlen, reflen = total[:, 0], total[:, 1]
        guess, correct = total[:, 2 : 2 + n], total[:, 2 + n :]
        out, running = {}, np.ones(len(total))
        ratio = (testlen + _TINY) / (reflen + _SMALL)
        brevity = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, _TINY)), 1.0)
        for k in range(n):
            running = running * (correct[:, k] + _TINY) / (guess[:, k] + _SMALL)
            out[f"BLEU_{k + 1}"] = running ** (1.0 / (k + 1)) * brevity
        return out

    return compute


def _ngram_counts(text: str, n: int = 4) -> dict[tuple[str, ...], int]:
    from pycocoevalcap.cider.cider_scorer import precook

    return dict(precook(text, n))


def cider_family(gts: dict[str, list[str]], res: dict[str, list[str]], n: int = 4, sigma: float = 6.0) -> MetricFamily:
    """Exact pycocoevalcap CIDEr-D of every resample (idf recomputed from the resampled references)."""
    vocab: dict[tuple[str, ...], int] = {}

    def col(g: tuple[str, ...]) -> int:
        return vocab.setdefault(g, len(vocab))

    doc_rows, doc_cols = [], []
    num, hyp_sq, ref_sq = ([], [], []), ([], [], []), ([], [], [])  # (row, col, value) triples
    pair_study, pair_penalty, pair_refs = [], [], []
    ids = list(gts)
    for i, sid in enumerate(ids):
        hyp = _ngram_counts(res[sid][0], n)
        refs = [_ngram_counts(r, n) for r in gts[sid]]
        for g in set().union(*refs):
            doc_rows.append(i)
            doc_cols.append(col(g))
        for g, c in hyp.items():
            _add(hyp_sq, i * n + len(g) - 1, col(g), c * c)
        hyp_bigrams = sum(c for g, c in hyp.items() if len(g) == 2)  # pycocoevalcap's "length" counts bigrams
        for ref in refs:
            p = len(pair_study)
            pair_study.append(i)
            pair_refs.append(len(refs))
            delta = hyp_bigrams - sum(c for g, c in ref.items() if len(g) == 2)
            pair_penalty.append(math.exp(-(delta**2) / (2 * sigma**2)))
            for g, c in ref.items():
                _add(ref_sq, p * n + len(g) - 1, col(g), c * c)
                if g in hyp:
                    _add(num, p * n + len(g) - 1, col(g), min(hyp[g], c) * c)
    n_studies, n_pairs, v = len(ids), len(pair_study), len(vocab)
    doc = sparse.csr_matrix((np.ones(len(doc_rows)), (doc_rows, doc_cols)), shape=(n_studies, v))
    num_m = _csr(num, n_pairs * n, v)
    hyp_m = _csr(hyp_sq, n_studies * n, v)
    ref_m = _csr(ref_sq, n_pairs * n, v)
    pair_study_a = np.asarray(pair_study)
    pair_weight = np.asarray(pair_penalty) / np.asarray(pair_refs, dtype=float)
    log_n = math.log(float(n_studies))

    def compute(counts: np.ndarray) -> dict[str, np.ndarray]:
        b = len(counts)
        df = (doc.T @ counts.T.astype(float))  # (V, B) document frequencies with multiplicity
        w2 = (log_n - np.log(np.maximum(1.0, df))) ** 2
        num_v = (num_m @ w2).reshape(n_pairs, n, b)
        hyp_norm = np.sqrt(hyp_m @ w2).reshape(n_studies, n, b)[pair_study_a]
        ref_norm = np.sqrt(ref_m @ w2).reshape(n_pairs, n, b)
        denom = hyp_norm * ref_norm
        val = np.where(denom > 0, num_v / np.where(denom > 0, denom, 1.0), num_v)
        per_pair = val.mean(axis=1) * pair_weight[:, None] * 10.0  # (pairs, B)
        per_study = np.zeros((n_studies, b))
        np.add.at(per_study, pair_study_a, per_pair)
        return {"CIDEr": np.einsum("bi,ib->b", counts, per_study) / counts.sum(axis=1)}

    return compute


def _add(triples, row: int, col: int, value: float) -> None:
    triples[0].append(row)
    triples[1].append(col)
    triples[2].append(value)


def _csr(triples, rows: int, cols: int) -> sparse.csr_matrix:
    return sparse.csr_matrix((np.asarray(triples[2], dtype=float), (triples[0], triples[1])), shape=(rows, cols))


# METEOR 1.5 `-l en -norm` parameters (the jar's "rank" task defaults for English).
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA, METEOR_DELTA = 0.85, 0.20, 0.60, 0.75
METEOR_MODULE_WEIGHTS = (1.0, 0.6, 0.8, 0.6)  # exact, stem, synonym, paraphrase


def meteor_stats_matrix(stats: list[str]) -> np.ndarray:
    """Per-study statistics lines -> (n, 23), with chunks of perfect segments zeroed as MeteorStats.addStats does."""
    s = np.asarray([[float(v) for v in line.split()] for line in stats], dtype=float)
    test_total, ref_total = s[:, 4:20:2].sum(axis=1), s[:, 5:20:2].sum(axis=1)
    perfect = (test_total == s[:, 0]) & (ref_total == s[:, 1]) & (s[:, 20] == 1)
    s[perfect, 20] = 0.0
    return s


def meteor_from_totals(t: np.ndarray) -> np.ndarray:
    """MeteorScorer.computeMetrics on aggregated statistics (rows = resamples)."""
    d = METEOR_DELTA
    test_len, ref_len, test_fn, ref_fn = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
    test_w = sum(w * (d * t[:, 4 + 4 * i] + (1 - d) * t[:, 6 + 4 * i]) for i, w in enumerate(METEOR_MODULE_WEIGHTS))
    ref_w = sum(w * (d * t[:, 5 + 4 * i] + (1 - d) * t[:, 7 + 4 * i]) for i, w in enumerate(METEOR_MODULE_WEIGHTS))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = test_w / (d * (test_len - test_fn) + (1 - d) * test_fn)
        recall = ref_w / (d * (ref_len - ref_fn) + (1 - d) * ref_fn)
        fmean = 1.0 / ((1 - METEOR_ALPHA) / precision + METEOR_ALPHA / recall)
        test_total, ref_total = t[:, 4:20:2].sum(axis=1), t[:, 5:20:2].sum(axis=1)
        perfect = (test_total == test_len) & (ref_total == ref_len) & (t[:, 20] == 1)
        frag = np.where(perfect, 0.0, t[:, 20] / ((t[:, 21] + t[:, 22]) / 2))
        score = fmean * (1 - METEOR_GAMMA * frag**METEOR_BETA)
    return np.maximum(np.nan_to_num(score, nan=0.0), 0.0)


def meteor_family(stats: list[str]) -> MetricFamily:
    matrix = meteor_stats_matrix(stats)
    return lambda counts: {"METEOR": meteor_from_totals(counts @ matrix)}


def mean_family(per_study: dict[str, np.ndarray]) -> MetricFamily:
    names = list(per_study)
    values = np.stack([np.asarray(per_study[k], dtype=float) for k in names], axis=1)

    def compute(counts: np.ndarray) -> dict[str, np.ndarray]:
        means = counts @ values / counts.sum(axis=1, keepdims=True)
        return {k: means[:, j] for j, k in enumerate(names)}

    return compute


def clinical_family(
    y_true: np.ndarray, y_prob: np.ndarray, label_names: list[str], primary_label: str, threshold, prefix: str = ""
) -> MetricFamily:
    def compute(counts: np.ndarray) -> dict[str, np.ndarray]:
        rows = [
            clinical_efficacy(y_true, y_prob, label_names, primary_label, threshold, weights=c, per_label=False)
            for c in counts
        ]
        # prefix replaces "CE_" (e.g. "DEM_" for the discrimination module's own probabilities)
        return {k.replace("CE_", prefix, 1) if prefix else k: np.asarray([r[k] for r in rows]) for k in rows[0]}

    return compute


def bootstrap_intervals(
    families: list[MetricFamily],
    n: int,
    point: dict[str, float],
    iterations: int,
    seed: int,
    confidence: float,
    batch: int = 100,
    advance: Advance = unwatched,
) -> dict[str, dict[str, float | None]]:
    """Percentile CIs: {metric: {"value": point estimate, "ci_low", "ci_high", "n_resamples"}}.

    Resamples draw n studies with replacement (seeded, so a seed gives the same intervals). A metric undefined in
    some resamples (AUROC with one class) uses the resamples where it is defined and says how many. `advance`
    hears of every batch of resamples scored.
    """
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {}
    for start in range(0, iterations, batch):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(batch, iterations - start)).astype(float)
        for family in families:
            for name, values in family(counts).items():
                draws.setdefault(name, []).append(np.asarray(values, dtype=float))
        advance(len(counts))
    alpha = (1.0 - confidence) / 2.0
    out: dict[str, dict[str, float | None]] = {}
    for name, chunks in draws.items():
        values = np.concatenate(chunks)
        values = values[np.isfinite(values)]
        low, high = (np.percentile(values, [100 * alpha, 100 * (1 - alpha)]) if len(values) else (math.nan, math.nan))
        out[name] = {
            "value": _finite_or_none(point.get(name, math.nan)),
            "ci_low": _finite_or_none(low),
            "ci_high": _finite_or_none(high),
            "n_resamples": int(len(values)),
        }
    return out


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def aggregate_runs(runs: list[dict[str, float]], confidence: float = 0.95) -> dict[str, dict[str, float | None]]:
    """Metric dicts of runs with different seeds -> mean, sample std and a Student-t interval of the mean."""
    from scipy import stats as st

    names = sorted({k for r in runs for k in r})
    out: dict[str, dict[str, float | None]] = {}
    for name in names:
        values = np.asarray([r[name] for r in runs if r.get(name) is not None], dtype=float)
        values = values[np.isfinite(values)]
        if not len(values):
            out[name] = {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n_runs": 0}
            continue
        mean = float(values.mean())
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        half = float(st.t.ppf(0.5 + confidence / 2, len(values) - 1) * std / math.sqrt(len(values))) if len(values) > 1 else 0.0
        out[name] = {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n_runs": int(len(values))}
    return out
