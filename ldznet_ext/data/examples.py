"""What every data source yields: ``Example``s (one image and its phrases) and the ``Sample``s
(one image, phrase and mask) that trainers and evaluators make of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class Sample:
    """One training or evaluation pair: ``image`` uint8 [H, W, 3], ``mask`` bool [H, W] (all False
    for an absent phrase); ``key`` names the pixels exactly (None when they are not reproducible,
    e.g. after a random crop) so that encodings can be cached by it."""

    image: np.ndarray
    phrase: str
    mask: np.ndarray
    key: str | None = None

    @property
    def present(self) -> bool:
        return bool(self.mask.any())


@dataclass(frozen=True, eq=False)
class Example:
    """One image and its phrases: ``pairs`` of (phrase, bool [H, W] mask); ``key`` is a stable id."""

    key: str
    image: np.ndarray
    pairs: tuple[tuple[str, np.ndarray], ...]

    def samples(self, include_absent: bool = True) -> list[Sample]:
        """The example's (image, phrase, mask) samples; absent phrases (empty masks) optionally dropped."""
        return [Sample(self.image, phrase, mask, self.key) for phrase, mask in self.pairs
                if include_absent or mask.any()]


def phrase_key(phrase: str) -> str:
    """``phrase`` as compared for naming the same thing: case and runs of spaces do not count."""
    return " ".join(phrase.casefold().split())


class Source(Protocol):
    """A finite, indexable set of examples; ``description`` says what it is (for logs and metadata)."""

    description: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def resize_square(example: Example, size: int) -> Example:
    """The whole example squashed to ``size`` x ``size``, as CLIPSeg's PhraseCut test loader does:
    the image bilinearly (align_corners=True, rounded to uint8), masks by nearest neighbour
    (torch's: source pixel floor(i * in / out)). Aspect ratio is not kept."""
    height, width = example.image.shape[:2]
    if height == width == size:
        return example
    pixels = torch.from_numpy(example.image).permute(2, 0, 1)[None].float()
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=True)
    image = pixels[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    pairs = []
    for phrase, mask in example.pairs:
        resized = F.interpolate(torch.from_numpy(mask)[None, None].to(torch.uint8), size=(size, size), mode="nearest")
        pairs.append((phrase, resized[0, 0].bool().numpy()))
    return Example(f"{example.key}@square{size}", image, tuple(pairs))
