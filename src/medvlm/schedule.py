"""The learning-rate schedule of `medvlm train` and `medvlm pretrain-vision`: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`, `warmup` of them warmup."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
