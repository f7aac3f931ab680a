"""How training turns examples into what the head sees: prompt templates and square crops."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..data.examples import Sample

PHRASECUT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}.", "a cropped photo of a {}.",
    "a good photo of a {}.", "a photo of one {}.", "a bad photo of a {}.", "a photo of the {}.")
"""The prompt templates of the official training (CLIPSeg's PhraseCut loader), sampled uniformly."""

TEMPLATES: dict[str, tuple[str, ...]] = {"plain": ("{}",), "phrasecut": PHRASECUT_TEMPLATES}

MIN_CROP_COVER = 0.05
CROP_TRIES = 50


def fit_square(sample: Sample, size: int, rng: np.random.Generator) -> Sample:
    """The sample as a ``size`` x ``size`` square, as the official PhraseCut training crops.

    A square of side min(H, W) is drawn up to 50 times; the first whose mask covers more than 5 %
    of the whole image's area is taken, else the one with most mask. Then the image is resized
    bilinearly and the mask by nearest neighbour. A sample already ``size`` square is returned as is.
    """
    height, width = sample.mask.shape
    if height == width == size:
        return sample
    side = min(height, width)
    best, best_cover = (0, 0), -1
    for _ in range(CROP_TRIES if height != width else 1):
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        cover = int(sample.mask[top:top + side, left:left + side].sum())
        if cover > best_cover:
            best, best_cover = (top, left), cover
        if cover > MIN_CROP_COVER * height * width:
            break
    top, left = best
    image = Image.fromarray(sample.image[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    mask = Image.fromarray(sample.mask[top:top + side, left:left + side]).resize((size, size), Image.NEAREST)
    key = sample.key if height == width and sample.key else None
    return Sample(np.asarray(image), sample.phrase, np.asarray(mask), f"{key}@{size}" if key else None)
