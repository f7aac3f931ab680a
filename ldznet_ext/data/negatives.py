"""Absent phrases for data that names none (``?negatives=K`` on any data spec), as CLIPSeg sampled them.

PhraseCut and the RefCOCO family name only what each image shows, so nothing in them can tell whether a
model returns an absent thing empty. CLIPSeg's PhraseCut loader made negatives by giving an image another
image's phrase with an empty mask; ``SampledNegatives`` does that for evaluation and calibration: each
example also names up to K phrases of another example, drawn by a generator seeded by the example's index
(so every shard and every run sees the same ones), that the example itself does not name. As in CLIPSeg, a
thing an image shows but its data does not name can make a false negative.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import LdznetError
from ..limits import NEGATIVES
from .examples import Example, Source, phrase_key
from .stream import RECOVERABLE

_TRIES = 16  # other examples read before an example is left without (all) its negatives
_STREAM = 0x6E6567  # keeps these draws apart from every other seeded stream of an index


class SampledNegatives:
    """``source`` with each example also naming up to ``count`` absent phrases (module docstring)."""

    def __init__(self, source: Source, count: int):
        if len(source) < 2:
            raise LdznetError(f"{source.description}: negatives come from other examples; it has {len(source)}")
        self.source, self.count = source, count
        joiner = "&" if "?" in source.description else "?"
        self.description = f"{source.description}{joiner}negatives={count}"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Example:
        example = self.source[index]
        named = named_keys(example)
        rng = np.random.default_rng([_STREAM, index])
        negatives: list[str] = []
        others = rng.choice(len(self.source) - 1, size=min(_TRIES, len(self.source) - 1), replace=False)
        for other in (int(o) + (o >= index) for o in others):  # distinct examples, none of them this one
            if len(negatives) == self.count:
                break
            try:
                shown = borrowable_phrases([self.source[other]], named)
            except RECOVERABLE:  # an unreadable other example (its own turn logs it): read another
                continue
            if shown:
                phrase = shown[int(rng.integers(len(shown)))]
                negatives.append(phrase)
                named.add(phrase_key(phrase))
        empty = np.zeros(example.image.shape[:2], dtype=bool)
        return Example(example.key, example.image, (*example.pairs, *((p, empty) for p in negatives)))


def named_keys(example: Example) -> set[str]:
    """The :func:`phrase_key` of every phrase ``example`` names, present or absent."""
    return {phrase_key(phrase) for phrase, _ in example.pairs}


def borrowable_phrases(others: Iterable[Example], named: set[str]) -> list[str]:
    """The phrases that ``others`` show (non-empty masks) and whose key is not in ``named``, sorted: what an
    image that names ``named`` can be given as an absent phrase."""
    return sorted({p for other in others for p, mask in other.pairs if mask.any() and phrase_key(p) not in named})


def negatives_option(value: str) -> int:
    """The count of a ``negatives=K`` spec option; LdznetError naming the bound otherwise."""
    try:
        return NEGATIVES.parse(value)
    except ValueError as error:
        raise LdznetError(f"data spec option negatives={value}: {error}") from None
