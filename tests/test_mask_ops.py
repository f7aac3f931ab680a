"""Mask operations: exact disks, border handling, feathering, components, options and select_mask."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ldznet_ext.errors import LdznetError
from ldznet_ext.masks.ops import (
    MaskOptions,
    dilate,
    erode,
    feather,
    keep_largest_components,
    remove_small_regions,
    select_mask,
)

DISK_1 = [
    [0, 1, 0],
    [1, 1, 1],
    [0, 1, 0],
]
DISK_1_5 = [
    [1, 1, 1],
    [1, 1, 1],
    [1, 1, 1],
]
DISK_2 = [
    [0, 0, 1, 0, 0],
    [0, 1, 1, 1, 0],
    [1, 1, 1, 1, 1],
    [0, 1, 1, 1, 0],
    [0, 0, 1, 0, 0],
]
DISK_3 = [
    [0, 0, 0, 1, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 0],
    [0, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1],
    [0, 1, 1, 1, 1, 1, 0],
    [0, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 1, 0, 0, 0],
]


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def reference_dilate(p: torch.Tensor, radius: float) -> torch.Tensor:
    """Brute force over every offset of the disk, outside pixels ignored."""
    n = math.floor(radius)
    height, width = p.shape[-2:]
    padded = F.pad(p, (n, n, n, n), value=-math.inf)
    out = torch.full_like(p, -math.inf)
    for dy in range(-n, n + 1):
        for dx in range(-n, n + 1):
            if dx * dx + dy * dy <= radius * radius:
                out = torch.maximum(out, padded[..., n + dy : n + dy + height, n + dx : n + dx + width])
    return out


@pytest.mark.parametrize("radius, element", [(0, [[1]]), (0.99, [[1]]), (1, DISK_1), (1.2, DISK_1), (1.5, DISK_1_5),
                                             (2, DISK_2), (3, DISK_3)])
def test_dilating_a_single_pixel_draws_the_true_circle(radius, element):
    p = torch.zeros(7, 9)
    p[3, 4] = 1
    expected = torch.zeros(7, 9)
    n = len(element) // 2
    expected[3 - n : 3 + n + 1, 4 - n : 4 + n + 1] = t(element)
    assert torch.equal(dilate(p, radius), expected)
    assert torch.equal(erode(1 - p, radius), 1 - expected)


@pytest.mark.parametrize(
    "op, radius, before, after",
    [
        pytest.param(
            dilate, 1,
            [[0.25, 0.0, 0.0, 0.0, 0.0],
             [0.0, 0.0, 0.0, 0.0, 0.0],
             [0.0, 0.0, 0.0, 0.75, 0.0]],
            [[0.25, 0.25, 0.0, 0.0, 0.0],
             [0.25, 0.0, 0.0, 0.75, 0.0],
             [0.0, 0.0, 0.75, 0.75, 0.75]],
            id="dilation-is-grey-max-clipped-at-the-border",
        ),
        pytest.param(
            erode, 2,
            [[1.0, 1.0, 1.0, 1.0, 1.0],
             [1.0, 1.0, 1.0, 1.0, 1.0],
             [1.0, 1.0, 0.5, 1.0, 1.0],
             [1.0, 1.0, 1.0, 1.0, 1.0],
             [1.0, 1.0, 1.0, 1.0, 1.0]],
            [[1.0, 1.0, 0.5, 1.0, 1.0],
             [1.0, 0.5, 0.5, 0.5, 1.0],
             [0.5, 0.5, 0.5, 0.5, 0.5],
             [1.0, 0.5, 0.5, 0.5, 1.0],
             [1.0, 1.0, 0.5, 1.0, 1.0]],
            id="erosion-is-grey-min-ignoring-outside-pixels",
        ),
    ],
)  # fmt: skip
def test_grey_scale_morphology_by_hand(op, radius, before, after):
    assert torch.equal(op(t(before), radius), t(after))


def test_erosion_does_not_eat_the_mask_from_the_image_border():
    p = torch.zeros(5, 6)
    p[:, :3] = 1  # touches the top, left and bottom borders
    expected = torch.zeros(5, 6)
    expected[:, :2] = 1
    assert torch.equal(erode(p, 1), expected)
    assert torch.equal(erode(torch.ones(4, 7), 3), torch.ones(4, 7))


def test_radius_below_one_is_a_copy():
    p = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    for radius in (0, 0.5):
        out = dilate(p, radius)
        assert torch.equal(out, p) and out is not p
        assert torch.equal(erode(p, radius), p)


@pytest.mark.parametrize("shape", [(7, 5), (13, 17), (1, 9), (9, 1), (20, 6), (6, 20), (2, 3, 11)])
@pytest.mark.parametrize("radius", [1, 1.5, 2, 2.9, 4, 7.3, 12])
def test_dilate_and_erode_match_brute_force(shape, radius):
    p = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape) * 100 + shape[-1]))
    assert torch.equal(dilate(p, radius), reference_dilate(p, radius))
    assert torch.equal(erode(p, radius), -reference_dilate(-p, radius))


def test_a_radius_covering_the_map_gives_the_global_extremes():
    p = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dilate(p, 1000), p.amax(dim=(1, 2), keepdim=True).expand(2, 4, 6))
    assert torch.equal(erode(p, math.hypot(3, 5)), p.amin(dim=(1, 2), keepdim=True).expand(2, 4, 6))
    assert torch.equal(dilate(p, math.hypot(3, 5) - 0.01), reference_dilate(p, math.hypot(3, 5) - 0.01))


def test_morphology_rejects_bad_input():
    with pytest.raises(LdznetError, match="dilation radius must be a finite number of pixels >= 0, got -1"):
        dilate(torch.zeros(3, 3), -1)
    with pytest.raises(LdznetError, match="erosion radius .* got nan"):
        erode(torch.zeros(3, 3), float("nan"))
    with pytest.raises(LdznetError, match=r"dilate expects a floating-point tensor \[..., H, W\], got torch.bool"):
        dilate(torch.zeros(3, 3, dtype=torch.bool), 1)
    with pytest.raises(LdznetError, match=r"got torch.float32 tensor of shape \(3,\)"):
        erode(torch.zeros(3), 1)


def test_feather_is_a_gaussian_with_sigma_half_the_radius():
    radius, width, edge = 4.0, 41, 20
    mask = torch.zeros(1, width)
    mask[:, edge:] = 1
    sigma, half = radius / 2, 6  # the kernel is cut at ceil(3 sigma)
    weights = [math.exp(-0.5 * (d / sigma) ** 2) for d in range(-half, half + 1)]
    total = sum(weights)
    # out[x] = sum_d w[d] * mask[x + d]: the weights whose tap lands at a column >= edge.
    expected = [sum(w for d, w in zip(range(-half, half + 1), weights) if x + d >= edge) / total for x in range(width)]
    out = feather(mask, radius)
    assert torch.allclose(out[0], torch.tensor(expected), atol=1e-6)
    assert out[0, edge + 4] > 0.97 and out[0, edge - 5] < 0.03  # the ramp is ~radius pixels each side
    assert torch.allclose(feather(1 - mask, radius), 1 - out, atol=1e-6)  # commutes with inversion


def test_feather_keeps_full_masks_full_and_zero_is_a_copy():
    assert torch.equal(feather(torch.ones(5, 3), 20), torch.ones(5, 3))
    m = (torch.rand(6, 6, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    out = feather(m, 0)
    assert torch.equal(out, m) and out is not m
    blurred = feather(m, 1.5)
    assert blurred.shape == (6, 6) and blurred.min() >= 0 and blurred.max() <= 1
    with pytest.raises(LdznetError, match="feather radius must be a finite number of pixels >= 0"):
        feather(m, -2)


# Three objects under 8-connectivity: A (5 px, with a diagonal link), B (3 px), C (1 px).
COMPONENTS = torch.tensor([
    [1, 1, 0, 0, 0, 0],
    [1, 0, 0, 0, 1, 1],
    [0, 1, 1, 0, 0, 1],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 0, 0],
], dtype=torch.bool)  # fmt: skip


def test_keep_largest_components_uses_8_connectivity():
    a = COMPONENTS.clone()
    a[1, 4:] = a[2, 5] = a[4, 3] = False
    assert torch.equal(keep_largest_components(COMPONENTS, 1), a)
    a_and_b = COMPONENTS.clone()
    a_and_b[4, 3] = False
    assert torch.equal(keep_largest_components(COMPONENTS, 2), a_and_b)
    assert torch.equal(keep_largest_components(COMPONENTS, 5), COMPONENTS)
    empty = torch.zeros(3, 3, dtype=torch.bool)
    assert torch.equal(keep_largest_components(empty, 2), empty)


def test_keep_largest_breaks_ties_in_raster_order():
    # OpenCV labels the lower-left pixel first here; the raster rule keeps the upper-right one.
    mask = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    first = torch.tensor([[0, 0, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert torch.equal(keep_largest_components(mask, 1), first)
    assert torch.equal(keep_largest_components(mask, 2), mask & ~torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 1]]).bool())
    bigger = mask.clone()
    bigger[1, 2] = True  # joins the right column into the largest object: no tie at the cut
    assert torch.equal(keep_largest_components(bigger, 1), torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1]]).bool())


def test_remove_small_regions():
    expected = COMPONENTS.clone()
    expected[4, 3] = False
    assert torch.equal(remove_small_regions(COMPONENTS, 2), expected)
    assert torch.equal(remove_small_regions(COMPONENTS, 3), expected)
    expected[1, 4:] = expected[2, 5] = False
    assert torch.equal(remove_small_regions(COMPONENTS, 4), expected)
    assert torch.equal(remove_small_regions(COMPONENTS, 6), torch.zeros(5, 6, dtype=torch.bool))
    assert torch.equal(remove_small_regions(COMPONENTS, 0), COMPONENTS)
    holes = torch.ones(3, 3, dtype=torch.bool)
    holes[1, 1] = False
    assert torch.equal(remove_small_regions(holes, 2), holes)  # holes are not filled


def test_component_functions_reject_bad_input():
    with pytest.raises(LdznetError, match=r"keep_largest_components expects a bool tensor \[H, W\], got torch.float32"):
        keep_largest_components(torch.zeros(3, 3), 1)
    with pytest.raises(LdznetError, match="integer >= 1, got 0"):
        keep_largest_components(COMPONENTS, 0)
    with pytest.raises(LdznetError, match=r"shape \(1, 5, 6\)"):
        remove_small_regions(COMPONENTS[None], 2)
    with pytest.raises(LdznetError, match="integer number of pixels >= 0, got -1"):
        remove_small_regions(COMPONENTS, -1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("threshold", 1.0, r"threshold must be a number in \[0, 1\), got 1.0"),
        ("threshold", -0.1, r"threshold must be a number in \[0, 1\)"),
        ("threshold", "0.5", r"got '0.5'"),
        ("threshold", True, r"got True"),
        ("invert", 1, r"invert must be True or False, got 1"),
        ("keep_largest", 0, r"keep_largest must be an integer in \[1, 100000\], got 0"),
        ("keep_largest", 1.5, r"got 1.5"),
        ("min_area", -1, r"min_area must be an integer in \[0, 1000000000\], got -1"),
        ("min_area", 2.5, r"got 2.5"),  # 2.0 counts as 2, as in a MaskJob
        ("feather", -1.0, r"feather must be a number in \[0, 256\], got -1.0"),
        ("feather", float("inf"), r"got inf"),
    ],
)
def test_mask_options_validation(field, value, message):
    with pytest.raises(LdznetError, match=message):
        MaskOptions(**{field: value})


def test_mask_options_defaults_and_immutability():
    options = MaskOptions()
    assert (options.threshold, options.invert, options.keep_largest, options.min_area, options.feather) == (
        0.5, False, None, 0, 0.0
    )  # fmt: skip
    MaskOptions(threshold=0, keep_largest=3, min_area=10, feather=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.threshold = 0.2


PROBABILITY = t([
    [0.9, 0.9, 0.0, 0.0, 0.0],
    [0.9, 0.9, 0.0, 0.6, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.0, 0.0, 0.0, 0.7],
])  # fmt: skip


def b(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_select_mask_thresholds_strictly():
    assert torch.equal(
        select_mask(PROBABILITY),
        b([[1, 1, 0, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]),  # 0.5 itself is background
    )
    assert torch.equal(select_mask(PROBABILITY, MaskOptions(threshold=0.65)), PROBABILITY > 0.65)


def test_select_mask_inverts_after_keeping_the_largest_object():
    out = select_mask(PROBABILITY, MaskOptions(keep_largest=1, invert=True))
    # The kept object is the 2x2 block; inverting first would have kept the background instead.
    assert torch.equal(out, b([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    out = select_mask(PROBABILITY, MaskOptions(min_area=2, invert=True))
    assert torch.equal(out, b([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    out = select_mask(PROBABILITY, MaskOptions(keep_largest=2, threshold=0.4))
    assert torch.equal(out, b([[1, 1, 0, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))


def test_select_mask_rejects_batches():
    with pytest.raises(LdznetError, match=r"select_mask expects one map \[H, W\], got shape \(1, 4, 5\)"):
        select_mask(PROBABILITY[None])
