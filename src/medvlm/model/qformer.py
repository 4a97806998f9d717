"""Q-Former bridge: N learned queries cross-attend to the visual tokens, then are projected to the LM's width.

It compresses 49 visual tokens into cfg.model.qformer_queries soft tokens for the LM (fewer tokens = cheaper LM
steps) and is trained from scratch with every strategy (no pretrained BLIP-2 Q-Former is reachable offline).
"""

from __future__ import annotations

import torch
from torch import nn

from medvlm.config import ModelConfig


class QFormerBridge(nn.Module):
    def __init__(self, cfg: ModelConfig, visual_width: int, lm_width: int, runtime: bool = False):
        super().__init__()
        if runtime:  # inference: the same module and parameter names in plain torch (model/runtime_qformer.py)
            from medvlm.model.runtime_qformer import QFormer

            self.qformer = QFormer(cfg.qformer_hidden, cfg.qformer_layers, cfg.qformer_heads, 4 * cfg.qformer_hidden,
                                   visual_width)
            initializer_range = 0.02
        else:
            from transformers import Blip2QFormerConfig, Blip2QFormerModel

            config = Blip2QFormerConfig(
                hidden_size=cfg.qformer_hidden,
                num_hidden_layers=cfg.qformer_layers,
                num_attention_heads=cfg.qformer_heads,
                intermediate_size=4 * cfg.qformer_hidden,
                encoder_hidden_size=visual_width,
                cross_attention_frequency=1,
                hidden_dropout_prob=cfg.qformer_dropout,
                attention_probs_dropout_prob=cfg.qformer_dropout,
            )
            self.qformer = Blip2QFormerModel(config)
            initializer_range = config.initializer_range
        self.queries = nn.Parameter(torch.randn(1, cfg.qformer_queries, cfg.qformer_hidden) * initializer_range)
        self.proj = nn.Linear(cfg.qformer_hidden, lm_width)

    def forward(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, visual_width) -> (B, N, lm_width)"""
        queries = self.queries.expand(visual_tokens.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=visual_tokens).last_hidden_state
        return self.proj(out)
