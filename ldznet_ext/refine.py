"""Image-guided upsampling of probability maps: masks that follow the image's own edges.

A term's probability comes at the working resolution (or the latent's, zero-shot) and is blurry
around objects; bilinear upsampling keeps that blur, so a 1024 px mask inherits a 48 x 48
decision. Here the upsampling is guided by the full-resolution image with a colour guided filter
(He, Sun and Tang, "Guided Image Filtering"; the fast variant of He and Sun, 2015): on a grid a
few times coarser than the output, each window fits the probability as an affine function of the
pixel colour, q = a . I + b; the smoothed coefficients are then applied to the full-resolution
colours, so q changes where the image changes, and sharply. Three guards keep it a refinement:

- it acts only near the coarse boundary: the weight is the local range (max - min) of the coarse
  probability within the radius, so flat regions (surely in, surely out, or a uniform doubt) keep
  the bilinear value and a mask can never jump onto another object beyond the radius;
- it acts only where the image has structure: the weight is scaled by var(I) / (var(I) + eps), so
  a flat image region leaves the bilinear map exactly unchanged;
- ``strength`` blends between bilinear (0) and the guided result (1).

The full-resolution pass runs in bands of rows, so memory beyond the output itself stays bounded
(an 8192 x 8192 output never holds a full-size float copy of the image); the grid-level work is
small. Everything is torch on the probability's device; the guide stays uint8 in host memory and
each band is moved to that device on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import LdznetError
from .limits import REFINE_EPS, REFINE_RADIUS, REFINE_STRENGTH

__all__ = ["RefineSettings", "refine_probability", "upsample_rows"]

RADIUS_PER_SCALE = 2.0  # automatic radius: this many coarse pixels, in output pixels
MIN_RADIUS = 4.0  # output pixels
GRID_RADIUS = 4  # the guided filter's window radius on its grid; sets the grid step radius / 4
FULL_RANGE = 0.5  # a local probability range this large gets the full refinement weight
BAND_PIXELS = 1 << 21  # output pixels per band of rows in the full-resolution pass, all maps together


@dataclass(frozen=True)
class RefineSettings:
    """Image-guided refinement of each term's map on its way to the output size.

    enabled: False keeps plain bilinear upsampling (the behaviour before refinement existed).
    strength: blend in [0, 1] between bilinear (0) and fully guided (1).
    radius: how far, in output pixels (``limits.REFINE_RADIUS``), an edge may move and how wide the
        filter window is; None = automatic, ``RADIUS_PER_SCALE`` coarse pixels (at least ``MIN_RADIUS``).
    eps: the guided filter's regulariser, in squared colour units of a [0, 1] image: image edges
        weaker than about sqrt(eps) are treated as flat.
    """

    enabled: bool = True
    strength: float = 1.0
    radius: float | None = None
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise LdznetError(f"refine enabled must be True or False, got {self.enabled!r}")
        # stored as float: a Fraction or numpy number would reach torch as itself
        object.__setattr__(self, "strength", REFINE_STRENGTH.bounded(self.strength, "refine strength"))
        if self.radius is not None:
            object.__setattr__(self, "radius", REFINE_RADIUS.bounded(self.radius, "refine radius"))
        object.__setattr__(self, "eps", REFINE_EPS.bounded(self.eps, "refine eps"))

    @property
    def active(self) -> bool:
        """Whether refinement changes anything (on, with a strength above 0)."""
        return self.enabled and self.strength > 0


def _row_taps(start: int, stop: int, size_in: int, size_out: int, device: torch.device
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps (i0, i1, weight of i1) of output rows [start, stop) when ``size_in`` rows
    become ``size_out``, as ``F.interpolate(mode="bilinear", align_corners=False)`` computes them."""
    out = torch.arange(start, stop, device=device, dtype=torch.float64)
    src = ((out + 0.5) * (size_in / size_out) - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=size_in - 1)
    i1 = (i0 + 1).clamp_(max=size_in - 1)
    return i0, i1, (src - i0).float()


def upsample_rows(x: Tensor, size: tuple[int, int], rows: tuple[int, int]) -> Tensor:
    """Rows [start, stop) of the bilinear resize of ``x`` [N, C, h, w] to ``size`` = (H, W):
    [N, C, stop - start, W], equal to ``F.interpolate(x, size, mode="bilinear")[..., start:stop, :]``.
    Rows are gathered by hand (whole rows: cheap); columns by F.interpolate, whose row taps are the
    identity when the row count stays (one channel at a time: its single-channel kernel is many
    times faster on the CPU than its multi-channel one)."""
    (height, width), (h, w) = size, x.shape[-2:]
    i0, i1, weight = _row_taps(rows[0], rows[1], h, height, x.device)
    x = torch.lerp(x.index_select(2, i0), x.index_select(2, i1), weight.view(-1, 1).to(x.dtype))
    if w == width:
        return x
    lead, count = x.shape[:-2], rows[1] - rows[0]
    x = F.interpolate(x.reshape(-1, 1, count, w), size=(count, width), mode="bilinear", align_corners=False)
    return x.reshape(*lead, count, width)


def _box(x: Tensor, radius: int) -> Tensor:
    """Mean over the (2r+1)^2 window of each pixel of [N, C, h, w], counting only pixels inside."""
    k = 2 * radius + 1
    x = F.avg_pool2d(x, (k, 1), stride=1, padding=(radius, 0), count_include_pad=False)
    return F.avg_pool2d(x, (1, k), stride=1, padding=(0, radius), count_include_pad=False)


def _grid_shape(size: tuple[int, int], radius: float) -> tuple[tuple[int, int], int]:
    """The grid (gh, gw) of the filter and its window radius in grid pixels."""
    step = max(1.0, radius / GRID_RADIUS)
    grid = (max(1, round(size[0] / step)), max(1, round(size[1] / step)))
    return grid, max(1, round(radius * grid[0] / size[0]))


