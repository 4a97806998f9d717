"""Heatmaps of CT volumes (medvlm.explain_volume): on volume encoders whose activation is the input's intensity, the
slices where the finding is drawn rank first, the maps sit where it is drawn in the radiological view, and the CLI
and REST outputs carry the overlays of those slices."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medvlm.config import config_from_dict
from medvlm.errors import ModelError
from medvlm.explain import check_explainable
from medvlm.explain_volume import explain_volume, radiological, top_slices
from medvlm.inference import Predictor
from medvlm.model.discrimination import DiscriminationModule
from medvlm.model.encoder import VisionEncoder
from medvlm.model.vision3d import I3ResNet, VolumeEncoder, _SliceTrunk, i3resnet_encoder

LABELS = ["pneumonia", "effusion"]
X, Y, Z = 16, 12, 8
BLOB = (slice(2, 6), slice(7, 10))  # (x, y) where the finding is drawn


def _volume(bright: dict[int, float]) -> torch.Tensor:
    """(1, X, Y, Z): background 0.1, the blob at BLOB in slice z with the given intensity."""
    vol = torch.full((1, X, Y, Z), 0.1)
    for z, value in bright.items():
        vol[0, BLOB[0], BLOB[1], z] = value
    return vol


class _Model(nn.Module):
    """What explain_volume needs of a MedVLM: the vision encoder and the DEM. Label 0's logit grows with the
    features, label 1's shrinks (no positive evidence anywhere)."""

    def __init__(self, vision: VisionEncoder, width: int):
        super().__init__()
        self.vision, self.dem = vision, DiscriminationModule(width, len(LABELS), 4)
        with torch.no_grad():
            self.dem.classifier.weight.copy_(torch.stack([torch.ones(width), -torch.ones(width)]))
            self.dem.classifier.bias.zero_()


def _intensity_i3(width: int = 3) -> VolumeEncoder:
    """An I3ResNet whose trunk passes the volume through (network layout (B, 1, Z, X, Y)) and whose layer4 is a
    positive 1x1x1 conv: the tail's map is the intensity, so the CAM is too."""
    net = I3ResNet((1, 1, 1, 1), 4)
    net.conv1 = nn.Conv3d(3, 1, 1, bias=False)
    net.bn1 = net.maxpool = net.layer1 = net.layer2 = net.layer3 = nn.Identity()
    net.layer4 = nn.Conv3d(1, width, 1, bias=False)
    with torch.no_grad():
        net.conv1.weight.fill_(1 / 3)
        net.layer4.weight.copy_(torch.arange(1.0, width + 1).view(width, 1, 1, 1, 1))
    net.out_channels = width
    return i3resnet_encoder(net, 32, "intensity-i3")


class _Grey(nn.Module):
    """A 2-D trunk that keeps the grey level as its one channel (at full resolution)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)


class _Tokens(nn.Module):
    """A 2-D tail: the map's pixels as tokens (B, h*w, 1), scaled by a positive weight."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).flatten(2).transpose(1, 2)


def _intensity_slices(n_slices: int) -> VolumeEncoder:
    trunk = _SliceTrunk(_Grey(), n_slices, 16)
    trunk.mean.zero_()
    trunk.std.fill_(1.0)
    return VolumeEncoder(trunk, _Tokens(), 1, 16, "intensity-slices")


def test_top_slices_rank_by_mass_and_skip_empty():
    assert top_slices(np.array([0.1, 0.5, 0.0, 0.5, 0.2]), 3) == [3, 1, 4]  # ties: nearer the centre of mass (2.15)
    assert top_slices(np.array([0.3, 0.3, 0.3, 0.1]), 2) == [1, 2]  # a plateau at the start: not slice 0 first
    assert top_slices(np.zeros(4), 2) == [] and top_slices(np.array([0.0, 1.0, 0.0]), 3) == [1]


def test_i3_volume_drawn_slices_rank_first_and_maps_sit_on_the_blob():
    torch.manual_seed(0)
    model = _Model(_intensity_i3(), 3)
    exp = explain_volume(model, _volume({5: 1.0, 2: 0.6}), LABELS, k=3)
    assert exp.slices[0] == [5, 2, 4]  # the bright slices by their mass, then the background slice nearest the centre
    assert exp.slice_mass[0].sum() == pytest.approx(1.0) and exp.slice_mass[0, 5] > exp.slice_mass[0, 2]
    assert exp.slices[1] == [] and not exp.slice_mass[1].any() and exp.maps[1].shape == (0, Y, X)
    top = exp.maps[0][0]
    assert top.shape == (Y, X) and top.max() == pytest.approx(1.0)
    # radiological view: the blob's RAS (x, y) lands at row Y-1-y, column X-1-x
    expected = radiological(_volume({5: 1.0})[0, :, :, 5].numpy()) > 0.5
    assert expected[np.unravel_index(np.argmax(top), top.shape)]
    assert exp.probabilities["pneumonia"] > 0.5 > exp.probabilities["effusion"]


