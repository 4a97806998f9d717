"""Per-finding heatmaps of a CT volume: for each finding, the axial slices with the highest activation.

The same Grad-CAM as for 2-D images (medvlm.explain, captum's LayerGradCam on the DEM logit of each label), taken
where the volume encoder still has a spatial feature map:
  astra-i3resnet152 (an I3ResNet tail): the tail's 3-D map (B, W, d, h, w) over (z, x, y), the feature map the DEM
      pools; the CAM is upsampled trilinearly to the volume's (Z, X, Y);
  efficientnet-lite0-slices: the trunk shows the sampled axial slices to a 2-D trunk and averages their maps before
      the tail, so the CAM is taken on each sampled slice's own trunk map (B*k, C, h, w) (gradients flow through
      the average and the tail); only the sampled slices can carry evidence.
A slice's activation mass is the sum of its CAM; the top-k slices by mass are kept per label, their maps divided
by the label's maximum over the volume (1 = the strongest evidence anywhere in the volume). Overlays show the slice
in the radiological view the 2-D path uses (patient's right on the image left, anterior up), named
<label>_z<index> with the slice index along z of the loaded volume (medvlm.data.volumes.load_volume, RAS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medvlm.errors import ModelError

TOP_SLICES = 3  # slices kept per finding


@dataclass
class VolumeExplanation:
    """Heatmaps of one volume. Per label k: slice_mass[k] (Z,) the share of the label's CAM mass in each axial
    slice (all zero without positive evidence), slices[k] the top slice indices (highest mass first) and maps[k]
    their maps (n, Y, X) in the radiological view, in [0, 1] of the label's maximum over the volume."""

    label_names: list[str]
    probabilities: dict[str, float]
    slice_mass: np.ndarray
    slices: list[list[int]]
    maps: list[np.ndarray]

    def ranking(self) -> dict[str, list[dict]]:
        """label -> [{"slice": z, "mass_share": share}] of the kept slices, highest mass first."""
        return {name: [{"slice": z, "mass_share": round(float(self.slice_mass[k, z]), 4)} for z in self.slices[k]]
                for k, name in enumerate(self.label_names)}


def volume_explainable(vision) -> str | None:
    """Why a volume encoder cannot be explained (one line), or None when it can."""
    from medvlm.model.vision3d import _I3Tail, _SliceTrunk

    if isinstance(vision.tail, _I3Tail) or isinstance(vision.trunk, _SliceTrunk):
        return None
    return f"model.vision {vision.name!r}: no spatial feature map to explain (an I3ResNet tail or sampled slices)"


def radiological(plane: np.ndarray | torch.Tensor) -> np.ndarray:
    """An axial plane (X, Y) in RAS -> the radiological view (Y, X): the inverse of VolumeEncoder.preprocess's
    image -> plane step (rows anterior to posterior, columns patient's right to left)."""
    plane = np.asarray(plane)
    return np.ascontiguousarray(plane[::-1, ::-1].T)


