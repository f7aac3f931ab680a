"""Mask operations on probability maps: disk dilation/erosion, feathering, connected components,
and the final threshold step (:class:`MaskOptions`, :func:`select_mask`).

Maps are float tensors ``[..., H, W]`` with values in [0, 1] on any device; sizes are in pixels of
the map, which is the output image. Component filtering runs on the CPU with OpenCV.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LdznetError
from ..limits import FEATHER, KEEP_LARGEST, MIN_AREA, THRESHOLD

__all__ = [
    "MaskOptions",
    "components",
    "dilate",
    "erode",
    "feather",
    "feather_reach",
    "keep_largest_components",
    "remove_small_regions",
    "select_mask",
]


def _check_radius(radius: float, what: str) -> float:
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not math.isfinite(radius) or radius < 0:
        raise LdznetError(f"{what} must be a finite number of pixels >= 0, got {radius!r}")
    return float(radius)


def _check_map(p: Tensor, what: str) -> None:
    if not isinstance(p, Tensor) or p.ndim < 2 or not p.is_floating_point():
        found = f"{p.dtype} tensor of shape {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
        raise LdznetError(f"{what} expects a floating-point tensor [..., H, W], got {found}")


def _half_widths(radius: float, max_dy: int) -> list[int]:
    """``w[dy]``: the largest integer w with w² + dy² <= radius², for dy = 0 .. min(floor(radius), max_dy)."""
    r2 = radius * radius
    widths = []
    for dy in range(min(math.floor(radius), max_dy) + 1):
        w = math.isqrt(int(r2 - dy * dy))  # int() floors the non-negative float: exact for integer r2
        while (w + 1) ** 2 + dy * dy <= r2:  # fractional radii: the float part may allow one more
            w += 1
        widths.append(w)
    return widths


def _widen(segment: Tensor, half_width: int) -> Tensor:
    """The horizontal max of half-width ``half_width`` from that of ``half_width - 1`` (``segment``),
    over the columns inside the map.

    Why one maximum per step from the second on: windows of half-width w - 1 centred one column left
    and right overlap and together cover the window of half-width w. At the map's edges the window is
    cut, so the edge column takes its one neighbour's window, which already holds every column inside.
    """
    if half_width == 1:  # a half-width-0 "window" is the pixel alone: the two neighbours do not cover it
        wider = segment.clone()
        torch.maximum(wider[..., 1:], segment[..., :-1], out=wider[..., 1:])
        torch.maximum(wider[..., :-1], segment[..., 1:], out=wider[..., :-1])
        return wider
    wider = torch.empty_like(segment)
    torch.maximum(segment[..., :-2], segment[..., 2:], out=wider[..., 1:-1])
    wider[..., 0] = segment[..., 1]
    wider[..., -1] = segment[..., -2]
    return wider


def _max_filter_disk(p: Tensor, radius: float) -> Tensor:
    """Grey-scale max over the disk of ``radius`` around each pixel, ignoring pixels outside the map.

    Why this decomposition: the disk is a stack of horizontal segments, one per row offset dy, of
    half-width w(dy). Walking w upwards costs one elementwise maximum per step (:func:`_widen`), and
    each row offset adds one more, over the rows that offset keeps inside the map. That is O(radius)
    map-sized operations: exact, any device, no kernel of radius² taps, nothing computed for pixels
    outside the map; faster than cv2.dilate with the same disk at large radii and as fast on a GPU
    (README, "Benchmarks"), so there is no separate OpenCV path. Offsets beyond the map's size see
    nothing, so the radius is cut to the map's extent.
    """
    height, width = p.shape[-2:]
    if p.numel() == 0:
        return p.clone()
    if radius * radius >= (height - 1) ** 2 + (width - 1) ** 2:  # the disk covers the whole map
        return p.amax(dim=(-2, -1), keepdim=True).expand_as(p).clone()
    widths = _half_widths(radius, height - 1)
    nx = min(widths[0], width - 1)
    if len(widths) == 1 and nx == 0:
        return p.clone()
    # rows[w] lists the row offsets whose segment half-width is w (capped at the map width).
    rows: dict[int, list[int]] = {}
    for dy, w in enumerate(widths):
        rows.setdefault(min(w, nx), []).extend([dy] if dy == 0 else [dy, -dy])
    out = torch.full_like(p, -math.inf)
    segment = p  # segment[..., y, x]: max of p over columns x - w .. x + w of row y, inside the map
    for w in range(nx + 1):
        if w > 0:
            segment = _widen(segment, w)
        for dy in rows.get(w, ()):
            # out[y] takes segment[y + dy] for the rows y where y + dy is inside the map.
            kept = out[..., max(0, -dy) : height - max(0, dy), :]
            torch.maximum(kept, segment[..., max(0, dy) : height + min(0, dy), :], out=kept)
    return out


def dilate(p: Tensor, radius: float) -> Tensor:
    """Grey-scale dilation ``[..., H, W] -> [..., H, W]``: max over a true disk of ``radius`` pixels.

    The disk holds the offsets with dx² + dy² <= radius², so fractional radii are meaningful
    (1.5 adds the diagonals to the radius-1 cross); radius < 1 is the identity. Values outside the
    map are ignored. Returns a new tensor with ``p``'s dtype and device.
    """
    _check_map(p, "dilate")
    return _max_filter_disk(p, _check_radius(radius, "dilation radius"))


def erode(p: Tensor, radius: float) -> Tensor:
    """Grey-scale erosion ``[..., H, W] -> [..., H, W]``: min over the disk of :func:`dilate`.

    Pixels outside the map are ignored, so a mask touching the image border is not eaten from it.
    """
    _check_map(p, "erode")
    return -_max_filter_disk(-p, _check_radius(radius, "erosion radius"))


def feather_reach(radius: float) -> int:
    """How far :func:`feather` of ``radius`` carries a pixel: its kernel's half-width (0 for no feather)."""
    radius = _check_radius(radius, "feather radius")
    return 0 if radius == 0 else max(1, math.ceil(3 * radius / 2))