def test_slice_encoder_ranks_only_sampled_slices():
    model = _Model(_intensity_slices(3), 1)
    idx = model.vision.trunk.slice_indices(Z)  # [2, 4, 5] of 8
    exp = explain_volume(model, _volume({idx[1]: 1.0, 0: 1.0}), LABELS, k=2)  # slice 0 is never sampled
    assert exp.slices[0][0] == idx[1] and set(exp.slices[0]) <= set(idx)
    assert exp.slice_mass[0, 0] == 0 and exp.maps[0].shape == (2, Y, X)
    expected = radiological(_volume({idx[1]: 1.0})[0, :, :, idx[1]].numpy()) > 0.5
    assert expected[np.unravel_index(np.argmax(exp.maps[0][0]), (Y, X))]


def test_volume_encoder_without_a_map_is_refused_in_one_line():
    model = _Model(VolumeEncoder(nn.Identity(), _Tokens(), 1, 16, "opaque"), 1)
    with pytest.raises(ModelError, match="opaque") as info:
        check_explainable(model)
    assert "\n" not in str(info.value)
    check_explainable(_Model(_intensity_i3(), 3))  # the I3 tail can be explained


def _cfg():
    return config_from_dict({"data": {"label_names": LABELS, "primary_label": "pneumonia"},
                             "volume": {"spacing": None, "shape": [X, Y, Z], "min_slices": 2}})


class _VolumePredictor:
    """A predictor around the intensity model: fixed reports, Predictor.explain's own dispatch."""

    def __init__(self):
        self.model, self.cfg, self.label_names = _Model(_intensity_i3(), 3), _cfg(), LABELS

    def predict(self, images, **_):
        return [{"report": "Consolidation.", "probabilities": {"pneumonia": 0.9, "effusion": 0.1}} for _ in images]

    def check_explainable(self):
        check_explainable(self.model)

    explain = Predictor.explain


def test_generate_explain_writes_the_top_slices_of_each_finding(tmp_path):
    from medvlm.predict import run_predictions

    pytest.importorskip("nibabel")
    import nibabel

    hu = np.full((X, Y, Z), -800.0, np.float32)  # 0.1 after the [-1000, 1000] window
    hu[BLOB[0], BLOB[1], 6] = 1000.0
    nibabel.save(nibabel.Nifti1Image(hu, np.eye(4)), tmp_path / "scan.nii.gz")
    out = run_predictions([tmp_path / "scan.nii.gz"], _VolumePredictor(), _cfg(), explain_dir=tmp_path / "maps")
    assert not out.failures, out.failures
    result = out.results[0]
    ranked = result["heatmap_slices"]["pneumonia"]
    assert ranked[0]["slice"] == 6 and ranked[0]["mass_share"] > ranked[1]["mass_share"]
    assert result["heatmap_slices"]["effusion"] == []
    names = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert names == sorted(f"scan_pneumonia_z{r['slice']}.png" for r in ranked)
    assert Image.open(tmp_path / "maps" / "scan_pneumonia_z6.png").size == (X, Y)  # (width, height): the view
    json.dumps(result)


