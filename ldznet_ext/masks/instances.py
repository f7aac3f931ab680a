"""Instances: the separate objects of a thresholded map, their order, and selecting some of them.

An instance is an 8-connected region of the binary mask. Regions smaller than
``max(FRAGMENT_SHARE * pixels, 1)`` pixels are fragments: they are never instances (not listed, never
selected). Orders (the conventions of ADetailer's sort orders; a negative index counts from the end,
as Impact Pack's ASC / DSC choose a direction):

- ``left``: left to right by the box's left edge (ties: top edge, then larger first), the default;
- ``top``: top to bottom by the box's top edge (ties: left edge, then larger first);
- ``center``: centre outwards, by the distance of the box's centre to the image's centre;
- ``area``: largest first (ties: left to right).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import LdznetError
from .ops import components, feather, feather_reach

__all__ = ["FRAGMENT_SHARE", "ORDERS", "Instance", "find_instances", "instance_image", "select_instances"]

FRAGMENT_SHARE = 0.0005  # 0.05 % of the image: at 512 x 512, regions under 132 px are fragments
ORDERS = ("left", "top", "center", "area")


@dataclass(frozen=True, eq=False)  # identity: a generated == would ask the window tensor for its truth
class Instance:
    """One object: ``box`` (x0, y0, x1, y1) in pixels, ends exclusive; ``area`` in pixels; ``score`` the
    mean probability over it; ``order`` its 1-based place left to right; ``window`` bool, the object's
    pixels inside its box; ``size`` (H, W) of the image. Only the window is stored: an image of
    thousands of specks would otherwise hold thousands of image-size masks."""

    box: tuple[int, int, int, int]
    area: int
    score: float
    order: int
    window: Tensor = field(repr=False)
    size: tuple[int, int]

    @property
    def mask(self) -> Tensor:
        """bool [H, W]: the object's pixels in the whole image."""
        x0, y0, x1, y1 = self.box
        full = torch.zeros(self.size, dtype=torch.bool, device=self.window.device)
        full[y0:y1, x0:x1] = self.window
        return full

    def to_dict(self) -> dict:
        """JSON-ready, without the mask."""
        return {"order": self.order, "box": list(self.box), "area": self.area, "score": round(self.score, 4)}


def _sort_key(order: str, box: tuple[int, int, int, int], area: int, size: tuple[int, int]) -> tuple:
    x0, y0, x1, y1 = box
    if order == "left":
        return x0, y0, -area
    if order == "top":
        return y0, x0, -area
    if order == "center":
        height, width = size
        return math.hypot((x0 + x1) / 2 - width / 2, (y0 + y1) / 2 - height / 2), x0, y0
    return -area, x0, y0


Region = tuple[int, tuple[int, int, int, int], int]  # label, box, area


def _regions(mask: Tensor, order: str, what: str) -> tuple[np.ndarray, list[Region]]:
    """The component labels of a bool ``[H, W]`` mask, labelled once, and its instances as (label, box,
    area) in ``order``, fragments left out."""
    if order not in ORDERS:
        raise LdznetError(f"unknown instance order {order!r}; expected one of {', '.join(ORDERS)}")
    _, labels, stats = components(mask, what)
    smallest = max(1, math.ceil(FRAGMENT_SHARE * mask.numel()))
    regions = [(label, (int(x), int(y), int(x + w), int(y + h)), int(area))
               for label, (x, y, w, h, area) in enumerate(stats[1:].tolist(), 1) if area >= smallest]
    size = tuple(mask.shape)
    return labels, sorted(regions, key=lambda r: _sort_key(order, r[1], r[2], size))


def find_instances(mask: Tensor, probability: Tensor | None = None, order: str = "left") -> list[Instance]:
    """The instances of a bool ``[H, W]`` mask in ``order`` (see the module docstring); ``probability``
    [H, W] gives their scores (1.0 without it). ``Instance.order`` is always the left-to-right place."""
    labels, regions = _regions(mask, order, "find_instances")
    size = tuple(mask.shape)
    left = {label: place for place, (label, _, _) in
            enumerate(sorted(regions, key=lambda r: _sort_key("left", r[1], r[2], size)), 1)}
    p = None if probability is None else probability.detach().float().cpu().numpy()
    out = []
    for label, box, area in regions:  # each costs its box, not the image
        x0, y0, x1, y1 = box
        window = labels[y0:y1, x0:x1] == label
        score = 1.0 if p is None else float(p[y0:y1, x0:x1][window].mean())
        out.append(Instance(box, area, score, left[label], torch.from_numpy(window).to(mask.device), size))
    return out


def instance_image(instance: Instance, feather_radius: float = 0.0) -> np.ndarray:
    """The instance's mask as uint8 [H, W], 255 = selected, with the whole mask's soft edge (blurred
    within its box widened by the blur's reach, where all of it lies)."""
    height, width = instance.size
    x0, y0, x1, y1 = instance.box
    reach = feather_reach(feather_radius)
    left, top, right, bottom = max(0, x0 - reach), max(0, y0 - reach), min(width, x1 + reach), min(height, y1 + reach)
    crop = torch.zeros((bottom - top, right - left), device=instance.window.device)
    crop[y0 - top:y1 - top, x0 - left:x1 - left] = instance.window.float()
    image = np.zeros((height, width), np.uint8)
    image[top:bottom, left:right] = (feather(crop, feather_radius).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return image


def select_instances(probability: Tensor, threshold: float, order: str, indices: tuple[int, ...]) -> Tensor:
    """``probability`` ``[..., H, W]`` kept only on the chosen instances of ``probability > threshold``
    (``indices`` 1-based in ``order``, negative from the end; missing ones select nothing), 0 elsewhere."""
    if probability.ndim > 2:  # one map at a time
        if not len(probability):
            return probability.clone()
        return torch.stack([select_instances(p, threshold, order, indices) for p in probability])
    labels, regions = _regions(probability > threshold, order, "an instance selector")
    positions = (index - 1 if index > 0 else len(regions) + index for index in indices)
    chosen = [regions[position][0] for position in positions if 0 <= position < len(regions)]
    keep = torch.from_numpy(np.isin(labels, chosen)).to(probability.device)
    return probability * keep