def feather(mask: Tensor, radius: float) -> Tensor:
    """Soften edges ``[..., H, W] -> [..., H, W]`` with a Gaussian blur of sigma = radius / 2.

    ``radius`` is the visible half-width of the transition: a hard edge becomes a ramp that is
    within 2.3% of 0 and 1 at ``radius`` pixels on either side (±2 sigma). The kernel is cut at
    3 sigma and renormalised; borders are replicated so a mask filling the image stays 1 there.
    Radius 0 returns a copy.
    """
    _check_map(mask, "feather")
    radius = _check_radius(radius, "feather radius")
    if radius == 0:
        return mask.clone()
    sigma = radius / 2
    half = feather_reach(radius)
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=mask.device, dtype=mask.dtype)
    height, width = mask.shape[-2:]
    flat = mask.reshape(-1, 1, height, width)
    # Replicate padding is applied per axis so a kernel wider than the map still sees only the edge value.
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="replicate"), kernel.view(1, 1, -1, 1))
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return flat.reshape(mask.shape).clamp_(0, 1)


def components(mask: Tensor, what: str) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components of a bool ``[H, W]`` mask: (count incl. background, int32 labels [H, W],
    OpenCV's stats [count, 5]: x, y, width, height, area); LdznetError naming ``what`` for anything else."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
        found = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise LdznetError(f"{what} expects a bool tensor [H, W], got {found}")
    if mask.numel() == 0:  # OpenCV refuses an empty image; it has the background alone
        return 1, np.zeros(tuple(mask.shape), np.int32), np.zeros((1, 5), np.int32)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.cpu().numpy().astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    return count, labels, stats


def _select(mask: Tensor, labels: np.ndarray, keep: np.ndarray) -> Tensor:
    keep = np.concatenate([[False], keep])  # label 0 is the background
    return torch.from_numpy(keep[labels]).to(mask.device)


def keep_largest_components(mask: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest 8-connected foreground components of a bool ``[H, W]`` mask.

    Equal areas are ranked by the raster position (row, then column) of each component's first
    pixel. Returns a bool ``[H, W]`` tensor on ``mask``'s device.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise LdznetError(f"the number of components to keep must be an integer >= 1, got {k!r}")
    count, labels, stats = components(mask, "keep_largest_components")
    areas = stats[:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas[1:], kind="stable")
    if k < len(order) and areas[1 + order[k - 1]] == areas[1 + order[k]]:
        # OpenCV's block-based labelling does not number components in raster order, so a tie at
        # the cut is settled by each component's first pixel (np.unique: first index per label).
        _, first = np.unique(labels, return_index=True)
        order = np.lexsort((first[1:], -areas[1:]))
    keep = np.zeros(count - 1, dtype=bool)
    keep[order[:k]] = True
    return _select(mask, labels, keep)


def remove_small_regions(mask: Tensor, min_area: int) -> Tensor:
    """Drop 8-connected foreground components of fewer than ``min_area`` pixels from a bool ``[H, W]`` mask.

    Only islands are removed (holes are left as they are); ``min_area`` 0 or 1 keeps everything.
    Returns a bool ``[H, W]`` tensor on ``mask``'s device.
    """
    if isinstance(min_area, bool) or not isinstance(min_area, numbers.Integral) or min_area < 0:
        raise LdznetError(f"the minimum region area must be an integer number of pixels >= 0, got {min_area!r}")
    _, labels, stats = components(mask, "remove_small_regions")
    areas = stats[:, cv2.CC_STAT_AREA]
    return _select(mask, labels, areas[1:] >= min_area)


@dataclass(frozen=True)
class MaskOptions:
    """How a probability map becomes the final mask: :func:`select_mask`, then :func:`feather`.

    threshold: a pixel is foreground when p > threshold (strict, as in CLIPSeg's metric), in [0, 1)
        (so 1 would select nothing).
    invert: swap foreground and background after component filtering.
    keep_largest: keep only this many largest connected objects (None: all).
    min_area: drop objects smaller than this many pixels.
    feather: soft-edge radius in pixels (see :func:`feather`).
    presence: decide per term whether it is in the image and give the terms that are not an empty
        map (:mod:`.presence`); False combines every term's map as it is.
    The ranges of the numbers are ``limits.THRESHOLD``, ``KEEP_LARGEST``, ``MIN_AREA`` and ``FEATHER``.
    """

    threshold: float = 0.5
    invert: bool = False
    keep_largest: int | None = None
    min_area: int = 0
    feather: float = 0.0
    presence: bool = True

    def __post_init__(self) -> None:
        # stored as float / int: a Fraction or numpy number would reach torch as itself
        object.__setattr__(self, "threshold", THRESHOLD.bounded(self.threshold, "threshold"))
        if not isinstance(self.invert, bool):
            raise LdznetError(f"invert must be True or False, got {self.invert!r}")
        if not isinstance(self.presence, bool):
            raise LdznetError(f"presence must be True or False, got {self.presence!r}")
        if self.keep_largest is not None:
            object.__setattr__(self, "keep_largest", KEEP_LARGEST.bounded(self.keep_largest, "keep_largest"))
        object.__setattr__(self, "min_area", MIN_AREA.bounded(self.min_area, "min_area"))
        object.__setattr__(self, "feather", FEATHER.bounded(self.feather, "feather"))


def select_mask(probability: Tensor, options: MaskOptions = MaskOptions()) -> Tensor:
    """The bool ``[H, W]`` mask of a probability map ``[H, W]`` in [0, 1], before feathering.

    Order: threshold -> remove small regions -> keep the largest -> invert. Component filters need a
    binary mask, so they follow the threshold; small specks go first so they never count as objects.
    Inversion follows them so that "keep the largest object" means the object the expression
    describes, not the background around it. Feathering (:func:`feather`) comes after it all, because
    it makes the edges soft.
    """
    _check_map(probability, "select_mask")
    if probability.ndim != 2:
        raise LdznetError(f"select_mask expects one map [H, W], got shape {tuple(probability.shape)}")
    mask = probability > options.threshold
    if options.min_area > 1:
        mask = remove_small_regions(mask, options.min_area)
    if options.keep_largest is not None:
        mask = keep_largest_components(mask, options.keep_largest)
    return ~mask if options.invert else mask
