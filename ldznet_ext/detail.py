"""The detail pass: after a generation, each instance of an expression inpainted in turn at full
resolution (the WebUI's "only masked" crop around the instance, with padding).

This module plans the pass and knows no WebUI: which instances, their masks, the crop box each one
is repainted in, its prompt and its seed. ``webui/detail_pass.py`` runs the plan on the host.

- Instances come left to right (:meth:`Prediction.instances`); selectors in the expression
  (``face[1]``, ``face[largest]``) choose which ones there are.
- Prompts: the text split at ``[SEP]`` (ADetailer's convention), one per instance in that order;
  fewer prompts than instances reuse the last; an empty prompt is the generation's own prompt.
- Seeds: instance k (0-based) gets the image's seed + k, so the same seed gives the same result
  and two instances never share their noise.
- The crop box is the instance mask's bounding box grown by the padding on every side and clamped
  to the image, as the host computes its "only masked" region before fitting it to the output's
  aspect ratio; nothing outside it changes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import LdznetError
from .job import MaskJob, checked_number, number_field
from .limits import CROP_PADDING, DENOISING, FEATHER, SAMPLING_STEPS, SEED
from .masks.instances import Instance, instance_image

SEPARATOR = "[SEP]"
_SEPARATOR = re.compile(r"\s*\[SEP\]\s*")


@dataclass(frozen=True)
class DetailPass:
    """The detail pass's settings: ``expression`` ("" = off), ``prompts`` separated by [SEP],
    ``denoising`` strength, sampling ``steps`` and crop ``padding`` in pixels. Numbers may be text
    (script args, infotext); invalid values raise LdznetError naming the field."""

    expression: str = ""
    prompts: str = ""
    denoising: float = number_field(0.4, DENOISING, "denoising strength of each instance's img2img")
    steps: int = number_field(20, SAMPLING_STEPS, "sampling steps of each instance's img2img")
    padding: int = number_field(32, CROP_PADDING, "pixels of context around each instance's box")

    def __post_init__(self) -> None:
        # The mask job's own checks: length, whitespace, and a parse error with its position now
        object.__setattr__(self, "expression", MaskJob(expression=self.expression).expression)
        if not isinstance(self.prompts, str):
            raise LdznetError(f"detail prompts must be text, got {type(self.prompts).__name__}")
        for spec in fields(self):
            if "limit" in spec.metadata:
                object.__setattr__(self, spec.name, checked_number(getattr(self, spec.name), spec))

    @property
    def active(self) -> bool:
        return bool(self.expression)

    def mask_job(self, job: MaskJob) -> MaskJob:
        """The mask job of the pass: ``job``'s model and map settings (mode, threshold, refinement,
        feather, presence) with this expression, on the generated image alone (no brush to combine
        with). What shapes the main mask stays off: inverted, the pass would repaint the background as
        one instance; grown, kept to the largest or without small objects, it would miss instances."""
        return job.replace(expression=self.expression, combine="replace", invert=False, grow=0.0, keep_largest=None,
                           min_area=0)


@dataclass(frozen=True)
class DetailStep:
    """One instance's img2img: ``order`` its 1-based place left to right; ``mask`` uint8 [H, W]
    (255 = repaint, soft with the job's feather); ``box`` (x0, y0, x1, y1), ends exclusive, the
    padded crop; ``prompt``; ``seed``."""

    order: int
    mask: np.ndarray = field(repr=False)
    box: tuple[int, int, int, int]
    prompt: str
    seed: int


def split_prompts(text: str) -> list[str]:
    """The prompts of ``text`` separated by [SEP] (surrounding spaces dropped); "" gives [""]."""
    return _SEPARATOR.split(text.strip())


def instance_prompt(prompts: Sequence[str], index: int, default: str) -> str:
    """The prompt of instance ``index`` (0-based): its own, else the last one given; ``default``
    when that is empty."""
    return prompts[min(index, len(prompts) - 1)] or default


def crop_box(mask: np.ndarray, padding: int) -> tuple[int, int, int, int] | None:
    """The bounding box of ``mask``'s non-zero pixels grown by ``padding`` and clamped to the mask;
    None when the mask is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0),
            min(int(cols[-1]) + 1 + padding, width), min(int(rows[-1]) + 1 + padding, height))


def plan(instances: Sequence[Instance], detail: DetailPass, prompt: str, seed: int,
         feather: float = 0.0) -> list[DetailStep]:
    """One step per instance, in the order given: its mask (feathered by ``feather`` pixels),
    padded crop box, prompt (``prompt`` stands for an empty one) and seed (``seed`` + its index).
    An instance that a feather much wider than itself fades to nothing has nothing to repaint: no step."""
    FEATHER.check(feather, "feather")
    SEED.check(seed, "seed")
    prompts = split_prompts(detail.prompts)
    steps = []
    for index, instance in enumerate(instances):
        mask = instance_image(instance, feather)
        box = crop_box(mask, detail.padding)
        if box is None:
            continue
        steps.append(DetailStep(instance.order, mask, box, instance_prompt(prompts, index, prompt), seed + index))
    return steps

