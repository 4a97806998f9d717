"""The three LM fine-tuning strategies of MedVLM, as configuration of one model (not copies of a training loop).

  freeze      the LM stays frozen except the decoder layers in cfg.train.freeze.trainable_lm_layers;
  lora        low-rank adapters (peft LoraConfig) injected into cfg.train.lora.target_modules of every layer;
  ptuning_v2  trainable key/value prefixes at every layer (peft PrefixTuningConfig / PrefixEncoder: P-Tuning v2).

In every strategy the vision tail (when tune_vision_blocks > 0), the discrimination module, the clue module (when
on), the Q-Former and the projections are trained. `check_strategy` runs before any model is built so a bad name
or size fails at start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from medvlm.config import Config
from medvlm.errors import ConfigError, ModelError
from medvlm.model.lm import decoder_layers, kv_geometry

if TYPE_CHECKING:  # peft / transformers are imported where used: inference runs on model/runtime.py without them
    from transformers import DynamicCache, PreTrainedModel

STRATEGIES = ("freeze", "lora", "ptuning_v2")


def check_strategy(cfg: Config, strategy: str) -> None:
    """Fail with one line before anything expensive when the strategy cannot be built from cfg."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is unknown (choose one of {', '.join(STRATEGIES)})")
    if strategy == "freeze" and not cfg.train.freeze.trainable_lm_layers:
        raise ConfigError("train.freeze.trainable_lm_layers is empty: the freeze strategy would train no LM layer")
    if strategy == "lora" and not cfg.train.lora.target_modules:
        raise ConfigError("train.lora.target_modules is empty")


class PrefixKV(nn.Module):
    """P-Tuning v2: learned key/value prefixes for every decoder layer, handed to the LM as a pre-filled KV cache.

    The prefix bypasses RoPE (as in prefix tuning); real tokens keep positions 0.. so the same prompt sees the
    same rotary phases with and without a prefix. Zero init: at the start the prefix only dilutes attention a
    little instead of injecting random keys/values into a pretrained LM.
    """

    def __init__(self, lm: PreTrainedModel, num_virtual_tokens: int, projection: bool = False):
        super().__init__()
        from peft import PrefixTuningConfig
        from peft.tuners.prefix_tuning import PrefixEncoder

        layers, kv_heads, head_dim = kv_geometry(lm)
        self.layers, self.kv_heads, self.head_dim, self.length = layers, kv_heads, head_dim, num_virtual_tokens
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
        self.encoder = PrefixEncoder(self.peft_config)
        self.register_buffer("tokens", torch.arange(num_virtual_tokens), persistent=False)

    def cache(self, batch_size: int, dtype: torch.dtype) -> DynamicCache:
        from transformers import DynamicCache

        kv = self.encoder(self.tokens.unsqueeze(0)).to(dtype)  # (1, P, layers*2*kv_heads*head_dim)
        kv = kv.view(1, self.length, self.layers * 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        kv = kv.expand(-1, batch_size, -1, -1, -1)  # (layers*2, B, kv_heads, P, head_dim)
        return DynamicCache(ddp_cache_data=[(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)])


def apply_strategy(model: nn.Module, cfg: Config, strategy: str, runtime: bool = False) -> None:
    """Set requires_grad (and add adapters / prefixes) on an assembled MedVLM `model` for `strategy`.

    runtime: the LM is model/runtime.py's LlamaLM (inference): the same adapters and prefixes, in plain torch."""
    check_strategy(cfg, strategy)
    lm = model.lm
    if runtime and strategy in ("lora", "ptuning_v2"):
        from medvlm.model import runtime as rt

        lm.requires_grad_(False)
        if strategy == "lora":
            lora = cfg.train.lora
            rt.inject_lora(lm, list(lora.target_modules), lora.r, lora.alpha)
        else:
            model.prefix = rt.PrefixKV(lm, cfg.train.ptuning_v2.num_virtual_tokens, cfg.train.ptuning_v2.prefix_projection)
        return
    lm.requires_grad_(False)
    if strategy == "freeze":
        layers = decoder_layers(lm)
        for index in cfg.train.freeze.trainable_lm_layers:
            if not -len(layers) <= index < len(layers):
                raise ConfigError(
                    f"train.freeze.trainable_lm_layers has {index} but the LM keeps {len(layers)} layers (model.lm_layers)"
                )
            layers[index].requires_grad_(True)
    elif strategy == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = cfg.train.lora
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules))
        try:
            inject_adapter_in_model(peft_config, lm)
        except ValueError as exc:
            raise ModelError(f"train.lora.target_modules {lora.target_modules}: {str(exc).splitlines()[0]}") from None
    elif strategy == "ptuning_v2":
        model.prefix = PrefixKV(lm, cfg.train.ptuning_v2.num_virtual_tokens, cfg.train.ptuning_v2.prefix_projection)


def lm_adapter_parameter_names(model: nn.Module) -> set[str]:
    """Trainable LM-side parameters (decoder layers, LoRA, prefixes): they get cfg.train.lm_lr."""
    return {n for n, p in model.named_parameters() if p.requires_grad and (n.startswith("lm.") or n.startswith("prefix."))}
