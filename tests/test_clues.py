"""Disease clues (TRRG) and prior-knowledge prompts (ClinicalBLIP): any K, off == the old model, generation with
per-sample prompts, Predictor round trip, the prompt text."""

import pytest
import torch
from tiny_medvlm import REPORTS, TRUNK_SHAPE, greedy_reference, overfit, tiny_config, write_cached_split

from medvlm.errors import ConfigError
from medvlm.generation import generate_ids, generate_reports
from medvlm.inference import Predictor
from medvlm.model.medvlm import MedVLM
from medvlm.model.prompt import prior_knowledge_text
from medvlm.train import train

CLUES_AND_PRIOR = {"clues": True, "prior_prompt": True}


def _labels(k: int) -> dict:
    names = [f"finding_{i}" for i in range(k)]
    return {"label_names": names, "primary_label": names[0]}


def test_prior_knowledge_text():
    names = ["pneumonia", "ground_glass", "effusion"]
    assert prior_knowledge_text([0.83, 0.61, 0.2], names, 0.5) == "Suspected: pneumonia 0.83, ground glass 0.61."
    assert (prior_knowledge_text([0.61, 0.834, 0.9], names, 0.5)
            == "Suspected: effusion 0.90, ground glass 0.83, pneumonia 0.61.")
    assert prior_knowledge_text([0.5, 0.1, 0.0], names, 0.5) == "No suspected findings."  # strictly above
    assert prior_knowledge_text([0.3], ["covid"], 0.25) == "Suspected: covid 0.30."


