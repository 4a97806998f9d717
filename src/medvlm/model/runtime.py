"""Inference runtime in plain torch: what `medvlm generate` / `serve` run, without importing transformers or peft.

Importing transformers' model code costs more CPU than torch itself (it pulls torch.distributed.tensor, sympy and
dynamo), and `medvlm generate` has to answer a user within seconds. A trained model is a Llama-family LM
(SmolLM2 by default), a BLIP-2 Q-Former and small torch modules, so inference rebuilds the two transformers
pieces here, with the *same parameter names*: the trained weights (trainable.safetensors) and the LM cache load
into them unchanged. Training keeps the transformers / peft modules; `tests/test_runtime.py` checks that both
give the same logits, query tokens and reports.

  LlamaLM        LlamaForCausalLM (RMSNorm, RoPE default type, grouped-query attention, SwiGLU) built on the
                 `meta` device and filled from the safetensors file: no random init that is overwritten later,
                 only the kept layers' tensors are read.
  KVCache        the decoder's key/value cache (DynamicCache's update / reorder_cache / get_seq_length).
  QFormer        Blip2QFormerModel (query tokens only), in model/runtime_qformer.py.
  Tokenizer      the `tokenizers` file + tokenizer_config.json + the chat template rendered with jinja2 the way
                 transformers renders it.
The strategies' adapters and prefixes for this LM (peft's layout in plain torch) are in medvlm.strategies._modules.

`supported(path)` says whether an LM folder can run here (a Llama config and a model.safetensors); anything else
(a hub id, another architecture, RoPE scaling) falls back to transformers.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from medvlm.errors import ModelError


# ---------------------------------------------------------------- config
def _lm_config(path: Path) -> dict | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _rope_theta(config: dict) -> float | None:
    """RoPE base for the default rope type, None when the config asks for scaling this runtime does not do."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        return None
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def supported(path) -> bool:
    """Whether the LM folder `path` runs on this runtime (else the caller uses transformers)."""
    if not isinstance(path, Path) or not (path / "model.safetensors").is_file():
        return False
    config = _lm_config(path)
    if config is None or config.get("model_type") != "llama" or config.get("hidden_act", "silu") != "silu":
        return False
    return _rope_theta(config) is not None and not config.get("attention_bias") and not config.get("mlp_bias")


# ---------------------------------------------------------------- cache
class KVCache:
    """Per-layer keys/values (B, kv_heads, T, head_dim), grown by `update`, reordered for beam search."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.layers = list(layers or [])

    def __len__(self) -> int:
        return len(self.layers)

    def __bool__(self) -> bool:  # an empty cache is still a cache (`prefix_cache(...) or KVCache()`)
        return True

    def get_seq_length(self) -> int:
        return self.layers[0][0].shape[-2] if self.layers else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < len(self.layers):
            k, v = self.layers[index]
            key, value = torch.cat([k.to(key.dtype), key], dim=-2), torch.cat([v.to(value.dtype), value], dim=-2)
            self.layers[index] = (key, value)
        else:
            self.layers.append((key, value))
        return key, value

    def reorder_cache(self, beam_index: torch.Tensor) -> None:
        self.layers = [(k.index_select(0, beam_index.to(k.device)), v.index_select(0, beam_index.to(v.device)))
                       for k, v in self.layers]


# ---------------------------------------------------------------- Llama
class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, c: SimpleNamespace, index: int):
        super().__init__()
        self.index, self.heads, self.kv_heads, self.head_dim = index, c.heads, c.kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.index)
        groups = self.heads // self.kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class LlamaMLP(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: SimpleNamespace, index: int):
        super().__init__()
        self.self_attn = LlamaAttention(c, index)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """`lm.model`: embeddings, layers, final norm. Called like transformers' decoder with inputs_embeds."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(LlamaLayer(c, i) for i in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        dim = self.c.head_dim
        inv_freq = 1.0 / (self.c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        x = inputs_embeds
        batch, length = x.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        device = x.device
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past).unsqueeze(0).expand(batch, -1)
        # causal mask over [cache | new tokens], combined with the 2-D padding mask (1 = attend)
        keys = torch.arange(past + length, device=device)
        mask = keys.view(1, -1) <= (torch.arange(length, device=device) + past).view(-1, 1)  # (L, past+L)
        mask = mask.unsqueeze(0).unsqueeze(0)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, : past + length].bool()
        cos, sin = self._rope(position_ids, x.dtype)
        cache = past_key_values if use_cache or past_key_values is not None else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return SimpleNamespace(last_hidden_state=self.norm(x))


