"""Disease clues (TRRG): learned per-finding embeddings that carry the predicted diagnosis into the generator.

K = len(data.label_names) clue embeddings e_k (any K: 1 for COV-CTR, 7 for the phantom, 14 for CheXpert-style
label sets). Each is scaled by its predicted probability p_k, so a finding the classifier rules out contributes
(almost) nothing. The scaled clues are used twice (each switchable):
  1. cross-modal interaction (model.clue_interaction): the visual tokens (queries) cross-attend to the clues
     (keys/values), residual + layer norm, before the Q-Former, so the queries read clue-aware visual tokens;
  2. clue tokens (model.clue_tokens): the clues projected to the LM width, placed as K extra input embeddings
     right after the Q-Former query embeddings.

Probability source, model.clue_source:
  - "classifier": the discrimination module's classifier when it is on; otherwise a linear head owned by this
    module on the mean-pooled visual tokens, trained with the same BCE loss (weight model.disc_loss_weight);
  - "zero_shot": no label supervision. The contrastive encoder of the pretrain_vision stage (frozen copy of its
    vision tail + image projection) scores each image against a positive and a negative prompt per label
    ("findings of covid" / "no findings of covid"): p_k = softmax over the pair of cosine / T (CLIP's binary
    zero-shot classification). Its weights are filled at training time (medvlm.pretrain.load_zero_shot) and
    saved with the trained weights, so a trained model runs without the pretrain folder.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from medvlm.config import ModelConfig
from medvlm.errors import ConfigError
from medvlm.model.encoder import view_tokens


class CrossModalInteraction(nn.Module):
    """Visual tokens attend to the clue embeddings: LayerNorm(tokens + CrossAttention(tokens, clues, clues)).

    add_bias_kv gives the attention a learned "no clue" key/value: a token need not take clue information, and
    with K = 1 the softmax is not a constant 1 (which would leave the query/key projections without gradient).
    """

    def __init__(self, width: int, clue_dim: int, heads: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"model.clue_heads={heads} does not divide the visual width {width}")
        self.attention = nn.MultiheadAttention(width, heads, kdim=clue_dim, vdim=clue_dim, add_bias_kv=True,
                                               batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, clues: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, W), clues (B, K, E) -> (B, T, W)"""
        attended, _ = self.attention(tokens, clues.to(tokens.dtype), clues.to(tokens.dtype), need_weights=False)
        return self.norm(tokens + attended)


class ZeroShotClueSource(nn.Module):
    """Frozen binary zero-shot classifier from the contrastive pre-training: logits (cos_pos - cos_neg) / T."""

    def __init__(self, tail: nn.Module, width: int, embed_dim: int, n_labels: int):
        super().__init__()
        self.tail = copy.deepcopy(tail)  # the architecture; pre-trained weights: pretrain.load_zero_shot
        self.image_proj = nn.Linear(width, embed_dim)
        self.register_buffer("positive", torch.zeros(n_labels, embed_dim))
        self.register_buffer("negative", torch.zeros(n_labels, embed_dim))
        self.register_buffer("temperature", torch.ones(()))
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "ZeroShotClueSource":
        return super().train(False)  # frozen: batch-norm statistics and dropout stay in inference mode

    def logits(self, trunk_features: torch.Tensor, concat_views: bool = False) -> torch.Tensor:
        """Cached trunk features (B, [V,] *trunk) -> (B, K)."""
        with torch.no_grad():
            image = F.normalize(self.image_proj(view_tokens(self.tail, trunk_features, concat_views).mean(1)), dim=-1)
            return image @ (self.positive - self.negative).T / self.temperature


class DiseaseClues(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int, n_labels: int, lm_width: int, own_classifier: bool,
                 zero_shot: tuple[nn.Module, int] | None = None):
        """zero_shot: (vision tail, contrastive embedding width) for clue_source zero_shot."""
        super().__init__()
        # unit-variance init (like nn.Embedding): the clues must be distinguishable keys from the first step
        self.embeddings = nn.Parameter(torch.randn(n_labels, cfg.clue_dim))
        self.classifier = nn.Linear(width, n_labels) if own_classifier else None
        self.interaction = CrossModalInteraction(width, cfg.clue_dim, cfg.clue_heads) if cfg.clue_interaction else None
        self.to_lm = nn.Linear(cfg.clue_dim, lm_width) if cfg.clue_tokens else None
        self.zero_shot = ZeroShotClueSource(zero_shot[0], width, zero_shot[1], n_labels) if zero_shot else None

    @property
    def n_tokens(self) -> int:
        """LM input tokens this module adds (K with clue tokens on, else 0)."""
        return self.embeddings.shape[0] if self.to_lm is not None else 0

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The module's own classifier (used when the discrimination module is off): (B, T, W) -> (B, K)."""
        if self.classifier is None:
            raise ConfigError("the clue module has no classifier of its own: the discrimination module provides it")
        return self.classifier(tokens.mean(dim=1))

    def forward(self, tokens: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens (B, T, W), probs (B, K) -> (clue-aware tokens (B, T, W), LM clue tokens (B, K, D) or None)."""
        clues = probs.unsqueeze(-1).to(self.embeddings.dtype) * self.embeddings  # (B, K, E)
        if self.interaction is not None:
            tokens = self.interaction(tokens, clues)
        lm_tokens = self.to_lm(clues) if self.to_lm is not None else None
        return tokens, lm_tokens
