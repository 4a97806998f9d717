"""What every strategy's settings section has (medvlm.strategies lists what a strategy module holds)."""

from __future__ import annotations

from pydantic import Field

from medvlm.settings_base import Section


class StrategySettings(Section):
    lm_lr: float | None = Field(gt=0, description="learning rate of this strategy's LM-side parameters; "
                                                  "None = train.lm_lr")