class LlamaLM(nn.Module):
    """LlamaForCausalLM's parameter layout (model.*, lm_head) and the accessors MedVLM uses."""

    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.c = c
        self.config = SimpleNamespace(num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                      num_key_value_heads=c.kv_heads, head_dim=c.head_dim, hidden_size=c.hidden,
                                      tie_word_embeddings=c.tied)
        self.model = LlamaDecoder(c)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_decoder(self) -> LlamaDecoder:
        return self.model


@contextmanager
def _uninitialised():
    """Linear / Embedding weights are left as allocated (torch.empty) while building: they are replaced by the
    file's tensors right after. (The `meta` device would do the same, but its init ops import torch._dynamo,
    seconds of CPU.)"""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


def load_llama(path: Path, keep: int, dtype: torch.dtype = torch.float32) -> LlamaLM:
    """LlamaLM with the first `keep` layers (0 = all) of the model.safetensors in `path`; weights are read, never
    initialised."""
    config = _lm_config(path) or {}
    total = int(config["num_hidden_layers"])
    keep = keep or total
    heads = int(config["num_attention_heads"])
    c = SimpleNamespace(
        vocab=int(config["vocab_size"]), hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
        layers=keep, heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(config),
        tied=bool(config.get("tie_word_embeddings", False)),
    )
    with _uninitialised():
        model = LlamaLM(c)
    state = kept_layer_tensors(path / "model.safetensors", keep, dtype)
    if c.tied:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if c.tied else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match the config (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(state, strict=False, assign=True)
    if c.tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def kept_layer_tensors(weights: Path, keep: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file outside the decoder layers and of layers 0..keep-1 (the others are never
    read), cast to `dtype` when given. Shared by this runtime and the training LM (medvlm.model.lm)."""
    from safetensors import safe_open

    state = {}
    with safe_open(weights, framework="pt") as fh:
        for key in fh.keys():
            index = _layer_index(key)
            if index is None or index < keep:
                tensor = fh.get_tensor(key)
                state[key] = tensor if dtype is None else tensor.to(dtype)
    return state


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


# ---------------------------------------------------------------- tokenizer
class Tokenizer:
    """The subset of a transformers fast tokenizer MedVLM uses, from tokenizer.json + tokenizer_config.json."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as Core

        self.core = Core.from_file(str(path / "tokenizer.json"))
        try:
            meta = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        template_file = path / "chat_template.jinja"
        self.chat_template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                              else meta.get("chat_template"))
        self.special = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = meta.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            self.special[name] = value
            setattr(self, name, value)
            setattr(self, name + "_id", self.core.token_to_id(value) if value is not None else None)
        self.clean_up_tokenization_spaces = bool(meta.get("clean_up_tokenization_spaces", False))
        if self.pad_token_id is None:
            self.pad_token, self.pad_token_id = self.eos_token, self.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.core.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.core.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        """Rendered like transformers does: a sandboxed jinja2 environment, trim_blocks and lstrip_blocks."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ModelError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **{k: v for k, v in self.special.items() if v is not None})


def load_lm(path: Path, keep: int, dtype: torch.dtype = torch.float32) -> tuple[LlamaLM, Tokenizer]:
    return load_llama(path, keep, dtype), Tokenizer(path)


def num_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
