"""The micro world's vocabulary and its resolution-free scene description.

Coordinates are normalised: ``(x, y)`` in ``[0, 1]``, origin top-left, ``y`` down, one unit
per image side (scenes are square). A pixel ``(row i, column j)`` of an ``S x S`` render
has its centre at ``((j + 0.5) / S, (i + 0.5) / S)``; every raster (masks, labels) is
derived from that rule, so geometry is the same at any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np

from ..data.geometry import even_odd_fill


@dataclass(frozen=True)
class Vocabulary:
    """Every word the world uses; ``phrase_forms`` are format strings of the three phrase kinds."""

    shapes: tuple[str, ...]
    plurals: tuple[str, ...]  # aligned with ``shapes``
    colours: tuple[str, ...]
    stuff: tuple[str, ...]
    domains: tuple[str, ...]
    phrase_forms: tuple[tuple[str, str], ...]
    caption_words: tuple[str, ...]  # the fixed non-vocabulary words of caption templates

    def plural(self, shape: str) -> str:
        """Plural of a shape name: ``'cross' -> 'crosses'``."""
        return self.plurals[self.shapes.index(shape)]

    def phrases(self) -> tuple[str, ...]:
        """All phrases a scene can ask for: attribute, then class, then stuff phrases."""
        attribute = tuple(f"{c} {s}" for s in self.shapes for c in self.colours)
        return attribute + self.plurals + self.stuff

    def phrase_words(self) -> tuple[str, ...]:
        """Sorted set of the words phrases are made of (colours, shapes, plurals, stuff): what a model
        trained on this world can be asked to find."""
        return tuple(sorted({*self.colours, *self.shapes, *self.plurals, *self.stuff}))

    def words(self) -> tuple[str, ...]:
        """Sorted set of every word that can occur in a caption or a phrase."""
        words = {*self.shapes, *self.plurals, *self.colours, *self.stuff, *self.domains}
        return tuple(sorted(words | set(self.caption_words)))


VOCABULARY = Vocabulary(
    shapes=("circle", "square", "triangle", "star", "heart", "cross"),
    plurals=("circles", "squares", "triangles", "stars", "hearts", "crosses"),
    colours=("red", "orange", "yellow", "green", "blue", "purple"),
    stuff=("sky", "grass", "water", "sand"),
    domains=("cartoon", "photo"),
    phrase_forms=(("attribute", "{colour} {shape}"), ("class", "{plural}"), ("stuff", "{stuff}")),
    caption_words=("a", "an", "of", "and", "on", "by", "the", "under", "two", "three", "four", "five"),
)

# Object colours are saturated and stuff colours pale or muted, so that e.g. a green
# heart stays distinct from grass and a blue square from sky and water.
OBJECT_RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 36),
    "orange": (247, 134, 16),
    "yellow": (250, 214, 24),
    "green": (22, 140, 52),
    "blue": (36, 70, 210),
    "purple": (138, 52, 188),
}
STUFF_RGB: dict[str, tuple[int, int, int]] = {
    "sky": (170, 212, 245),
    "grass": (132, 192, 98),
    "water": (64, 150, 182),
    "sand": (232, 212, 164),
}

STUFF_LABEL = {name: i for i, name in enumerate(VOCABULARY.stuff)}
OBJECT_LABEL0 = len(VOCABULARY.stuff)  # label of spec.objects[k] is OBJECT_LABEL0 + k

# Largest rotation (degrees) that keeps a shape recognisable, or its symmetry period / 2.
MAX_ROTATION = {"circle": 0.0, "square": 45.0, "triangle": 60.0, "star": 36.0, "heart": 25.0, "cross": 45.0}


@dataclass(frozen=True)
class Curve:
    """Wavy line ``v(t) = base + sum_k amps[k] * sin(2 pi freqs[k] t + phases[k])``, all normalised."""

    base: float
    amps: tuple[float, ...] = ()
    freqs: tuple[float, ...] = ()
    phases: tuple[float, ...] = ()

    def __call__(self, t: np.ndarray) -> np.ndarray:
        """Values at positions ``t`` (any shape, normalised); same shape, float64."""
        v = np.full(np.shape(t), self.base, dtype=np.float64)
        for a, f, p in zip(self.amps, self.freqs, self.phases):
            v += a * np.sin(2 * np.pi * f * np.asarray(t) + p)
        return v


@dataclass(frozen=True)
class Region:
    """A stuff region bounded by a curve: ``axis='y'`` means the boundary is ``y = curve(x)``,
    ``axis='x'`` means ``x = curve(y)``; the region is where ``side * (coord - curve) > 0``
    (``side = -1``: above / left of the curve, ``+1``: below / right)."""

    stuff: str
    curve: Curve
    axis: str
    side: int

    def distance(self, size: int) -> np.ndarray:
        """Signed distance in pixels to the boundary along ``axis`` (> 0 inside), float32 [S, S]."""
        t = (np.arange(size) + 0.5) / size
        edge = self.curve(t) * size  # boundary position in pixels, one per row or column
        coord = np.arange(size) + 0.5
        if self.axis == "y":
            d = coord[:, None] - edge[None, :]
        else:
            d = coord[None, :] - edge[:, None]
        return (self.side * d).astype(np.float32)


@dataclass(frozen=True)
class ObjectSpec:
    """One object: ``centre`` normalised (may lie near or past the border), ``size`` is the
    larger side of the unrotated shape's bounding box as a fraction of the image side (0.08..0.45),
    ``rotation`` in degrees, ``tint`` a colour jitter in [-1, 1] per RGB channel (photo only)."""

    shape: str
    colour: str
    centre: tuple[float, float]
    size: float
    rotation: float
    tint: tuple[float, float, float]

    def polygon(self) -> np.ndarray:
        """Outline in normalised coordinates, float64 [N, 2] as (x, y)."""
        theta = np.deg2rad(self.rotation)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        return unit_polygon(self.shape) @ rot.T * (self.size / 2) + np.asarray(self.centre)

    def area(self) -> float:
        """Area of the whole shape (ignoring the border and occlusion), normalised units^2."""
        return float(unit_area(self.shape)) * (self.size / 2) ** 2


@dataclass(frozen=True)
class SceneSpec:
    """A whole scene, independent of resolution. ``ground`` fills the image, ``regions`` are
    painted over it in order (water, then sky), ``objects`` over both, bottom first.
    ``absent`` are phrases of things not in the scene (their masks are empty); ``light`` is
    the direction light comes from (radians, image coordinates); ``seed`` also seeds texture."""

    seed: int
    domain: str
    ground: str
    regions: tuple[Region, ...]
    objects: tuple[ObjectSpec, ...]
    absent: tuple[str, ...]
    light: float

    def stuff_present(self) -> tuple[str, ...]:
        """Stuff classes of the layout, in ``VOCABULARY.stuff`` order."""
        names = {self.ground, *(r.stuff for r in self.regions)}
        return tuple(s for s in VOCABULARY.stuff if s in names)


def _unit_star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _unit_heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _unit_cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                     (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=np.float64)


@cache
def _unit_polygon(shape: str) -> np.ndarray:
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "square":
        pts = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)
    elif shape == "triangle":
        pts = np.array([(0, -1), (1, 1), (-1, 1)], dtype=np.float64)
    elif shape == "star":
        pts = _unit_star()
    elif shape == "heart":
        pts = _unit_heart()
    elif shape == "cross":
        pts = _unit_cross()
    else:
        raise KeyError(shape)
    # Centre the bounding box and scale its larger side to 2, so that ``size`` is the extent.
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pts = (pts - (lo + hi) / 2) * (2 / (hi - lo).max())
    pts.setflags(write=False)
    return pts


def unit_polygon(shape: str) -> np.ndarray:
    """Shape outline with its bounding box centred at 0 and larger side 2, float64 [N, 2], read-only."""
    return _unit_polygon(shape)


@cache
def unit_area(shape: str) -> float:
    """Area enclosed by ``unit_polygon(shape)`` (shoelace formula)."""
    x, y = unit_polygon(shape).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


SUBPIXEL_BITS = 4  # cv2 fixed-point vertices: 1/16 pixel (used for decorations only)


def pixel_points(polygon: np.ndarray, size: int) -> np.ndarray:
    """Normalised polygon -> cv2 fixed-point vertices at render ``size``, int32 [N, 2].

    cv2 puts integer coordinates on pixel centres, hence the half-pixel shift. cv2's fill
    rounds vertices to whole pixels and includes the boundary, so masks use ``polygon_mask``."""
    return np.round((polygon * size - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)


def pixel_box(polygon: np.ndarray, size: int, pad: int = 0) -> tuple[int, int, int, int]:
    """Pixel window ``(x0, y0, x1, y1)`` (end exclusive) holding ``polygon`` plus ``pad`` pixels,
    clipped to the ``S x S`` image; empty (x0 >= x1 or y0 >= y1) when the polygon is outside."""
    lo = np.floor(polygon.min(axis=0) * size).astype(int) - pad
    hi = np.ceil(polygon.max(axis=0) * size).astype(int) + pad
    return max(lo[0], 0), max(lo[1], 0), min(hi[0], size), min(hi[1], size)


def polygon_mask(polygon: np.ndarray, size: int, box: tuple[int, int, int, int], samples: int = 1) -> np.ndarray:
    """Which pixels of window ``box`` of an ``S x S`` raster have their centre inside ``polygon``
    (normalised, even-odd rule): bool [y1 - y0, x1 - x0]. With ``samples = n > 1``, the fraction
    of the n x n sub-pixel centres inside instead: float32 coverage in [0, 1] (anti-aliasing)."""
    x0, y0, x1, y1 = box
    n = samples
    h, w = (y1 - y0) * n, (x1 - x0) * n
    inside = even_odd_fill(polygon * (size * n) - np.array([x0 * n, y0 * n]), h, w)
    if n == 1:
        return inside
    return cv2.resize(inside.astype(np.float32), (w // n, h // n), interpolation=cv2.INTER_AREA)


def stuff_label_map(spec: SceneSpec, size: int) -> np.ndarray:
    """``label_map`` without the objects: ``STUFF_LABEL`` of each pixel, uint8 [S, S]."""
    labels = np.full((size, size), STUFF_LABEL[spec.ground], dtype=np.uint8)
    for region in spec.regions:
        labels[region.distance(size) > 0] = STUFF_LABEL[region.stuff]
    return labels


def label_map(spec: SceneSpec, size: int, stuff: np.ndarray | None = None) -> np.ndarray:
    """Crisp label of the visible thing at each pixel, uint8 [S, S]: ``STUFF_LABEL[name]`` for
    stuff, ``OBJECT_LABEL0 + k`` for ``spec.objects[k]``; a pixel shows what covers its centre,
    so every pixel has exactly one label. ``stuff``: a ``stuff_label_map`` of spec to reuse."""
    labels = stuff_label_map(spec, size) if stuff is None else stuff.copy()
    for k, obj in enumerate(spec.objects):
        polygon = obj.polygon()
        x0, y0, x1, y1 = box = pixel_box(polygon, size)
        if x0 < x1 and y0 < y1:
            labels[y0:y1, x0:x1][polygon_mask(polygon, size, box)] = OBJECT_LABEL0 + k
    return labels
