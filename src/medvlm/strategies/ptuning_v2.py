"""ptuning_v2: trainable key/value prefixes at every decoder layer (peft PrefixTuningConfig / PrefixEncoder: P-Tuning
v2), set as model.prefix (_modules.PrefixKV) and handed to the LM as a pre-filled KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from medvlm.strategies._base import StrategySettings

if TYPE_CHECKING:
    from torch import nn


class Settings(StrategySettings):
    num_virtual_tokens: int = Field(ge=1, description="prefix length: key/value pairs per decoder layer")
    lm_lr: float | None = Field(gt=0, description="learning rate of the prefixes; None = train.lm_lr (prefixes "
                                                  "usually want a larger rate than weights: P-Tuning v2 5e-3..1e-2)")
    prefix_projection: bool = Field(description="reparameterise the prefixes through a 2-layer MLP "
                                                "(P-Tuning v2's option)")


def check(settings: Settings) -> None:
    """Nothing to check beyond the field ranges."""


def apply(model: nn.Module, settings: Settings, runtime: bool) -> None:
    from medvlm.strategies._modules import PrefixKV

    model.prefix = PrefixKV(model.lm, settings.num_virtual_tokens, settings.prefix_projection, runtime=runtime)