def _coefficients(p: Tensor, guide: Tensor, radius: int, eps: float) -> tuple[Tensor, Tensor]:
    """Guided-filter coefficients on the grid: (a [T, 3, gh, gw], b [T, 1, gh, gw]) with
    box-smoothed a, b such that q = a . I + b, for maps ``p`` [T, 1, gh, gw] and guide [1, 3, gh, gw]."""
    mean_i = _box(guide, radius)
    mean_p = _box(p, radius)
    products = torch.cat([guide[:, i:i + 1] * guide[:, j:j + 1] for i in range(3) for j in range(i, 3)], dim=1)
    second = _box(products, radius)  # E[I_i I_j], i <= j: 00 01 02 11 12 22
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    sigma = torch.empty(*guide.shape[-2:], 3, 3, device=guide.device, dtype=guide.dtype)
    for k, (i, j) in enumerate(pairs):
        value = second[0, k] - mean_i[0, i] * mean_i[0, j] + (eps if i == j else 0.0)
        sigma[..., i, j] = value
        sigma[..., j, i] = value
    cov = _box(guide * p, radius) - mean_i * mean_p  # [T, 3, gh, gw]
    a = torch.linalg.solve(sigma, cov.permute(2, 3, 1, 0))  # [gh, gw, 3, T]
    a = a.permute(3, 2, 0, 1).contiguous()
    b = mean_p - (a * mean_i).sum(dim=1, keepdim=True)
    return _box(a, radius), _box(b, radius)


def _weight(p: Tensor, guide: Tensor, radius: int, eps: float, strength: float) -> Tensor:
    """Refinement weight [T, 1, gh, gw] in [0, strength]: large near a coarse boundary where the
    image has structure, exactly 0 where either the map or the image is flat."""
    k = 2 * radius + 1
    spread = F.max_pool2d(p, k, 1, radius) + F.max_pool2d(-p, k, 1, radius)
    near_boundary = (spread / FULL_RANGE).clamp_(max=1.0)
    variance = (_box(guide * guide, radius) - _box(guide, radius) ** 2).clamp_(min=0).mean(dim=1, keepdim=True)
    structure = variance / (variance + eps)
    return near_boundary * structure * strength


def _guide_grid(image: np.ndarray, grid: tuple[int, int], device: torch.device) -> Tensor:
    if image.shape[:2] != grid:
        image = cv2.resize(image, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float() / 255.0


def refine_probability(probability: Tensor, image: np.ndarray, settings: RefineSettings = RefineSettings(),
                       decided_at: tuple[int, int] | None = None) -> Tensor:
    """Upsample maps [..., h, w] in [0, 1] to the size of ``image`` (uint8 [H, W, 3]) guided by it.

    ``decided_at``: the (h', w') grid on which the maps were decided (the latent's for an LD-ZNet
    head, whose [8h', 8w'] output is smooth at that scale); it sets the automatic radius. None: the
    maps' own size.

    Returns float32 [..., H, W] in [0, 1] on the probability's device. With ``settings`` inactive
    this is plain bilinear upsampling (align_corners=False), as :func:`images.resize_probability`.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        found = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise LdznetError(f"refinement needs the image as a uint8 [H, W, 3] array, got {found}")
    size = image.shape[:2]
    lead, (h, w) = probability.shape[:-2], probability.shape[-2:]
    maps = probability.reshape(-1, 1, h, w).float()
    out = torch.empty(maps.shape[0], 1, *size, device=maps.device)
    coefficients = None
    if settings.active:
        coarse_h, coarse_w = decided_at or (h, w)
        scale = max(size[0] / coarse_h, size[1] / coarse_w)
        radius = settings.radius or max(MIN_RADIUS, RADIUS_PER_SCALE * scale)
        grid, grid_radius = _grid_shape(size, radius)
        guide = _guide_grid(image, grid, maps.device)
        # Colours relative to one pixel's: a flat image is then exactly 0, so no rounding noise
        # in its variance can switch the refinement on.
        origin = guide[..., :1, :1].clone()
        guide -= origin
        p_grid = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False) if grid != (h, w) else maps
        weight = _weight(p_grid, guide, grid_radius, settings.eps, settings.strength)
        a, b = _coefficients(p_grid, guide, grid_radius, settings.eps)
        # Folded so that q = a . I + b takes the band's raw 0..255 colours: no full-size arithmetic.
        coefficients = (a / 255.0, b - (a * origin).sum(dim=1, keepdim=True), weight)
    rows = max(1, BAND_PIXELS // (size[1] * maps.shape[0]))  # every map's band at once: bounded in all
    for start in range(0, size[0], rows):
        band = (start, min(size[0], start + rows))
        coarse = upsample_rows(maps, size, band)
        if coefficients is None:
            out[..., band[0]:band[1], :] = coarse
            continue
        weight = upsample_rows(coefficients[2], size, band)
        if not bool((weight > 0).any()):  # no coarse boundary near these rows
            out[..., band[0]:band[1], :] = coarse
            continue
        a, b = (upsample_rows(c, size, band) for c in coefficients[:2])
        pixels = torch.from_numpy(image[band[0]:band[1]]).to(maps.device).permute(2, 0, 1).float()
        guided = b[:, 0]
        for channel in range(3):  # a . I without a [T, 3, rows, W] temporary
            guided = guided.addcmul(a[:, channel], pixels[channel])
        out[..., band[0]:band[1], :] = torch.lerp(coarse, guided.clamp_(0.0, 1.0)[:, None], weight)
    return out.reshape(*lead, *size).clamp_(0.0, 1.0)
