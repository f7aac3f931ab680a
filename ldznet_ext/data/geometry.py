"""Region annotations to masks: polygons (two conventions) and COCO run-length encodings.

Two polygon conventions are in use and they differ on boundary pixels:

- ``polygon_mask`` (COCO, JSONL manifests; its ``even_odd_fill`` also draws the micro world's
  objects): coordinates are continuous, pixel (row r, column c) covers the unit square
  [c, c + 1) x [r, r + 1) and is inside when its centre (c + 0.5, r + 0.5) is inside the polygon
  by the even-odd rule (a centre exactly on a left edge counts as inside, on a right edge as
  outside), so the rectangle (1, 1)-(5, 4) covers 4 x 3 = 12 pixels. Without pycocotools this is
  how COCO polygons are rasterised; pycocotools' own rasteriser (used when it is installed) can
  differ by a pixel along the boundary.
- ``phrasecut_mask`` (PhraseCut): the dataset's own evaluator truncates the coordinates to
  integers and draws each polygon filled *and* outlined with Pillow, so the square (2, 2)-(5, 5)
  covers 4 x 4 = 16 pixels.

COCO RLE: ``{"size": [h, w], "counts": [...] or "string"}``; runs alternate background and
foreground starting with background, over the pixels in column-major order. Compressed counts
are a string: each count in 5-bit groups, least significant first, as characters 48 + group,
0x20 marking "more groups follow", the last group's 0x10 bit the sign; counts from the fourth on
are stored as the difference to the count two places before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import LdznetError

# Far beyond any image side, and small enough that the rasterisers' products of coordinate
# differences stay finite (1e308 made the crossing NaN, an index of -2^63) and Pillow's ints fit.
MAX_COORDINATE = 2.0**31
# Row-edge pairs one block of ``even_odd_fill``'s rows compares at once: its bool arrays' bytes.
_CROSSINGS_PER_BLOCK = 1 << 22


def polygon_points(polygon: Sequence, what: str) -> np.ndarray:
    """A polygon as float64 [K, 2] (x, y): from [[x, y], ...] or a flat [x0, y0, x1, y1, ...];
    LdznetError naming ``what`` for anything else, or a coordinate beyond +-``MAX_COORDINATE``."""
    try:
        points = np.asarray(polygon, np.float64)
    except (TypeError, ValueError, OverflowError) as error:
        raise LdznetError(f"{what}: a polygon must be numbers, got {str(polygon)[:80]}") from error
    if points.ndim == 1 and len(points) % 2 == 0:
        points = points.reshape(-1, 2)
    if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
        raise LdznetError(f"{what}: expected a polygon as [[x, y], ...] or [x0, y0, x1, y1, ...], "
                          f"got {str(polygon)[:80]}")
    if len(points) and np.abs(points).max() > MAX_COORDINATE:
        raise LdznetError(f"{what}: a polygon coordinate is beyond +-{MAX_COORDINATE:.0f} px: {str(polygon)[:80]}")
    return points


def polygon_mask(polygons: Sequence[Sequence], height: int, width: int, what: str = "polygon") -> np.ndarray:
    """The union of ``polygons`` (each [[x, y], ...] or flat [x0, y0, ...], pixel units) as bool
    [height, width], by the COCO pixel-centre convention of the module docstring."""
    mask = np.zeros((height, width), bool)
    for polygon in polygons:
        mask |= even_odd_fill(polygon_points(polygon, what), height, width)
    return mask


def even_odd_fill(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Which pixels of a ``height x width`` grid have their centre (c + 0.5, r + 0.5) inside the
    polygon ``points`` (float [K, 2], x and y in pixels) by the even-odd rule, as bool: a centre
    exactly on a left edge is inside, on a right edge outside (the module docstring's convention).
    The one polygon rasteriser: COCO polygons and manifests here, the micro world's objects."""
    inside = np.zeros((height, width), bool)
    if len(points) < 3:
        return inside
    a = points
    b = np.roll(points, -1, axis=0)
    # Only the rows the polygon spans: a small polygon on a large image costs its own size.
    first_row = max(0, int(np.ceil(a[:, 1].min() - 0.5)))
    end_row = min(height, int(np.ceil(a[:, 1].max() - 0.5)))
    if first_row >= end_row:
        return inside
    # Rows in blocks, so that a polygon of many vertices on a tall image needs bounded memory.
    block = max(1, _CROSSINGS_PER_BLOCK // len(points))
    for top in range(first_row, end_row, block):
        bottom = min(top + block, end_row)
        inside[top:bottom] = _fill_rows(a, b, top, bottom, width)
    return inside


def _fill_rows(a: np.ndarray, b: np.ndarray, top: int, bottom: int, width: int) -> np.ndarray:
    """``even_odd_fill``'s rows top..bottom - 1 for the edges a[k] -> b[k]."""
    centres = np.arange(top, bottom) + 0.5
    # Scanline through each row's centre: edges crossing it (half-open in y, so a vertex on the
    # line counts once) toggle inside/outside for every centre right of (or on) the crossing.
    crosses = (a[None, :, 1] <= centres[:, None]) != (b[None, :, 1] <= centres[:, None])
    row, edge = np.nonzero(crosses)
    t = (centres[row] - a[edge, 1]) / (b[edge, 1] - a[edge, 1])
    x = a[edge, 0] + t * (b[edge, 0] - a[edge, 0])
    start = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
    rows = bottom - top
    toggles = np.bincount(row * (width + 1) + start, minlength=rows * (width + 1)).astype(np.uint8)
    parity = np.cumsum(toggles.reshape(rows, width + 1)[:, :width], axis=1, dtype=np.uint8) & 1  # survives wrap-around
    return parity.view(bool)


def phrasecut_mask(polygons: Sequence[Sequence], height: int, width: int, what: str = "polygon") -> np.ndarray:
    """The union of PhraseCut ``polygons`` ([[x, y], ...]) as bool [height, width], drawn as the
    dataset's evaluator draws them (integer-truncated vertices, filled and outlined)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = polygon_points(polygon, what)
        if len(points) < 2:
            continue
        draw.polygon([(int(x), int(y)) for x, y in points], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def decode_counts(text: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (module docstring)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")  # a non-ASCII byte is then refused as a character
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise LdznetError(f"RLE string ends inside a count: {text[:60]!r}")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise LdznetError(f"RLE string has a character outside '0'..'o': {text[position]!r}")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(rle: dict, what: str = "RLE", shape: tuple[int, int] | None = None) -> np.ndarray:
    """A COCO RLE ``{"size": [h, w], "counts": list or string}`` as bool [h, w]; with ``shape`` (its
    image's [h, w]) an RLE of another size is refused before anything is decoded, so that a size of
    100000 x 100000 in an annotation costs nothing."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as error:
        raise LdznetError(f"{what}: expected {{'size': [h, w], 'counts': ...}}, got {str(rle)[:80]}") from error
    if shape is not None and (height, width) != tuple(shape):
        raise LdznetError(f"{what}: RLE of {width}x{height} on a {shape[1]}x{shape[0]} image")
    runs = decode_counts(counts) if isinstance(counts, (str, bytes)) else counts
    if not isinstance(runs, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in runs):
        raise LdznetError(f"{what}: RLE counts must be a list of integers or a string, got {str(counts)[:80]}")
    if min(runs, default=0) < 0 or sum(runs) != height * width:  # Python ints: no overflow on huge counts
        raise LdznetError(f"{what}: the runs cover {sum(runs)} pixels, the mask has {height}x{width}"
                          + (" (negative run)" if min(runs, default=0) < 0 else ""))
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(width, height).T.copy()