def test_rest_explain_returns_slice_overlays(tmp_path):
    pytest.importorskip("monai")
    import nibabel
    from starlette.testclient import TestClient

    from medvlm.serve import create_app

    hu = np.full((X, Y, Z), -800.0, np.float32)
    hu[BLOB[0], BLOB[1], 3] = 1000.0
    nibabel.save(nibabel.Nifti1Image(hu, np.eye(4)), tmp_path / "scan.nii.gz")
    client = TestClient(create_app(_VolumePredictor(), _cfg(), {"model": "fake"}))
    r = client.post("/predict?explain=true", files={"file": ("scan.nii.gz", (tmp_path / "scan.nii.gz").read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["heatmap_slices"]["pneumonia"][0]["slice"] == 3
    assert set(body["heatmaps"]) == {f"pneumonia_z{s['slice']}" for s in body["heatmap_slices"]["pneumonia"]}
    png = Image.open(io.BytesIO(base64.b64decode(body["heatmaps"]["pneumonia_z3"])))
    assert png.size == (X, Y) and png.mode == "RGB"


def test_top_label_slices_match_explain_volume_from_the_cache():
    """evaluate's stored entry for a volume: the most probable finding on its top slice, from the cached trunk
    features (I3) or the volume itself (sampled slices), at the feature map's resolution in the radiological view."""
    from medvlm.explain_volume import top_label_slices

    vol = _volume({5: 1.0, 2: 0.6})
    model = _Model(_intensity_i3(), 3)
    feats = model.vision.trunk_features(model.vision.preprocess([vol]))
    (entry,) = top_label_slices(model, feats, LABELS, (X, Y, Z))
    assert entry["label"] == "pneumonia" and entry["slice"] == 5 == explain_volume(model, vol, LABELS).slices[0][0]
    grid = np.asarray(entry["grid"])
    assert grid.shape == (Y, X) and grid.max() == pytest.approx(1.0)  # this trunk keeps the full resolution
    assert (radiological(vol[0, :, :, 5].numpy()) > 0.5)[np.unravel_index(np.argmax(grid), grid.shape)]
    slices = _Model(_intensity_slices(3), 1)
    idx = slices.vision.trunk.slice_indices(Z)
    (entry,) = top_label_slices(slices, None, LABELS, (X, Y, Z), [_volume({idx[2]: 1.0})])
    assert entry["slice"] == idx[2] and np.asarray(entry["grid"]).shape == (16, 16)  # the 2-D trunk's map
    with pytest.raises(ModelError, match="need the volumes"):
        top_label_slices(slices, torch.zeros(1, 1, 16, 16), LABELS, (X, Y, Z))


def test_examples_page_draws_the_volume_heatmap_on_its_slice(tmp_path):
    """evaluate -> report for a volume study: the entry names the slice, the page draws the map over that slice
    (not the middle slice) and captions it."""
    pytest.importorskip("nibabel")
    import nibabel

    from medvlm.data.volumes import load_volume
    from medvlm.evaluate import _top_label_heatmaps
    from medvlm.report import _examples

    hu = np.full((X, Y, Z), -800.0, np.float32)
    hu[BLOB[0], BLOB[1], 6] = 1000.0
    (tmp_path / "data").mkdir()
    nibabel.save(nibabel.Nifti1Image(hu, np.eye(4)), tmp_path / "data" / "scan.nii.gz")
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "test.jsonl").write_text(json.dumps({"study_id": "v0", "images": ["scan.nii.gz"],
                                                               "report": "r"}) + "\n")
    cfg = config_from_dict({"data": {"label_names": LABELS, "primary_label": "pneumonia",
                                     "root": str(tmp_path / "data")},
                            "split": {"out_dir": str(tmp_path / "split")},
                            "volume": {"spacing": None, "shape": [X, Y, Z], "min_slices": 2}})
    predictor = SimpleNamespace(model=_Model(_intensity_i3(), 3), label_names=LABELS)
    vision = predictor.model.vision
    feats = vision.trunk_features(vision.preprocess([load_volume(tmp_path / "data" / "scan.nii.gz", cfg.volume)]))
    (heat,) = _top_label_heatmaps(predictor, feats, cfg, ["v0"])
    assert heat["label"] == "pneumonia" and heat["slice"] == 6
    out = tmp_path / "reports"
    (out / "generations").mkdir(parents=True)
    row = {"study_id": "v0", "references": ["r"], "generated": "g", "probabilities": {}, "heatmap": heat}
    (out / "generations" / "m.jsonl").write_text(json.dumps(row) + "\n")
    page = _examples(cfg, out, ["m"]).read_text()
    assert page.count("data:image/jpeg;base64,") == 1 and "heatmap: pneumonia" in page and "slice z=6" in page
    jpeg = page.split("data:image/jpeg;base64,")[1].split("'")[0]
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(jpeg))).convert("RGB"), np.float32)
    assert drawn.shape[:2] == (Y, X)  # over the loaded slice in the radiological view
    colour = drawn.max(2) - drawn.min(2)  # the overlay's colour sits on the blob
    expected = radiological(load_volume(tmp_path / "data" / "scan.nii.gz", cfg.volume)[0, :, :, 6].numpy()) > 0.5
    assert expected[np.unravel_index(np.argmax(colour), colour.shape)]
