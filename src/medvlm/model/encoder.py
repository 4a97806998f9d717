"""The vision encoder's common shape: a frozen trunk and a tunable tail, whatever the backbone.

MedVLM tunes only the last layer of its ViT. Here every encoder is cut in two:
  trunk  = everything up to the last `tune_vision_blocks` blocks, frozen; its output is what the features stage
           caches on disk, so training never runs the expensive early layers (a whole-chain CPU step with the
           encoder in the loop costs ~12 s at batch 2, see STACK.md);
  tail   = the last k blocks (+ head), trained with the rest of the model; it turns trunk features into visual
           tokens (B, T, width).

The backbones live in vision2d.py (images) and vision3d.py (volumes); vision.py picks one from model.vision.

BatchNorm in the tail stays in eval mode: batches of 8 would give noisy statistics, and frozen statistics keep a
CPU run bit-for-bit reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
