"""Bootstrap CIs: deterministic per seed, containing the point estimate, exact per resample, seed aggregation."""

import numpy as np
import pytest

from medvlm.bootstrap import (
    aggregate_runs,
    bleu_family,
    bootstrap_intervals,
    cider_family,
    clinical_family,
    mean_family,
    meteor_from_totals,
    meteor_stats_matrix,
)
from medvlm.metrics import coco_scores

WORDS = "lungs clear no effusion heart normal opacity left right lobe ground glass nodule small consolidation".split()


def _corpus(n=40, seed=0):
    rng = np.random.default_rng(seed)
    sent = lambda: " ".join(rng.choice(WORDS, rng.integers(6, 14))) + " ."
    gts = {f"s{i}": [sent() for _ in range(1 + (i % 3 == 0))] for i in range(n)}
    res = {k: [v[0] if i % 4 == 0 else sent()] for i, (k, v) in enumerate(gts.items())}
    return gts, res


def _families(gts, res, result):
    return [bleu_family(gts, res), cider_family(gts, res), mean_family({"ROUGE_L": result.per_study["ROUGE_L"]})]


def test_resample_scores_equal_pycocoevalcap_on_the_duplicated_set():
    gts, res = _corpus()
    ids = list(gts)
    counts = np.random.default_rng(3).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=2).astype(float)
    families = _families(gts, res, coco_scores(gts, res))
    for row in counts:
        dup_g = {f"{k}#{j}": gts[k] for k, c in zip(ids, row) for j in range(int(c))}
        dup_r = {f"{k}#{j}": res[k] for k, c in zip(ids, row) for j in range(int(c))}
        expected = coco_scores(dup_g, dup_r).scores
        got = {k: v[0] for f in families for k, v in f(row[None]).items()}
        for name in ["BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr"]:
            assert got[name] == pytest.approx(expected[name], abs=1e-9), name


def test_intervals_deterministic_and_contain_point_estimate():
    gts, res = _corpus()
    result = coco_scores(gts, res)
    run = lambda seed: bootstrap_intervals(_families(gts, res, result), len(gts), result.scores, 300, seed, 0.95)
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    for name in ["BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr"]:
        assert a[name]["ci_low"] <= a[name]["value"] <= a[name]["ci_high"], name
        assert a[name]["ci_low"] < a[name]["ci_high"]


def test_clinical_intervals_and_undefined_auroc():
    y = np.array([[1], [0]] * 10)
    p = np.linspace(0, 1, 20)[:, None]
    out = bootstrap_intervals([clinical_family(y, p, ["a"], "a", 0.5)], 20, {"CE_accuracy": 0.5}, 200, 0, 0.9)
    assert 0 <= out["CE_accuracy"]["ci_low"] <= 0.5 <= out["CE_accuracy"]["ci_high"] <= 1
    assert out["CE_auroc"]["n_resamples"] == 200
    one_class = bootstrap_intervals([clinical_family(np.ones((5, 1)), p[:5], ["a"], "a", 0.5)], 5, {}, 50, 0, 0.9)
    assert one_class["CE_auroc"]["ci_low"] is None and one_class["CE_auroc"]["n_resamples"] == 0


def test_meteor_aggregation_formula_perfect_segment_and_zero_match():
    # 23 fields: lengths, function words, 4 modules x (tc rc tf rf), chunks, word matches
    perfect = "5.0 5.0 1.0 1.0 4.0 4.0 1.0 1.0 " + "0.0 " * 12 + "1.0 5.0 5.0"
    nothing = "4.0 4.0 0.0 0.0 " + "0.0 " * 16 + "0.0 0.0 0.0"
    m = meteor_stats_matrix([perfect, nothing])
    assert m[0, 20] == 0.0  # perfect segments do not add chunks (MeteorStats.addStats)
    assert meteor_from_totals(m[:1]) == pytest.approx([1.0])
    assert meteor_from_totals(m[1:]) == pytest.approx([0.0])


def test_aggregate_runs_mean_and_interval():
    runs = [{"BLEU_4": 0.2, "CIDEr": 1.0}, {"BLEU_4": 0.3, "CIDEr": 1.2}, {"BLEU_4": 0.25, "CIDEr": None}]
    agg = aggregate_runs(runs, 0.95)
    assert agg["BLEU_4"]["mean"] == pytest.approx(0.25) and agg["BLEU_4"]["n_runs"] == 3
    assert agg["BLEU_4"]["ci_low"] < 0.25 < agg["BLEU_4"]["ci_high"]
    assert agg["CIDEr"]["n_runs"] == 2 and agg["CIDEr"]["mean"] == pytest.approx(1.1)
