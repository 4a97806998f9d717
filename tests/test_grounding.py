"""Findings from the image into the text: label-forced prior prompt, per-label thresholds saved with the model,
balanced classifier loss, and DEM/CE/follow figures in the evaluation."""

import json

import numpy as np
import pytest
import torch

from medvlm.inference import Predictor
from medvlm.model.discrimination import balanced_pos_weight, discrimination_loss
from medvlm.model.medvlm import MedVLM
from medvlm.model.prompt import prior_knowledge_text
from medvlm.train import train
from tiny_medvlm import TRUNK_SHAPE, tiny_config, write_cached_split

LABEL_PRIOR = {"prior_prompt": True, "prior_source": "labels"}


def test_prior_text_names_only_and_per_label_cuts():
    names = ["pneumonia", "ground_glass", "nodule"]
    assert prior_knowledge_text([0.9, 0.3, 0.2], names, [0.5, 0.25, 0.25], with_probabilities=False) == \
        "Suspected: pneumonia, ground glass."
    assert prior_knowledge_text([0.3, 0.9, 0.2], names, 0.5) == "Suspected: ground glass 0.90."


def test_label_prior_lists_true_findings_in_training_and_predicted_ones_at_test_time(tmp_path):
    cfg = tiny_config(tmp_path, model=LABEL_PRIOR)
    torch.manual_seed(0)
    model = MedVLM(cfg, "freeze")
    logits = torch.tensor([[-3.0, -1.0], [-3.0, -3.0]])  # p = 0.05 / 0.27 and 0.05 / 0.05
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    head, tail = model.layout._post_texts[0]

    def ids(text):
        return model.tokenizer(f"{head} {text}{tail}", add_special_tokens=False)["input_ids"]

    trained = model.post_ids([0, 0], logits, labels)
    assert trained == [ids("Suspected: pneumonia, effusion."), ids("No suspected findings.")]
    assert model.post_ids([0, 0], logits) == [ids("No suspected findings."), ids("No suspected findings.")]
    model.set_label_thresholds({"pneumonia": 0.5, "effusion": 0.2})  # chosen on the training split
    assert model.post_ids([0, 0], logits)[0] == ids("Suspected: effusion.")
    predicted = MedVLM(tiny_config(tmp_path, model={"prior_prompt": True}), "freeze")
    predicted.set_label_thresholds({"pneumonia": 0.5, "effusion": 0.2})  # ignored: it was trained with 0.5
    assert predicted.layout.thresholds is None


def test_balanced_pos_weight_weighs_rare_findings():
    labels = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 0.0]] * 17 + [[1.0, 1.0]])
    w = balanced_pos_weight(labels, cap=10.0)
    assert w.tolist() == pytest.approx([17 / 3, 10.0])  # 19 / 1 capped
    assert balanced_pos_weight(labels, cap=0.0) is None
    logits = torch.zeros(20, 2)
    assert float(discrimination_loss(logits, labels, w)) > float(discrimination_loss(logits, labels))


def test_training_saves_thresholds_that_the_predictor_uses(tmp_path):
    cfg = tiny_config(tmp_path, model={**LABEL_PRIOR, "disc_pos_weight_max": 5.0})
    write_cached_split(cfg)
    train(cfg, "freeze")
    meta = json.loads((tmp_path / "models" / "freeze" / "model_config.json").read_text())
    thresholds = meta["dem_thresholds"]
    assert set(thresholds) == {"pneumonia", "effusion"} and all(0.0 < t < 1.0 for t in thresholds.values())
    loaded = Predictor.load(tmp_path / "models" / "freeze")
    assert loaded.model.layout.thresholds == [thresholds["pneumonia"], thresholds["effusion"]]
    rows = loaded.predict_features(torch.randn(2, *TRUNK_SHAPE).abs())
    assert all(set(r["probabilities"]) == {"pneumonia", "effusion"} for r in rows)


def test_dem_figures_use_the_models_thresholds_and_follow_rates_are_reported(tmp_path):
    from medvlm.evaluate import evaluation_units, score
    from medvlm.manifest import read_manifest
    from test_evaluate import fake_generations, make_cfg

    cfg = make_cfg(tmp_path)
    units = evaluation_units(read_manifest(tmp_path / "split" / "test.jsonl"))
    generated = {g["study_id"]: g for g in fake_generations()}
    fixed = score(cfg, units, generated)["metrics"]
    tuned = score(cfg, units, generated, dem_thresholds={"pneumonia": 0.5, "nodule": 0.25},
                  train_reports=["Both lungs are clear.", "A nodule in the left upper lobe."])["metrics"]
    # s3 (nodule p 0.3, no nodule) becomes a false positive at 0.25: nodule precision drops
    assert fixed["DEM_nodule_precision"]["value"] == 1.0
    assert tuned["DEM_nodule_precision"]["value"] == pytest.approx(0.5)
    assert tuned["DEM_nodule_auroc"]["value"] == pytest.approx(fixed["DEM_nodule_auroc"]["value"])
    assert tuned["collapse_unique_share"]["value"] == 1.0
    assert tuned["collapse_train_copy_rate"]["value"] == pytest.approx(0.5)
    assert np.isfinite(tuned["DEM_macro_auroc"]["value"])


def test_finding_tokens_weigh_more_than_boilerplate(tmp_path):
    from medvlm.train_data import token_weights

    reports = [[1, 2, 3, 9], [1, 2, 4, 9], [1, 2, 3, 9], [1, 2, 5, 9]]  # 1, 2, 9 in every report
    w = token_weights(reports, vocab_size=10, strength=4.0)
    assert w[1] == w[2] == w[9] == 1.0
    assert 1.0 < w[3] < w[4] == w[5] == 5.0  # rarer -> heavier; the rarest get 1 + strength
    assert token_weights(reports, 10, 0.0) is None
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = MedVLM(cfg, "freeze").eval()  # no dropout: the same batch gives the same per-token losses
    feats = torch.randn(2, *TRUNK_SHAPE)
    target = [model.layout.encode_report("ground glass opacity in the right lower lobe .")] * 2
    plain = float(model(feats, target)["lm_loss"])
    model.token_loss_weight = torch.ones(model.lm.get_input_embeddings().num_embeddings)
    assert float(model(feats, target)["lm_loss"]) == pytest.approx(plain, rel=1e-5)  # all ones = plain mean
    model.token_loss_weight[target[0][0]] = 50.0  # the first report token dominates the weighted mean
    first_only = float(model(feats, [target[0][:1]] * 2)["lm_loss"])
    weighted = float(model(feats, target)["lm_loss"])
    assert abs(weighted - first_only) < abs(plain - first_only)
