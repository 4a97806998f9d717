"""Metric wrappers on hand-checked cases, preprocessing conventions and clinical efficacy."""

import math

import numpy as np
import pytest
from meteor_session import shared_meteor

from medvlm.errors import EvaluationError
from medvlm.metrics import (
    CONVENTIONS,
    PREPROCESSING,
    clean_report,
    clinical_efficacy,
    coco_scores,
    dot_split,
    medvlm_scores,
    preprocess,
    sanitise_for_meteor,
    weighted_auroc,
)

TEXT = "the lungs are clear . no pleural effusion or pneumothorax . heart size is normal ."


def test_clean_report_follows_r2gen_convention():
    raw = "Ground-glass opacity (GGO) in the right lung, 2.5 cm!\nNo effusion.. Heart: normal."
    assert clean_report(raw) == "ground-glass opacity ggo in the right lung 2 . 5 cm no effusion . heart normal ."
    assert clean_report("Café  naïve") == "cafe naive"
    assert dot_split("No effusion.  Heart normal.") == "No effusion . Heart normal ."
    assert set(CONVENTIONS) >= set(PREPROCESSING)


def test_unknown_convention_is_an_evaluation_error():
    with pytest.raises(EvaluationError, match="unknown preprocessing"):
        preprocess(["x"], "bogus")


def test_identical_texts_score_one_and_disjoint_zero():
    same = coco_scores({"a": [TEXT], "b": [TEXT]}, {"a": [TEXT], "b": [TEXT]})
    for k in ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L"]:
        assert same.scores[k] == pytest.approx(1.0, abs=1e-6)
    disjoint = coco_scores({"a": [TEXT], "b": [TEXT]}, {"a": ["xx yy zz ww vv"], "b": ["qq rr ss tt uu"]})
    for k in ["BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr"]:
        assert disjoint.scores[k] == pytest.approx(0.0, abs=1e-6)


def test_known_pycocoevalcap_value():
    # BLEU-1 by hand: hypothesis "the cat sat on the mat" vs "the cat is on the mat": 5 of 6 unigrams match
    # (clipped), lengths equal so no brevity penalty -> 5/6. ROUGE-L: LCS 5 -> P = R = 5/6 -> F = 5/6.
    r = coco_scores({"x": ["the cat is on the mat"]}, {"x": ["the cat sat on the mat"]})
    assert r.scores["BLEU_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert r.scores["ROUGE_L"] == pytest.approx(5 / 6, abs=1e-9)


def test_multi_reference_uses_the_best_reference():
    one = coco_scores({"x": ["completely different words here"]}, {"x": [TEXT]})
    two = coco_scores({"x": ["completely different words here", TEXT]}, {"x": [TEXT]})
    assert two.scores["BLEU_4"] > 0.99 > one.scores["BLEU_4"]


def test_id_mismatch_names_the_ids():
    with pytest.raises(EvaluationError, match="s2"):
        coco_scores({"s1": [TEXT], "s2": [TEXT]}, {"s1": [TEXT], "s3": [TEXT]})


def test_meteor_survives_newlines_and_non_ascii():
    meteor = shared_meteor()
    gts = {"a": [TEXT], "b": ["opacit\u00e9 in the left lung ."]}
    res = {"a": ["the lungs are clear .\n\nno pleural effusion ."], "b": ["opacit\u00e9 in the left\tlung |||."]}
    result = meteor.score(gts, res)
    assert 0.0 < result.corpus <= 1.0 and len(result.segments) == 2
    assert sanitise_for_meteor("a\n\nb\u00e9 ||| c") == "a be c"
    same = meteor.score({"a": [TEXT]}, {"a": [TEXT]})
    assert same.corpus == pytest.approx(1.0, abs=0.01)


def test_medvlm_convention_en_and_zh():
    s = medvlm_scores({"a": [TEXT], "b": [TEXT]}, {"a": [TEXT], "b": ["nothing in common at all"]})
    assert s["medvlm_BLEU_4"][0] == pytest.approx(1.0) and s["medvlm_BLEU_4"][1] == 0.0
    assert s["medvlm_METEOR"][0] > 0.99 and s["medvlm_METEOR"][1] < 0.1
    zh = medvlm_scores({"a": ["双肺多发磨玻璃影，考虑病毒性肺炎。"]}, {"a": ["双肺多发磨玻璃影，考虑病毒性肺炎。"]}, "zh")
    assert zh["medvlm_BLEU_4"][0] == pytest.approx(1.0)


def test_clinical_efficacy_hand_checked():
    names = ["pneumonia", "nodule"]
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    p = np.array([[0.9, 0.1], [0.4, 0.8], [0.2, 0.7], [0.1, 0.6]])
    ce = clinical_efficacy(y, p, names, "pneumonia", threshold=0.5)
    # pneumonia: predicted [1,0,0,0] vs true [1,1,0,0]: TP 1, FN 1, TN 2 -> acc .75, P 1, R .5, F1 2/3, AUROC 1
    assert ce["CE_accuracy"] == 0.75 and ce["CE_precision"] == 1.0 and ce["CE_recall"] == 0.5
    assert ce["CE_f1"] == pytest.approx(2 / 3) and ce["CE_auroc"] == 1.0
    # nodule: predicted [0,1,1,1] vs [0,1,0,1]: TP 2, FP 1 -> P 2/3, R 1
    assert ce["CE_nodule_precision"] == pytest.approx(2 / 3) and ce["CE_nodule_recall"] == 1.0
    # micro over both labels: TP 3, FP 1, FN 1
    assert ce["CE_micro_precision"] == 0.75 and ce["CE_micro_recall"] == 0.75
    assert ce["CE_macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_weighted_auroc_matches_sklearn_and_handles_one_class():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60).astype(bool)
    s = np.round(rng.random(60), 1)  # ties on purpose
    w = rng.integers(0, 3, 60).astype(float)
    assert weighted_auroc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w))
    assert math.isnan(weighted_auroc(np.ones(5, bool), s[:5], np.ones(5)))


def test_clinical_efficacy_shape_error():
    with pytest.raises(EvaluationError, match="must both be"):
        clinical_efficacy(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"], "a")
