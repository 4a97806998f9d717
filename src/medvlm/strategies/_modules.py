"""The torch modules the strategies add to an LM, imported inside the strategies' functions (settings load without
torch). Their parameter names are peft's, so weights trained with peft load into the plain-torch runtime LM
(model/runtime.py) unchanged; tests/test_runtime.py checks both give the same logits.

  LoraLinear / inject_lora   peft's LoRA linear (base_layer + lora_A/lora_B.default, scale alpha / r), runtime LM
  PrefixEncoder              peft's PrefixEncoder layout (embedding + transform MLP), runtime LM
  PrefixKV                   P-Tuning v2 prefixes as per-layer (key, value) pairs (peft's PrefixEncoder in training)
"""

from __future__ import annotations

import torch
from torch import nn

from medvlm.errors import ModelError


class LoraLinear(nn.Module):
    """peft's LoRA linear layout: base_layer + lora_A/lora_B["default"], y = base(x) + B(A(x)) * alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


def inject_lora(lm: nn.Module, target_modules: list[str], r: int, alpha: float) -> None:
    """Wrap every Linear whose name ends in one of target_modules (what peft's inject_adapter_in_model does)."""
    found = 0
    for module_name, module in list(lm.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in target_modules and child is not lm.lm_head:
                setattr(module, child_name, LoraLinear(child, r, alpha))
                found += 1
    if not found:
        raise ModelError(f"train.lora.target_modules {target_modules}: no such module in the LM")


class PrefixEncoder(nn.Module):
    """peft's PrefixEncoder layout: embedding (+ transform MLP with prefix_projection)."""

    def __init__(self, tokens: int, token_dim: int, layers: int, hidden: int, projection: bool):
        super().__init__()
        self.prefix_projection = projection
        if projection:
            self.embedding = nn.Embedding(tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * token_dim))
        else:
            self.embedding = nn.Embedding(tokens, layers * 2 * token_dim)

    def forward(self, prefix):
        out = self.embedding(prefix)
        return self.transform(out) if self.prefix_projection else out


def kv_geometry(lm: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim): the shape a prefix must have per layer."""
    cfg = lm.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


class PrefixKV(nn.Module):
    """P-Tuning v2: learned key/value prefixes for every decoder layer; MedVLM hands them to the LM as a pre-filled
    KV cache (DynamicCache, or model/runtime.py's KVCache on the runtime LM).

    The prefix bypasses RoPE (as in prefix tuning); real tokens keep positions 0.. so the same prompt sees the
    same rotary phases with and without a prefix. Training: peft's PrefixEncoder with zero init, so at the start
    the prefix only dilutes attention a little instead of injecting random keys/values into a pretrained LM.
    runtime: the same parameter names in plain torch (the trained weights are loaded over them).
    """

    def __init__(self, lm: nn.Module, num_virtual_tokens: int, projection: bool = False, runtime: bool = False):
        super().__init__()
        layers, kv_heads, head_dim = kv_geometry(lm)
        self.layers, self.kv_heads, self.head_dim, self.length = layers, kv_heads, head_dim, num_virtual_tokens
        if runtime:
            self.encoder = PrefixEncoder(num_virtual_tokens, kv_heads * head_dim, layers, lm.config.hidden_size,
                                         projection)
        else:
            from peft import PrefixTuningConfig
            from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder

            self.peft_config = PrefixTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=num_virtual_tokens,
                token_dim=kv_heads * head_dim,
                num_layers=layers,
                num_attention_heads=kv_heads,
                num_transformer_submodules=1,
                prefix_projection=projection,
                encoder_hidden_size=lm.config.hidden_size,
                init_weights="zero",
            )
            self.encoder = PeftPrefixEncoder(self.peft_config)
        self.register_buffer("tokens", torch.arange(num_virtual_tokens), persistent=False)

    def pairs(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (keys, values) pair per decoder layer, each (batch_size, kv_heads, length, head_dim)."""
        kv = self.encoder(self.tokens.unsqueeze(0)).to(dtype)  # (1, P, layers*2*kv_heads*head_dim)
        kv = kv.view(1, self.length, self.layers * 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        kv = kv.expand(-1, batch_size, -1, -1, -1)  # (layers*2, B, kv_heads, P, head_dim)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)]
