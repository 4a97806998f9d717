"""Per-label thresholds, following rates and the collapse check (src/medvlm/chain_metrics.py)."""

import numpy as np
import pytest

from medvlm.chain_metrics import (
    choose_thresholds,
    collapse_metrics,
    collapsed,
    f1_best_threshold,
    follow_rates,
    threshold_vector,
)
from medvlm.metrics import clinical_efficacy


def test_rare_label_threshold_is_below_half_when_its_probabilities_stay_low():
    y = np.array([0] * 18 + [1, 1])
    p = np.array([0.05] * 18 + [0.3, 0.35])
    t = f1_best_threshold(y, p)
    assert 0.05 < t < 0.3  # a fixed 0.5 would never fire
    assert f1_best_threshold(np.zeros(5), np.linspace(0, 1, 5)) == 0.5  # no positives: the default


def test_thresholds_per_label_change_per_label_f1():
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    p = np.array([[0.9, 0.2], [0.8, 0.3], [0.1, 0.1], [0.2, 0.35]])
    thr = choose_thresholds(y, p, ["a", "b"])
    assert thr["a"] == pytest.approx(0.5)  # any cut in (0.2, 0.8) is perfect: the one closest to 0.5 wins
    assert 0.2 < thr["b"] < 0.3
    fixed = clinical_efficacy(y, p, ["a", "b"], "a", 0.5)
    tuned = clinical_efficacy(y, p, ["a", "b"], "a", threshold_vector(thr, ["a", "b"]))
    assert fixed["CE_b_f1"] == 0.0 and tuned["CE_b_f1"] == 1.0
    assert tuned["CE_a_f1"] == fixed["CE_a_f1"] == 1.0
    assert tuned["CE_b_auroc"] == pytest.approx(fixed["CE_b_auroc"])  # AUROC does not depend on the cut
    assert tuned["CE_macro_auroc"] == pytest.approx((1.0 + tuned["CE_b_auroc"]) / 2)


def test_follow_rates_say_which_link_lost_the_finding():
    detected = np.array([[1, 1], [1, 0], [0, 0], [1, 1]], dtype=bool)
    written = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=bool)
    out = follow_rates(detected, written, ["a", "b"])
    assert out["follow_a_written"] == 1.0 and out["follow_a_unsupported"] == 0.0
    assert out["follow_b_written"] == 0.0  # detected twice, never written: the text lost it
    assert out["follow_b_unsupported"] == 1.0  # written once, never detected: the text invented it
    assert out["follow_macro_written"] == 0.5


def test_collapse_metrics_tell_a_copying_generator_from_a_varied_one():
    train = ["the lungs are clear .", "a nodule is seen in the left lung .", "ground glass in both lungs ."]
    same = ["the lungs are clear ."] * 10
    varied = [f"finding {i} seen in lobe {i} ." for i in range(10)]
    c_same, c_varied = collapse_metrics(same, train), collapse_metrics(varied, train)
    assert c_same["collapse_unique_share"] == 0.1 and collapsed(c_same)
    assert c_same["collapse_train_copy_rate"] == 1.0 and c_same["collapse_nearest_train_bleu4"] == pytest.approx(1.0)
    assert c_varied["collapse_unique_share"] == 1.0 and not collapsed(c_varied)
    assert c_varied["collapse_train_copy_rate"] == 0.0 and c_varied["collapse_nearest_train_bleu4"] < 0.5
    assert c_varied["collapse_distinct_2"] > c_same["collapse_distinct_2"]
    assert collapsed({"collapse_unique_share": {"value": 0.05}})
