"""Whether a term is in the image at all: a found / not-found decision and a score per term map.

A head (the official one included) gives a map but no presence output, and a map of a thing that is
not there is rarely all zero: a few weak blobs pass the threshold. The rule reads the map only: the
term's **score** is the probability that the top ``area`` share of the image reaches (the
``ceil(area * pixels)``-th largest value of its map, so a single hot pixel does not count), and the
term is **found** when the score exceeds ``level``. The two constants were chosen on the micro
world's validation split (``tools/calibrate_presence.py``), separately for a head and for zero-shot
maps; a term that is not found contributes an empty map to its expression.

A model trained on a closed world (the embedded micro model) lists the words it was trained to name;
with such a model a term none of whose words is on the list is not found whatever its map says
(``knows_term``): the map of a word a model never saw lights whatever the model finds most salient.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from torch import Tensor

from ..errors import LdznetError
from ..words import words

__all__ = ["HEAD_RULE", "PresenceRule", "TermPresence", "UNKNOWN_WORDS", "ZERO_SHOT_RULE", "knows_term",
           "presence_score"]


def presence_score(probability: Tensor, area: float) -> float:
    """The ``ceil(area * pixels)``-th largest value (at least the first: the peak) of a map ``[H, W]``."""
    flat = probability.detach().reshape(-1).float()
    if flat.numel() == 0:
        return 0.0
    count = min(flat.numel(), max(1, math.ceil(area * flat.numel())))
    return float(flat.kthvalue(flat.numel() - count + 1).values)


def knows_term(term: str, vocabulary: Collection[str]) -> bool:
    """Whether at least one word of ``term`` (letters only, compared without case) is in ``vocabulary``
    (casefolded words): ``purple goblin`` is half known and runs; ``goblin`` is not."""
    return any(word in vocabulary for word in words(term))


@dataclass(frozen=True)
class TermPresence:
    """One term's decision: ``found`` and its ``score`` in [0, 1] (see the module docstring); ``why``
    says why a term was not found where the score does not."""

    found: bool
    score: float
    why: str = ""

    def to_dict(self) -> dict:
        return {"found": self.found, "score": round(self.score, 4), **({"why": self.why} if self.why else {})}


UNKNOWN_WORDS = TermPresence(False, 0.0, "none of its words is one the model was trained on")


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