@pytest.mark.parametrize("k", [1, 3, 14])
@pytest.mark.parametrize("discrimination", [True, False])
def test_clues_for_any_number_of_labels(tmp_path, k, discrimination):
    cfg = tiny_config(tmp_path, data=_labels(k), model={"clues": True, "discrimination": discrimination})
    torch.manual_seed(0)
    model = MedVLM(cfg, "freeze")
    assert (model.dem is None) == (not discrimination) and (model.clues.classifier is None) == discrimination
    assert model.clues.embeddings.shape == (k, cfg.model.clue_dim)
    feats = torch.randn(2, *TRUNK_SHAPE)
    soft, logits = model.visual_queries(feats)
    assert soft.shape == (2, cfg.model.qformer_queries + k, 32) and logits.shape == (2, k)
    labels = (torch.rand(2, k) > 0.5).float()
    out = model(feats, [model.layout.encode_report(r) for r in REPORTS[:2]], labels)
    # the clue module's own classifier (discrimination off) is supervised with the same BCE loss
    assert torch.allclose(out["loss"], out["lm_loss"] + cfg.model.disc_loss_weight * out["disc_loss"])
    out["loss"].backward()
    for name, p in model.clues.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_clue_probabilities_scale_the_clues(tmp_path):
    """A finding with probability 0 contributes nothing: its clue token is the projection's bias alone."""
    model = MedVLM(tiny_config(tmp_path, model={"clues": True}), "freeze")
    tokens = torch.randn(1, 4, model.vision.width)
    _, lm_tokens = model.clues(tokens, torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(lm_tokens[0, 0], model.clues.to_lm.bias)
    assert not torch.allclose(lm_tokens[0, 1], model.clues.to_lm.bias)
    a, _ = model.clues(tokens, torch.tensor([[0.9, 0.1]]))
    b, _ = model.clues(tokens, torch.tensor([[0.1, 0.9]]))
    assert a.shape == tokens.shape and not torch.allclose(a, b)  # the interaction reads the probabilities


def test_clue_switches(tmp_path):
    only_tokens = MedVLM(tiny_config(tmp_path, model={"clues": True, "clue_interaction": False}), "freeze")
    assert only_tokens.clues.interaction is None and only_tokens.clues.n_tokens == 2
    only_attention = MedVLM(tiny_config(tmp_path, model={"clues": True, "clue_tokens": False}), "freeze")
    soft, _ = only_attention.visual_queries(torch.randn(1, *TRUNK_SHAPE))
    assert soft.shape[1] == 4 and only_attention.clues.n_tokens == 0
    for model, bad in [({"clues": True, "clue_interaction": False, "clue_tokens": False}, "go nowhere"),
                       ({"prior_prompt": True, "discrimination": False}, "predicted findings"),
                       ({"clues": True, "clue_heads": 3}, "clue_heads")]:
        with pytest.raises(ConfigError, match=bad) as info:
            MedVLM(tiny_config(tmp_path, model=model), "freeze")
        assert "\n" not in str(info.value)


# Recorded with the commit before clues existed (4d0f8db): same seed, same inputs -> same loss and decoding.
OLD_MODEL = {"freeze": (7.145143508911133, 5141442, [32, 35, 8, 10]),
             "lora": (7.177857875823975, 5141890, [32, 35, 8, 10]),
             "ptuning_v2": (7.187057971954346, 5141634, [32, 7, 7, 7, 28, 24])}


@pytest.mark.parametrize("strategy", sorted(OLD_MODEL))
def test_clues_and_prior_off_is_the_old_model(tmp_path, strategy):
    cfg = tiny_config(tmp_path)
    assert not cfg.model.clues and not cfg.model.prior_prompt  # off by default
    torch.manual_seed(0)
    model = MedVLM(cfg, strategy)
    feats = torch.randn((2, *TRUNK_SHAPE), generator=torch.Generator().manual_seed(3))
    out = model(feats, [model.layout.encode_report(r) for r in REPORTS[:2]], torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                [0, 1])
    ids, _ = generate_ids(model, feats, cfg.generate)
    loss, n_params, decoded = OLD_MODEL[strategy]
    assert model.clues is None and not any(n.startswith("clues.") for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert float(out["loss"].detach()) == pytest.approx(loss, abs=1e-5)
    assert ids == [decoded, decoded]


def test_prior_prompt_carries_predicted_findings_per_sample(tmp_path):
    cfg = tiny_config(tmp_path, model=CLUES_AND_PRIOR)
    torch.manual_seed(0)
    model = MedVLM(cfg, "freeze")
    logits = torch.tensor([[3.0, -3.0], [-3.0, -3.0]])  # p = 0.95 / 0.05
    posts = model.post_ids([0, 1], logits)
    head, tail = model.layout._post_texts[0]
    expected = model.tokenizer(f"{head} Suspected: pneumonia 0.95.{tail}", add_special_tokens=False)["input_ids"]
    assert posts[0] == expected
    head, tail = model.layout._post_texts[1]
    assert posts[1] == model.tokenizer(f"{head} No suspected findings.{tail}", add_special_tokens=False)["input_ids"]
    assert posts[0][-2:] == model.layout.posts[0][-2:]  # still ends with the assistant-turn start
    off = MedVLM(tiny_config(tmp_path, model={"clues": True}), "freeze")
    assert off.post_ids([0, 1], logits) == off.layout.posts


@pytest.mark.parametrize("strategy", ["freeze", "ptuning_v2"])
def test_batched_decoding_with_prompts_of_different_lengths(tmp_path, strategy):
    """Per-sample prior prompts are padded inside the batch; each row must decode exactly as it would alone."""
    cfg = tiny_config(tmp_path, model=CLUES_AND_PRIOR, generate={"num_beams": 1, "max_new_tokens": 5,
                                                                 "repetition_penalty": 1.0})
    torch.manual_seed(0)
    model = MedVLM(cfg, strategy).eval()
    with torch.no_grad():  # spread the probabilities; make the zero-initialised prefixes matter
        model.dem.classifier.weight.normal_(0, 0.2)
        for p in model.prefix.parameters() if model.prefix is not None else []:
            p.normal_(0, 0.5)
    feats = torch.randn(4, *TRUNK_SHAPE)
    _, logits = model.visual_queries(feats)
    # rows whose both probabilities pass list two findings (5 words), the others one or none (3 words)
    # (half-way between two rows: batch-size-dependent rounding must not move a row across the threshold)
    low = torch.sigmoid(logits).min(dim=1).values.sort().values
    model.layout.threshold = float(low[1] + low[2]) / 2
    assert len({len(p) for p in model.post_ids([0] * 4, logits)}) > 1
    ids, _ = generate_ids(model, feats, cfg.generate)
    assert ids == greedy_reference(model, feats, 5)
    beam = cfg.generate.model_copy(update={"num_beams": 3})
    together, _ = generate_ids(model, feats, beam)
    assert together == [generate_ids(model, feats[i : i + 1], beam)[0][0] for i in range(4)]


def test_generation_with_clues_and_prior_prompt_writes_the_learned_report(tmp_path):
    cfg = tiny_config(tmp_path, model=CLUES_AND_PRIOR, generate={"num_beams": 2, "max_new_tokens": 12})
    torch.manual_seed(0)
    model = MedVLM(cfg, "freeze")
    feats = torch.randn(1, *TRUNK_SHAPE)
    target = model.layout.encode_report(REPORTS[2])
    overfit(model, feats, target, 60, torch.tensor([[1.0, 1.0]]))
    texts, probs = generate_reports(model, feats, cfg.generate)
    assert texts == [model.layout.decode(target)] and texts[0]
    assert probs.shape == (1, 2) and (probs > 0.5).all()  # the prompt it was decoded with listed both findings


def test_predictor_round_trip_with_clues_and_prior_prompt(tmp_path):
    cfg = tiny_config(tmp_path, data=_labels(3), model={**CLUES_AND_PRIOR, "discrimination": False})
    write_cached_split(cfg)
    # the tiny split's rows carry pneumonia/effusion labels: rewrite them for the three-finding label set
    for split in ("train", "test"):
        path = tmp_path / "split" / f"{split}.jsonl"
        path.write_text(path.read_text().replace('"labels": {"pneumonia": 0, "effusion": 0}',
                                                 '"labels": {"finding_0": 0, "finding_1": 0, "finding_2": 1}')
                        .replace('"labels": {"pneumonia": 1, "effusion": 0}',
                                 '"labels": {"finding_0": 1, "finding_1": 0, "finding_2": 0}')
                        .replace('"labels": {"pneumonia": 1, "effusion": 1}',
                                 '"labels": {"finding_0": 1, "finding_1": 1, "finding_2": 0}'))
    train(cfg, "lora")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "models" / "lora" / "trainable.safetensors")
    assert {"clues.classifier.weight", "clues.interaction.norm.weight", "clues.to_lm.weight"} <= saved.keys()
    loaded = Predictor.load(tmp_path / "models" / "lora")
    state = loaded.model.trainable_state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    assert loaded.cfg.model.clues and loaded.cfg.model.prior_prompt
    feats = torch.randn(2, *TRUNK_SHAPE).abs()
    again = Predictor.load(tmp_path / "models" / "lora", cfg=cfg)
    a, b = loaded.predict_features(feats), again.predict_features(feats)
    assert a == b and set(a[0]["probabilities"]) == {"finding_0", "finding_1", "finding_2"}
