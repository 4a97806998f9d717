"""Contrastive vision pre-training: loss and recall@k arithmetic, the stage (off: a fixed marker; on: retrieval
improves), `medvlm train` starting from the pre-trained tail, zero-shot label similarity and the zero-shot clue
source (model.clue_source=zero_shot)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_medvlm import tiny_config, write_cached_split

from medvlm.config import config_from_dict
from medvlm.errors import ConfigError, ModelError
from medvlm.features import feature_signature
from medvlm.inference import Predictor
from medvlm.model.contrastive import (
    contrastive_loss, label_prompts, retrieval_recall, text_groups, zero_shot_label_similarity, zero_shot_logits,
    zero_shot_prompt_embeddings,
)
from medvlm.model.vision import build_vision
from medvlm.pretrain import TAIL_FILE, load_aligner, load_pretrained_tail, pretrain_vision, pretrained_tail_digest
from medvlm.train import train


def test_recall_counts_a_same_text_item_as_a_hit_and_reports_chance():
    groups = text_groups(["a", "b", "a", "c"])  # rows 0 and 2 share a report
    assert groups.tolist() == [0, 1, 0, 2]
    text = torch.eye(4)
    image = torch.eye(4)[[2, 3, 0, 1]]  # image 0 looks like report 2 (same text), image 1 like report 3 (wrong)
    r = retrieval_recall(image, text, groups, ks=(1, 4))
    assert r["image_to_report_R@1"] == 0.5 and r["report_to_image_R@1"] == 0.5  # rows 0, 2 right; 1, 3 wrong
    assert r["image_to_report_R@4"] == 1.0
    assert r["chance_R@1"] == pytest.approx((0.5 + 0.25 + 0.5 + 0.25) / 4)


def test_contrastive_loss_is_lower_for_aligned_pairs_and_symmetric():
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    groups = torch.arange(6)
    aligned = contrastive_loss(emb, emb, torch.tensor(0.1), groups)
    shuffled = contrastive_loss(emb, emb[[1, 2, 3, 4, 5, 0]], torch.tensor(0.1), groups)
    assert aligned < shuffled
    other = emb[[1, 0, 3, 2, 5, 4]]
    assert contrastive_loss(emb, other, torch.tensor(0.1), groups) == pytest.approx(
        float(contrastive_loss(other, emb, torch.tensor(0.1), groups)), abs=1e-6)


def test_disabled_stage_writes_the_same_marker_and_removes_stale_weights(tmp_path):
    cfg = tiny_config(tmp_path, pretrain={"out_dir": str(tmp_path / "pv"), "metrics_file": str(tmp_path / "m.json")})
    (tmp_path / "pv").mkdir()
    (tmp_path / "pv" / TAIL_FILE).write_bytes(b"stale")
    pretrain_vision(cfg)  # no features, no encoder: off costs nothing
    first = (tmp_path / "pv" / "disabled.json").read_bytes()
    pretrain_vision(cfg)
    assert sorted(p.name for p in (tmp_path / "pv").iterdir()) == ["disabled.json"]
    assert (tmp_path / "pv" / "disabled.json").read_bytes() == first
    assert json.loads((tmp_path / "m.json").read_text()) == {"enabled": False}


def _class_features(cfg, n=16):
    """Split files as usual, but each study's trunk features carry its report's pattern (4 reports, i % 4)."""
    write_cached_split(cfg, n=n)
    gen = torch.Generator().manual_seed(1)
    patterns = torch.randn(4, 192, 2, 2, generator=gen).abs() * 2
    for split in ("train", "test"):
        feats = torch.randn(n, 192, 2, 2, generator=gen).abs() * 0.5 + patterns[torch.arange(n) % 4]
        ids = [f"{split}_{i}" for i in range(n)]
        save_file({"features": feats}, Path(cfg.features.out_dir) / f"{split}.safetensors",
                  metadata={**feature_signature(cfg), "study_ids": json.dumps(ids)})


def _pretrain_cfg(tmp, **train):
    return tiny_config(tmp, train=train, pretrain={
        "enabled": True, "epochs": 15, "batch_size": 8, "lr": 1e-2, "vision_lr": 1e-3, "embed_dim": 16,
        "out_dir": str(tmp / "models" / "pretrain_vision"), "metrics_file": str(tmp / "reports" / "pv.json")})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    cfg = _pretrain_cfg(tmp)
    _class_features(cfg)
    from medvlm.labeler import ReportEncoder

    encoder = ReportEncoder(cfg.labeler.max_length, cfg.labeler.batch_size)  # the real frozen MiniLM
    return cfg, pretrain_vision(cfg, text_encoder=encoder), encoder


def test_pretraining_improves_test_retrieval_and_saves_the_tail(pretrained):
    cfg, summary, _ = pretrained
    metrics = json.loads(Path(cfg.pretrain.metrics_file).read_text())
    assert metrics["enabled"] and metrics["n_train"] == 16 and metrics["n_test"] == 16
    before, after = metrics["before"], metrics["after"]
    assert after["image_to_report_R@1"] > before["image_to_report_R@1"]
    assert after["image_to_report_R@1"] >= 0.75 and after["report_to_image_R@1"] >= 0.75
    assert metrics["chance"]["chance_R@1"] == pytest.approx(4 / 16)  # 4 same-text studies of 16
    assert metrics["epoch_loss"][-1] < metrics["epoch_loss"][0]
    tail = load_file(Path(cfg.pretrain.out_dir) / TAIL_FILE)
    imagenet = build_vision(cfg).tail.state_dict()
    assert tail.keys() == imagenet.keys()
    assert any(not torch.equal(tail[k], imagenet[k]) for k in tail)


def test_train_starts_from_the_pretrained_tail_and_does_not_resume_another_init(pretrained, tmp_path):
    cfg, _, _ = pretrained
    vision = build_vision(cfg)
    digest = load_pretrained_tail(cfg, vision)
    saved = load_file(Path(cfg.pretrain.out_dir) / TAIL_FILE)
    assert all(torch.equal(vision.tail.state_dict()[k], saved[k]) for k in saved)
    runs = {"max_steps": 2, "checkpoint_every": 1, "out_dir": str(tmp_path / "models"),
            "checkpoint_dir": str(tmp_path / "ckpt")}
    off = cfg.model_copy(update={"train": cfg.train.model_copy(update=runs),
                                 "pretrain": cfg.pretrain.model_copy(update={"enabled": False})})
    assert train(off, "freeze", stop_after=1)["stopped_early"]
    on = off.model_copy(update={"pretrain": cfg.pretrain})
    summary = train(on, "freeze")
    assert summary["resumed_from"] is None and summary["vision_init"] == digest == pretrained_tail_digest(cfg)


def test_train_with_pretrain_on_but_no_pretrained_tail_fails_with_one_line(tmp_path):
    cfg = _pretrain_cfg(tmp_path)
    write_cached_split(cfg)
    with pytest.raises(ModelError, match="pretrain-vision"):
        train(cfg, "lora")


def test_zero_shot_label_similarity(pretrained):
    cfg, _, encoder = pretrained
    assert label_prompts(["ground_glass"], cfg.pretrain.label_prompt) == ["findings of ground glass"]
    aligner = load_aligner(cfg)
    feats = load_file(Path(cfg.features.out_dir) / "test.safetensors")["features"][:5]
    sim = zero_shot_label_similarity(aligner, encoder, feats, cfg.data.label_names, cfg.pretrain.label_prompt)
    assert sim.shape == (5, 2) and (abs(sim) <= 1 + 1e-5).all()
    with torch.no_grad():
        prompts = torch.tensor(encoder.encode(["findings of pneumonia", "findings of effusion"]), dtype=torch.float32)
        expected = aligner.image_embeddings(feats) @ aligner.text_embeddings(prompts).T
    assert torch.allclose(torch.from_numpy(sim), expected, atol=1e-5)


def test_zero_shot_clues_need_the_contrastive_encoder():
    with pytest.raises(ConfigError, match="pretrain.enabled"):
        config_from_dict({"model": {"clues": True, "clue_source": "zero_shot"}})
    with pytest.raises(ConfigError, match="negative_prompt"):
        config_from_dict({"pretrain": {"negative_prompt": "nothing"}})


def test_zero_shot_clue_source_trains_frozen_and_travels_with_the_model(pretrained, tmp_path):
    """clue_source zero_shot: the clue probabilities are the aligner's binary zero-shot scores (not trained), the
    source's weights are saved with the trained weights, and the trained model runs without the pretrain folder."""
    cfg, _, encoder = pretrained
    metrics = json.loads(Path(cfg.pretrain.metrics_file).read_text())
    assert set(metrics["zero_shot_auroc"]) == set(cfg.data.label_names)
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["zero_shot_auroc"].values())
    runs = {"max_steps": 3, "checkpoint_every": 10, "out_dir": str(tmp_path / "models"),
            "checkpoint_dir": str(tmp_path / "ckpt")}
    zcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=runs), "model": cfg.model.model_copy(
        update={"clues": True, "clue_source": "zero_shot", "discrimination": False, "clue_heads": 2})})
    train(zcfg, "freeze")
    saved = load_file(tmp_path / "models" / "freeze" / "trainable.safetensors")
    zero_shot = {k: v for k, v in saved.items() if k.startswith("clues.zero_shot.")}
    assert zero_shot and not any(k.startswith("clues.classifier") for k in saved)  # no supervised head of its own
    aligner = load_aligner(cfg)
    tail = aligner.vision.tail.state_dict()
    assert all(torch.equal(zero_shot[f"clues.zero_shot.tail.{k}"], v) for k, v in tail.items())  # frozen
    feats = load_file(Path(cfg.features.out_dir) / "test.safetensors")["features"][:6]
    expected = torch.sigmoid(zero_shot_logits(aligner, zero_shot_prompt_embeddings(
        aligner, encoder, cfg.data.label_names, cfg.pretrain), feats))
    moved = Path(cfg.pretrain.out_dir).rename(tmp_path / "pretrain_elsewhere")
    try:
        predictor = Predictor.load(tmp_path / "models" / "freeze")
        rows = predictor.predict_features(feats)
    finally:
        moved.rename(cfg.pretrain.out_dir)
    got = torch.tensor([[r["probabilities"][n] for n in cfg.data.label_names] for r in rows])
    assert torch.allclose(got, expected, atol=1e-3)  # probabilities are rounded for output
    assert not torch.allclose(expected, torch.full_like(expected, 0.5), atol=1e-3)  # they carry something
