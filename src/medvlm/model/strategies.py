"""The model side of the strategies (medvlm.strategies, one module each): look the strategy up in the registry,
check it and let it mark an assembled MedVLM. `check_strategy` runs before any model is built so a bad name or
size fails at start.
"""

from __future__ import annotations

from torch import nn

from medvlm.config import Config
from medvlm.errors import ConfigError
from medvlm.strategies import REGISTRY, STRATEGIES


def check_strategy(cfg: Config, strategy: str) -> None:
    """Fail with one line before anything expensive when the strategy cannot be built from cfg."""
    if strategy not in REGISTRY:
        raise ConfigError(f"strategy {strategy!r} is unknown (choose one of {', '.join(STRATEGIES)})")
    REGISTRY[strategy].check(getattr(cfg.train, strategy))


def apply_strategy(model: nn.Module, cfg: Config, strategy: str, runtime: bool = False) -> None:
    """Freeze the LM of an assembled MedVLM `model`, then let `strategy` mark / add its LM-side parameters.

    runtime: the LM is model/runtime.py's LlamaLM (inference): the same adapters and prefixes, in plain torch."""
    check_strategy(cfg, strategy)
    model.lm.requires_grad_(False)
    REGISTRY[strategy].apply(model, getattr(cfg.train, strategy), runtime)


def lm_adapter_parameter_names(model: nn.Module) -> set[str]:
    """Trainable LM-side parameters (decoder layers, LoRA, prefixes): they get cfg.train.lm_lr."""
    return {n for n, p in model.named_parameters() if p.requires_grad and (n.startswith("lm.") or n.startswith("prefix."))}
