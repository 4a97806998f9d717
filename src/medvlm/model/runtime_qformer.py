"""Blip2QFormerModel for query tokens only, in plain torch with its parameter names: the inference twin of
model/qformer.py's transformers Q-Former (see model/runtime.py, whose LM runs beside it without transformers)."""

from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, x, context):
        batch, length, hidden = x.shape
        d = hidden // self.heads
        q = self.query(x).view(batch, length, -1, d).transpose(1, 2)
        k = self.key(context).view(batch, context.shape[1], -1, d).transpose(1, 2)
        v = self.value(context).view(batch, context.shape[1], -1, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
        return out.transpose(1, 2).reshape(batch, length, hidden)


class _Output(nn.Module):
    def __init__(self, width_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _AttentionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.attention = _Attention(hidden, heads, kv_width)
        self.output = _Output(hidden, hidden, eps)

    def forward(self, x, context):
        return self.output(self.attention(x, context), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class _QFormerLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate, visual_width, eps, cross: bool):
        super().__init__()
        self.attention = _AttentionBlock(hidden, heads, hidden, eps)
        self.crossattention = _AttentionBlock(hidden, heads, visual_width, eps) if cross else None
        self.intermediate_query = _Intermediate(hidden, intermediate)
        self.output_query = _Output(intermediate, hidden, eps)

    def forward(self, x, visual):
        x = self.attention(x, x)
        if self.crossattention is not None:
            x = self.crossattention(x, visual)
        return self.output_query(self.intermediate_query(x), x)


class _Encoder(nn.Module):
    def __init__(self, layers: list[_QFormerLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class QFormer(nn.Module):
    """Blip2QFormerModel for query tokens only (use_qformer_text_input off), same parameter names."""

    def __init__(self, hidden: int, layers: int, heads: int, intermediate: int, visual_width: int,
                 cross_attention_frequency: int = 1, eps: float = 1e-12):
        super().__init__()
        self.layernorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = _Encoder([_QFormerLayer(hidden, heads, intermediate, visual_width, eps,
                                               i % cross_attention_frequency == 0) for i in range(layers)])

    def forward(self, query_embeds, encoder_hidden_states):
        x = self.layernorm(query_embeds)
        for layer in self.encoder.layer:
            x = layer(x, encoder_hidden_states.to(x.dtype))
        return SimpleNamespace(last_hidden_state=x)
