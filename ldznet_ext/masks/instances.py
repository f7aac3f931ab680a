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
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from ..errors import LdznetError
from .ops import feather

__all__ = ["FRAGMENT_SHARE", "ORDERS", "Instance", "find_instances", "instance_image", "select_instances"]

FRAGMENT_SHARE = 0.0005  # 0.05 % of the image: at 512 x 512, regions under 132 px are fragments
ORDERS = ("left", "top", "center", "area")


@dataclass(frozen=True)
class Instance:
    """One object: ``box`` (x0, y0, x1, y1) in pixels, ends exclusive; ``area`` in pixels; ``score`` the
    mean probability over it; ``order`` its 1-based place left to right; ``mask`` bool [H, W]."""

    box: tuple[int, int, int, int]
    area: int
    score: float
    order: int
    mask: Tensor

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


def find_instances(mask: Tensor, probability: Tensor | None = None, order: str = "left") -> list[Instance]:
    """The instances of a bool ``[H, W]`` mask in ``order`` (see the module docstring); ``probability``
    [H, W] gives their scores (1.0 without it). ``Instance.order`` is always the left-to-right place."""
    if order not in ORDERS:
        raise LdznetError(f"unknown instance order {order!r}; expected one of {', '.join(ORDERS)}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
        raise LdznetError(f"find_instances expects a bool tensor [H, W], got {getattr(mask, 'shape', mask)!r}")
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.cpu().numpy().astype(np.uint8),
                                                               connectivity=8, ltype=cv2.CV_32S)
    smallest = max(1, math.ceil(FRAGMENT_SHARE * mask.numel()))
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area >= smallest:
            regions.append((label, (x, y, x + w, y + h), area))
    size = tuple(mask.shape)
    left = {label: place for place, (label, _, _) in
            enumerate(sorted(regions, key=lambda r: _sort_key("left", r[1], r[2], size)), 1)}
    p = None if probability is None else probability.detach().float().cpu().numpy()
    out = []
    for label, box, area in sorted(regions, key=lambda r: _sort_key(order, r[1], r[2], size)):
        region = labels == label
        score = 1.0 if p is None else float(p[region].mean())
        out.append(Instance(box, area, score, left[label], torch.from_numpy(region).to(mask.device)))
    return out


def instance_image(instance: Instance, feather_radius: float = 0.0) -> np.ndarray:
    """The instance's mask as uint8 [H, W], 255 = selected, with the whole mask's soft edge."""
    soft = feather(instance.mask.float(), feather_radius)
    return (soft.cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def select_instances(probability: Tensor, threshold: float, order: str, indices: tuple[int, ...]) -> Tensor:
    """``probability`` ``[..., H, W]`` kept only on the chosen instances of ``probability > threshold``
    (``indices`` 1-based in ``order``, negative from the end; missing ones select nothing), 0 elsewhere."""
    if probability.ndim > 2:
        return torch.stack([select_instances(p, threshold, order, indices) for p in probability])
    found = find_instances(probability > threshold, None, order)
    keep = torch.zeros(probability.shape, dtype=torch.bool, device=probability.device)
    for index in indices:
        position = index - 1 if index > 0 else len(found) + index
        if 0 <= position < len(found):
            keep |= found[position].mask
    return probability * keep
