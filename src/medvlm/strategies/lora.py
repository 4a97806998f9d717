"""lora: low-rank adapters (peft LoraConfig) injected into train.lora.target_modules of every decoder layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from medvlm.errors import ConfigError, ModelError, first_line
from medvlm.strategies._base import StrategySettings

if TYPE_CHECKING:
    from torch import nn


class Settings(StrategySettings):
    r: int = Field(ge=1, description="rank of the adapters")
    alpha: int = Field(ge=1, description="scale: the adapter's output is multiplied by alpha / r")
    dropout: float = Field(ge=0.0, lt=1.0, description="dropout on the adapter's input (training)")
    target_modules: list[str] = Field(description="names of the Linear layers that get an adapter (q_proj, ...)")


def check(settings: Settings) -> None:
    if not settings.target_modules:
        raise ConfigError("train.lora.target_modules is empty")


def apply(model: nn.Module, settings: Settings, runtime: bool) -> None:
    """Training: peft's inject_adapter_in_model; runtime: the same layout in plain torch (_modules.inject_lora)."""
    targets = list(settings.target_modules)
    if runtime:
        from medvlm.strategies._modules import inject_lora

        inject_lora(model.lm, targets, settings.r, settings.alpha)
        return
    from peft import LoraConfig, inject_adapter_in_model

    peft_config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=targets)
    try:
        inject_adapter_in_model(peft_config, model.lm)
    except ValueError as exc:
        raise ModelError(f"train.lora.target_modules {settings.target_modules}: {first_line(exc)}") from None
