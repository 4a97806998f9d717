"""The LM fine-tuning strategies of MedVLM, one module each, found by listing this package (the registry).

A strategy module `<name>.py` is the strategy: `<name>` is its value in train.strategies and its params.yaml
section train.<name>. It holds
  Settings                          its train.<name> section: a StrategySettings (medvlm.strategies._base) whose
                                    fields carry their help text (Field description); lm_lr is every strategy's;
  check(settings)                   the start-up check: a ConfigError in one line before any model is built;
  apply(model, settings, runtime)   marks or adds the LM-side parameters of an assembled MedVLM whose LM is frozen;
                                    runtime: the LM is model/runtime.py's plain-torch LlamaLM (inference).
Adding a strategy is adding its module and its params.yaml section: medvlm.config_sections builds
TrainConfig.<name> and the allowed train.strategies from REGISTRY, medvlm.model.strategies dispatches to it.
Settings load imports every strategy module, so torch / peft are imported inside its functions only (the torch
modules the strategies add live in _modules.py); modules whose name starts with "_" are helpers, not strategies.

In every strategy the vision tail (when tune_vision_blocks > 0), the discrimination module, the clue module (when
on), the Q-Former and the projections are trained as well (medvlm.model.medvlm).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def _discover() -> dict[str, ModuleType]:
    """Every strategy module of this package by name, in name order."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            found[info.name] = importlib.import_module(f"{__name__}.{info.name}")
    return found


REGISTRY: dict[str, ModuleType] = _discover()
STRATEGIES = tuple(REGISTRY)
