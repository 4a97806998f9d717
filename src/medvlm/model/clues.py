"""Disease clues (TRRG): learned per-finding embeddings that carry the predicted diagnosis into the generator.

K = len(data.label_names) clue embeddings e_k (any K: 1 for COV-CTR, 7 for the phantom, 14 for CheXpert-style
label sets). Each is scaled by its predicted probability p_k, so a finding the classifier rules out contributes
(almost) nothing. The scaled clues are used twice (each switchable):
  1. cross-modal interaction (model.clue_interaction): the visual tokens (queries) cross-attend to the clues
     (keys/values), residual + layer norm, before the Q-Former, so the queries read clue-aware visual tokens;
  2. clue tokens (model.clue_tokens): the clues projected to the LM width, placed as K extra input embeddings
     right after the Q-Former query embeddings.

Probability source (model.clue_source = "classifier"): the discrimination module's classifier when it is on;
otherwise a linear head owned by this module on the mean-pooled visual tokens, trained with the same BCE loss
(weight model.disc_loss_weight), so that the clue probabilities are supervised either way. A zero-shot
image-text similarity source would be another clue_source value that hands its probabilities to forward().
"""

from __future__ import annotations

import torch
from torch import nn

from medvlm.config import ModelConfig
from medvlm.errors import ConfigError


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


class DiseaseClues(nn.Module):
    def __init__(self, cfg: ModelConfig, width: int, n_labels: int, lm_width: int, own_classifier: bool):
        super().__init__()
        # unit-variance init (like nn.Embedding): the clues must be distinguishable keys from the first step
        self.embeddings = nn.Parameter(torch.randn(n_labels, cfg.clue_dim))
        self.classifier = nn.Linear(width, n_labels) if own_classifier else None
        self.interaction = CrossModalInteraction(width, cfg.clue_dim, cfg.clue_heads) if cfg.clue_interaction else None
        self.to_lm = nn.Linear(cfg.clue_dim, lm_width) if cfg.clue_tokens else None

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
