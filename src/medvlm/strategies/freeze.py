"""freeze: the LM stays frozen except the decoder layers in train.freeze.trainable_lm_layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from medvlm.errors import ConfigError, ModelError
from medvlm.strategies._base import StrategySettings

if TYPE_CHECKING:
    from torch import nn


class Settings(StrategySettings):
    trainable_lm_layers: list[int] = Field(description="decoder layers trained (negative = from the end)")


def check(settings: Settings) -> None:
    if not settings.trainable_lm_layers:
        raise ConfigError("train.freeze.trainable_lm_layers is empty: the freeze strategy would train no LM layer")


def apply(model: nn.Module, settings: Settings, runtime: bool) -> None:
    layers = decoder_layers(model.lm)
    for index in settings.trainable_lm_layers:
        if not -len(layers) <= index < len(layers):
            raise ConfigError(
                f"train.freeze.trainable_lm_layers has {index} but the LM keeps {len(layers)} layers (model.lm_layers)"
            )
        layers[index].requires_grad_(True)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama/Mistral/Qwen style `model.layers`, GPT-2 style `transformer.h`)."""
    base = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    for attr in ("layers", "h"):
        if hasattr(base, attr):
            return getattr(base, attr)
    raise ModelError(f"{type(lm).__name__}: cannot find its decoder layers")
