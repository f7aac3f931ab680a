"""Whether a term is in the image at all: a found / not-found decision and a score per term map.

A head (the official one included) gives a map but no presence output, and a map of a thing that is
not there is rarely all zero: a few weak blobs pass the threshold. The rule reads the map only: the
term's **score** is the probability that the top ``area`` share of the image reaches (the
``ceil(area * pixels)``-th largest value of its map, so a single hot pixel does not count), and the
term is **found** when the score exceeds ``level``. The two constants were chosen on the micro
world's validation split (``tools/calibrate_presence.py``), separately for a head and for zero-shot
maps; a term that is not found contributes an empty map to its expression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..errors import LdznetError

__all__ = ["HEAD_RULE", "PresenceRule", "TermPresence", "ZERO_SHOT_RULE", "presence_score"]


def presence_score(probability: Tensor, area: float) -> float:
    """The ``ceil(area * pixels)``-th largest value (at least the first: the peak) of a map ``[H, W]``."""
    flat = probability.detach().reshape(-1).float()
    if flat.numel() == 0:
        return 0.0
    count = min(flat.numel(), max(1, math.ceil(area * flat.numel())))
    return float(flat.kthvalue(flat.numel() - count + 1).values)


@dataclass(frozen=True)
class TermPresence:
    """One term's decision: ``found`` and its ``score`` in [0, 1] (see the module docstring)."""

    found: bool
    score: float

    def to_dict(self) -> dict:
        return {"found": self.found, "score": round(self.score, 4)}


@dataclass(frozen=True)
class PresenceRule:
    """found = presence_score(map, area) > level; area in [0, 1), level in [0, 1)."""

    area: float
    level: float

    def __post_init__(self) -> None:
        for name in ("area", "level"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise LdznetError(f"presence {name} must be a number in [0, 1), got {value!r}")

    def decide(self, probability: Tensor) -> TermPresence:
        """The decision for one term's map ``[H, W]`` in [0, 1]."""
        score = presence_score(probability, self.area)
        return TermPresence(score > self.level, score)


# Chosen by ``tools/calibrate_presence.py choose`` on world:val:60 with the embedded micro model (the
# most absent phrases rejected for at most 0.5 point of present-phrase mIoU there), the zero-shot rule
# on the maps of the default zero-shot score. Zero-shot maps are normalised per term, so their peak
# says nothing: the rule reads how much of the image stays high.
HEAD_RULE = PresenceRule(area=0.001, level=0.64)
ZERO_SHOT_RULE = PresenceRule(area=0.005, level=0.5)
