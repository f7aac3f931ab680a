"""Paint a ``SceneSpec`` as an RGB image in its domain.

"cartoon": flat colours, dark outlines drawn inside each object's edge. "photo": textured
stuff (sky gradient with clouds, grass streaks, water ripples, sand grain), shaded
objects with a soft drop shadow and a slight colour tint, sensor noise. Edges are
anti-aliased; the footprint of every object and region is exactly that of
``spec.label_map`` (outlines stay inside, shadows only darken what lies below).
Texture noise is seeded by ``(spec.seed, size)``: the same spec and size give the same image.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .spec import (OBJECT_RGB, STUFF_RGB, SUBPIXEL_BITS, ObjectSpec, SceneSpec, pixel_box, pixel_points,
                   polygon_mask)

OUTLINE_SHADE = 0.3  # outlines are the object's colour darkened to this fraction
OUTLINE_WIDTH = 0.0125  # visible outline width of objects >= 0.2 side, fraction of the image side
SHADOW_STRENGTH = 0.42  # fraction of light a shadow removes
NOISE_TABLE = 640  # side of the shared white-noise table; renders up to 320 px cut windows from it
AA_SAMPLES = 4  # object edges: coverage of 4 x 4 sub-pixel samples


def paint(spec: SceneSpec, size: int) -> np.ndarray:
    """RGB image of ``spec`` at ``size x size``, uint8 [S, S, 3] in [0, 255]."""
    rng = np.random.default_rng([spec.seed, size])
    photo = spec.domain == "photo"
    layer = _photo_stuff if photo else _flat_stuff
    image = layer(spec, spec.ground, size, rng)
    for region in spec.regions:
        alpha = np.clip(region.distance(size) + 0.5, 0.0, 1.0)[..., None]
        image += alpha * (layer(spec, region.stuff, size, rng) - image)
    light = np.array([np.cos(spec.light), np.sin(spec.light)], dtype=np.float32)
    for obj in spec.objects:
        _draw_object(image, obj, size, light if photo else None, rng)
    if photo:
        image += 3.0 * np.stack([_white_noise(rng, size, size) for _ in range(3)], axis=-1)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _flat_stuff(spec: SceneSpec, stuff: str, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.broadcast_to(np.array(STUFF_RGB[stuff], dtype=np.float32), (size, size, 3)).copy()


@lru_cache(maxsize=1)
def _noise_table() -> np.ndarray:
    # Drawing fresh normals costs more than the rest of a 128 px render, so small renders
    # cut windows out of one fixed table instead; the table's seed is part of the format.
    table = np.random.default_rng(20230917).standard_normal((NOISE_TABLE, NOISE_TABLE), dtype=np.float32)
    table.setflags(write=False)
    return table


def _white_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Standard normal noise, float32 [h, w]; a read-only window of the table when it fits."""
    if 2 * max(h, w) > NOISE_TABLE:
        return rng.standard_normal((h, w), dtype=np.float32)
    y, x = rng.integers(0, NOISE_TABLE - max(h, w), 2)
    return _noise_table()[y:y + h, x:x + w]


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Zero-mean noise varying over ``1 / cells`` of the image, float32 [S, S], std about 0.6."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _photo_stuff(spec: SceneSpec, stuff: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(STUFF_RGB[stuff], dtype=np.float32)
    y = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None, None]
    low = _smooth_noise(rng, 6, size)[..., None]
    if stuff == "sky":
        # Deeper blue at the top, hazy toward the horizon, soft clouds.
        horizon = max(r.curve.base for r in spec.regions if r.stuff == "sky")
        t = np.clip(y / max(horizon, 0.1), 0.0, 1.0)
        colour = base * (0.82 + 0.22 * t) + np.array((-18, -10, 0), dtype=np.float32) * (1 - t)
        cloud = np.clip(_smooth_noise(rng, 4, size)[..., None] - 0.45, 0.0, 0.45)
        return colour + cloud * (255.0 - colour)
    fine = _white_noise(rng, size, size)
    k = max(3, size // 40) | 1
    if stuff == "grass":
        blades = cv2.GaussianBlur(fine, (1, k), 0)[..., None]  # vertical streaks
        return base * (1.0 + 0.10 * low + 0.16 * blades)
    if stuff == "water":
        streaks = cv2.GaussianBlur(fine, (2 * k + 1, 1), 0)[..., None]  # horizontal glints
        ripples = np.sin(2 * np.pi * y / 0.035 + 2.0 * low)
        return base * (1.0 + 0.08 * low + 0.06 * ripples + 0.18 * streaks)
    return base * (1.0 + 0.06 * low + 0.07 * fine[..., None])  # sand grain


def _draw_object(image: np.ndarray, obj: ObjectSpec, size: int, light: np.ndarray | None,
                 rng: np.random.Generator) -> None:
    """Composite one object onto ``image`` (float32 [S, S, 3]) in place; ``light`` None = cartoon."""
    one = 1 << SUBPIXEL_BITS
    polygon = obj.polygon()
    radius = obj.size * size / 2
    pad = 2
    if light is not None:
        shadow_shift = -light * (0.012 + 0.08 * obj.size) * size
        blur = 0.01 * size + 0.03 * obj.size * size
        pad += int(np.abs(shadow_shift).max() + 3 * blur)
    x0, y0, x1, y1 = pixel_box(polygon, size, pad)
    if x0 >= x1 or y0 >= y1:
        return
    crop = image[y0:y1, x0:x1]
    local = pixel_points(polygon, size) - np.array([x0, y0], dtype=np.int32) * one
    cover = np.zeros((*crop.shape[:2], 1), dtype=np.float32)
    bx0, by0, bx1, by1 = inner = pixel_box(polygon, size)
    if bx0 < bx1 and by0 < by1:
        cover[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0, 0] = polygon_mask(polygon, size, inner, samples=AA_SAMPLES)
    rgb = np.array(OBJECT_RGB[obj.colour], dtype=np.float32)
    if light is None:
        line = np.zeros(crop.shape[:2], dtype=np.uint8)
        # Thinner on small objects so that their colour still shows; the line is centred on
        # the edge and only its inner half is drawn.
        width = max(2, round(2 * OUTLINE_WIDTH * size * min(1.0, obj.size / 0.2)))
        cv2.polylines(line, [local], True, 255, thickness=width, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)
        ink = line.astype(np.float32)[..., None] / 255.0
        colour = rgb + ink * (OUTLINE_SHADE * rgb - rgb)
    else:
        shadow = np.zeros(crop.shape[:2], dtype=np.uint8)
        shifted = local + np.round(shadow_shift * one).astype(np.int32)
        cv2.fillPoly(shadow, [shifted], 255, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)
        shade = cv2.GaussianBlur(shadow.astype(np.float32) / 255.0, (0, 0), blur)[..., None]
        crop *= 1.0 - SHADOW_STRENGTH * shade
        # Lambert-like gradient: brighter toward the light, darker at the rim.
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx = (xx + 0.5 - obj.centre[0] * size) / radius
        dy = (yy + 0.5 - obj.centre[1] * size) / radius
        facing = np.clip(dx * light[0] + dy * light[1], -1.5, 1.5)
        shading = (1.0 + 0.22 * facing - 0.10 * np.minimum(dx * dx + dy * dy, 1.5))[..., None]
        grain = 1.0 + 0.03 * _white_noise(rng, *crop.shape[:2])[..., None]
        colour = rgb * (1.0 + 0.07 * np.asarray(obj.tint, dtype=np.float32)) * shading * grain
    crop += cover * (colour - crop)
