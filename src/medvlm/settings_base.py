"""The base of every settings section: unknown keys are errors (`extra="forbid"`), so a typo in params.yaml fails
at start with one line instead of being ignored. Its own module so that medvlm.config_sections and the strategy
modules (medvlm.strategies, which config_sections reads) share it without importing each other."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
