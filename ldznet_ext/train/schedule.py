"""Learning-rate schedules shared by the head trainer and the micro SD stages."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, steps: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the learning rate at optimiser step ``step`` (0-based): a linear warm-up over
    ``warmup`` steps, then 1 ("constant", "plateau") or a cosine from 1 down to ``min_ratio`` at
    ``steps``, held there after."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule != "cosine":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
