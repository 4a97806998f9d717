"""Discrimination-enhanced module (DEM).

MedVLM's DEM makes the visual tokens carry an explicit diagnosis before the LM sees them:
  1. a linear classifier on the mean-pooled visual tokens predicts K findings (multi-label sigmoid; K = 1 for a
     binary task), trained with BCE against the manifest labels (weight cfg.model.disc_loss_weight);
  2. the probabilities select learned label embeddings (a "present" and an "absent" embedding per finding, mixed
     by p and 1 - p, summed over findings);
  3. that label vector is concatenated to every visual token and projected back to the visual width.
The projection is added as a residual so that, at initialisation, the pretrained visual features pass unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiscriminationModule(nn.Module):
    def __init__(self, width: int, n_labels: int, label_embed_dim: int):
        super().__init__()
        self.classifier = nn.Linear(width, n_labels)
        self.present = nn.Parameter(torch.randn(n_labels, label_embed_dim) * 0.02)
        self.absent = nn.Parameter(torch.randn(n_labels, label_embed_dim) * 0.02)
        self.fuse = nn.Linear(width + label_embed_dim, width)
        nn.init.zeros_(self.fuse.weight)  # residual starts as identity
        nn.init.zeros_(self.fuse.bias)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, W) -> (label-enhanced tokens (B, T, W), logits (B, K))."""
        logits = self.classifier(tokens.mean(dim=1))
        probs = torch.sigmoid(logits)
        label_vector = probs @ self.present + (1 - probs) @ self.absent  # (B, E)
        expanded = label_vector.unsqueeze(1).expand(-1, tokens.shape[1], -1)
        return tokens + self.fuse(torch.cat([tokens, expanded.to(tokens.dtype)], dim=-1)), logits


def discrimination_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-label BCE; `pos_weight` (K,) weighs each label's positives (rare findings: negatives / positives)."""
    if pos_weight is not None:
        pos_weight = pos_weight.to(logits.device, torch.float32)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight)


def balanced_pos_weight(labels: torch.Tensor, cap: float) -> torch.Tensor | None:
    """negatives / positives per label of the training labels (N, K), capped at `cap`; None when cap is 0."""
    if cap <= 0:
        return None
    positives = labels.float().sum(0)
    ratio = (len(labels) - positives) / positives.clamp(min=1.0)
    return ratio.clamp(min=1.0, max=cap)