def top_slices(mass: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest entries of a (Z,) mass profile, largest first; none when the profile has no mass.
    Ties (a 3-D map has ~Z/16 depth cells, so upsampled slices share values, at the volume's ends exactly) go to
    the slice nearest the profile's centre of mass, then to the lower index: not to the volume's first slice."""
    mass = np.asarray(mass, dtype=np.float64)
    if not mass.size or float(mass.sum()) <= 0:
        return []
    z = np.arange(mass.size)
    centre = float((z * mass).sum() / mass.sum())
    order = np.lexsort((z, np.abs(z - centre), -mass))
    return [int(z) for z in order[:k] if mass[z] > 0]


class _FeatureMap(nn.Module):
    """Identity: the layer LayerGradCam attributes to."""

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap


class _I3DemLogits(nn.Module):
    """Cached trunk features (B, C, Z', X', Y') -> DEM logits through the I3 tail, as visual_queries computes
    them: layer4's map (B, W, d, h, w) -> tokens (B, d*h*w, W) -> mean -> classifier."""

    def __init__(self, model):
        super().__init__()
        self.layer4, self.classifier, self.feature_map = model.vision.tail.layer4, model.dem.classifier, _FeatureMap()

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(self.layer4(trunk))
        return self.classifier(fmap.flatten(2).mean(2))


class _SliceDemLogits(nn.Module):
    """Volumes (B, 1, X, Y, Z) -> DEM logits through the sampled-slice trunk and the 2-D tail (what the features
    stage and visual_queries compute), with each slice's trunk map passed through a feature map."""

    def __init__(self, model):
        super().__init__()
        self.trunk, self.tail, self.classifier = model.vision.trunk, model.vision.tail, model.dem.classifier
        self.feature_map = _FeatureMap()

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        batch, idx = volume.shape[0], t.slice_indices(volume.shape[-1])
        planes = volume[:, 0][..., idx].flip(1, 2).permute(0, 3, 2, 1)  # (B, k, Y, X): the radiological view
        planes = planes.reshape(batch * len(idx), 1, volume.shape[3], volume.shape[2])
        planes = F.interpolate(planes, size=(t.size, t.size), mode="bilinear", align_corners=False)
        maps = self.feature_map(t.trunk2d((planes.expand(-1, 3, -1, -1) - t.mean) / t.std))
        pooled = maps.view(batch, len(idx), *maps.shape[1:]).mean(1)
        return self.classifier(self.tail(pooled).mean(1))


def _cams(head: nn.Module, inputs: torch.Tensor, n_labels: int,
          top_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Grad-CAM of every label on head.feature_map for one input (1, ...), ReLU'd, first axis the label (only the
    most probable label's with `top_only`); probabilities (K,))."""
    from captum.attr import LayerGradCam

    with torch.enable_grad():
        logits = head(inputs).detach()
        targets = [int(logits[0].argmax())] if top_only else list(range(n_labels))
        repeated = inputs.repeat_interleave(len(targets), dim=0).requires_grad_(True)
        cams = LayerGradCam(head, head.feature_map).attribute(repeated, target=targets, relu_attributions=True)
    return cams.detach().float().cpu(), torch.sigmoid(logits.float())[0].cpu()


def _slice_maps(cam: torch.Tensor, i3: bool, shape: tuple[int, int, int], idx: list[int]) -> dict[int, torch.Tensor]:
    """One label's CAM -> z -> its map on axial slice z, (Y, X) in the radiological view, >= 0. `cam`: the I3
    tail's (1, d, h, w) over (z, x, y), upsampled trilinearly to the volume's (Z, X, Y); or the sampled slices'
    (k, h, w) (radiological view), each upsampled bilinearly, for the slice indices `idx`."""
    from captum.attr import LayerAttribution

    nx, ny, nz = shape
    if i3:  # the network's axes are (z, x, y)
        up = LayerAttribution.interpolate(cam[None], (nz, nx, ny), interpolate_mode="trilinear")[0, 0]
        return {z: up[z].clamp(min=0).flip(0, 1).T for z in range(nz)}
    up = F.interpolate(cam[:, None], size=(ny, nx), mode="bilinear", align_corners=False)[:, 0]
    return {z: up[i].clamp(min=0) for i, z in enumerate(idx)}


def _slice_mass(per_slice: dict[int, torch.Tensor], nz: int) -> np.ndarray:
    mass = np.zeros(nz, np.float64)
    for z, m in per_slice.items():
        mass[z] = float(m.double().sum())
    return mass


def explain_volume(model, volume: torch.Tensor, label_names: list[str], k: int = TOP_SLICES) -> VolumeExplanation:
    """Per-label top-k axial slices of one volume (1, X, Y, Z) in [0, 1] and their CAMs (see the module doc)."""
    from medvlm.model.vision3d import _I3Tail

    vision = model.vision
    problem = volume_explainable(vision)
    if problem is not None:
        raise ModelError(problem)
    volume = torch.as_tensor(volume, dtype=torch.float32)
    if volume.dim() != 4 or volume.shape[0] != 1:
        raise ModelError(f"a volume is (1, X, Y, Z); got {tuple(volume.shape)}")
    _, nx, ny, nz = volume.shape
    param = next(model.dem.classifier.parameters())
    i3, idx = isinstance(vision.tail, _I3Tail), []
    was_training = model.training
    model.eval()
    try:
        if i3:
            trunk = vision.trunk_features(vision.preprocess([volume]).to(param.device))
            cams, probs = _cams(_I3DemLogits(model), trunk.to(param.dtype), len(label_names))  # (L, 1, d, h, w)
        else:
            idx = vision.trunk.slice_indices(nz)
            cams, probs = _cams(_SliceDemLogits(model), volume[None].to(param.device, param.dtype), len(label_names))
            cams = cams.reshape(len(label_names), len(idx), *cams.shape[-2:])  # (L, k, h, w), radiological view
    finally:
        model.train(was_training)

    share = np.zeros((len(label_names), nz), np.float64)
    slices, maps = [], []
    for label in range(len(label_names)):
        per_slice = _slice_maps(cams[label], i3, (nx, ny, nz), idx)
        mass = _slice_mass(per_slice, nz)
        chosen = top_slices(mass, k)
        if chosen:
            share[label] = mass / mass.sum()
            peak = max(float(m.max()) for m in per_slice.values())
            maps.append(np.stack([(per_slice[z] / peak).numpy() for z in chosen]).astype(np.float32))
        else:
            maps.append(np.zeros((0, ny, nx), np.float32))
        slices.append(chosen)
    return VolumeExplanation(list(label_names), {n: float(p) for n, p in zip(label_names, probs.tolist())},
                             share, slices, maps)


def top_label_slices(model, trunk_features: torch.Tensor | None, label_names: list[str],
                     shape: tuple[int, int, int], volumes=None, advance=None) -> list[dict | None]:
    """Per study, its most probable label's map on the axial slice with that label's highest activation (the top
    slice explain_volume ranks first): {"label", "probability", "slice": z, "grid": the slice's CAM at the feature
    map's resolution, (rows, columns) in the radiological view, a nested list in [0, 1]}; None for a study without
    positive evidence. The I3 tail maps the cached trunk features (B, C, d, h, w) directly; sampled slices need
    the volumes themselves (`volumes`: an iterable of (1, X, Y, Z), the cache holds only their depth average).
    `shape`: the loaded volumes' (X, Y, Z) (volume.shape). `advance` hears of every study mapped."""
    from captum.attr import LayerAttribution

    from medvlm.model.vision3d import _I3Tail

    vision = model.vision
    problem = volume_explainable(vision)
    if problem is not None:
        raise ModelError(problem)
    nx, ny, nz = (int(n) for n in shape)
    i3 = isinstance(vision.tail, _I3Tail)
    if not i3 and volumes is None:
        raise ModelError(f"model.vision {vision.name!r}: the sampled slices' maps need the volumes, not the cache")
    param = next(model.dem.classifier.parameters())
    inputs = (trunk_features[i : i + 1] for i in range(len(trunk_features))) if i3 else \
        (torch.as_tensor(v, dtype=torch.float32)[None] for v in volumes)
    head = _I3DemLogits(model) if i3 else _SliceDemLogits(model)
    out = []
    was_training = model.training
    model.eval()
    try:
        for x in inputs:
            cams, probs = _cams(head, x.to(param.device, param.dtype), len(label_names), top_only=True)
            k = int(probs.argmax())
            if i3:  # (1, 1, d, h, w) over (z, x, y)
                idx, cam = [], cams[0]
                grids = LayerAttribution.interpolate(cam[None], (nz, *cam.shape[-2:]),
                                                     interpolate_mode="trilinear")[0, 0]
            else:  # (1, k, h, w): one map per sampled slice, radiological view
                idx = vision.trunk.slice_indices(x.shape[-1])
                cam = grids = cams.reshape(len(idx), *cams.shape[-2:])
            dims = (nx, ny, nz) if i3 else tuple(int(n) for n in x.shape[-3:])
            chosen = top_slices(_slice_mass(_slice_maps(cam, i3, dims, idx), dims[2]), 1)
            if not chosen:
                out.append(None)
            else:
                z = chosen[0]
                g = (grids[z].clamp(min=0).flip(0, 1).T if i3 else grids[idx.index(z)].clamp(min=0)).numpy()
                g = g / g.max() if float(g.max()) > 0 else g
                out.append({"label": label_names[k], "probability": round(float(probs[k]), 4), "slice": z,
                            "grid": np.round(g, 3).tolist()})
            if advance is not None:
                advance(1)
    finally:
        model.train(was_training)
    return out


def slice_image(volume: torch.Tensor | np.ndarray, z: int) -> Image.Image:
    """Axial slice z of a volume (1, X, Y, Z) in [0, 1] as a grey image in the radiological view."""
    plane = np.asarray(volume[0, :, :, z], dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(radiological(plane) * 255), 0, 255).astype(np.uint8), "L")

