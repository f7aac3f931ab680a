"""Instances and their selection in expressions (``star[1]``, ``star[largest]``), checked against the
micro world's own object geometry: the ground-truth phrase mask is the map (an oracle segmenter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldznet_ext.errors import ExpressionError
from ldznet_ext.masks.expression import parse
from ldznet_ext.masks.instances import find_instances, instance_image
from ldznet_ext.masks.ops import feather
from ldznet_ext.world.scenes import VOCABULARY, make_scene, split_seeds
from ldznet_ext.world.spec import OBJECT_LABEL0


def _boxes_map() -> torch.Tensor:
    """40 x 60 map: a 5x5 square at x 30, a 9x9 at x 2, a 7x7 at x 50 (probability 0.9), a 1-pixel speck."""
    p = torch.zeros(40, 60)
    p[10:15, 30:35] = 0.9
    p[20:29, 2:11] = 0.9
    p[1:8, 50:57] = 0.9
    p[38, 20] = 0.9  # a fragment: under 0.05 % of 2400 pixels rounds up to 2 pixels
    return p


def _box(p: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = torch.nonzero(p > 0.5, as_tuple=True)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


@pytest.mark.parametrize("text, x0", [("x[1]", 2), ("x[2]", 30), ("x[-1]", 50), ("x[3]", 50), ("x[largest]", 2),
                                      ("x[smallest]", 30), ("x[top 1]", 50), ("x[center 1]", 30),
                                      ("x[area 2]", 50)])
def test_selectors_pick_one_square(text: str, x0: int) -> None:
    selected = parse(text).evaluate({"x": _boxes_map()})
    assert _box(selected)[0] == x0
    assert torch.equal(selected[selected > 0], torch.full((int((selected > 0).sum()),), 0.9))


def test_several_indices_missing_ones_and_composition() -> None:
    maps = {"x": _boxes_map(), "y": torch.zeros(40, 60)}
    assert int((parse("x[1,3]").evaluate(maps) > 0.5).sum()) == 81 + 49
    assert int((parse("x[4]").evaluate(maps) > 0.5).sum()) == 0  # no fourth instance: nothing, not an error
    maps["y"][0:2, 0:2] = 1.0
    assert int((parse("x[1] OR y").evaluate(maps) > 0.5).sum()) == 81 + 4
    assert int((parse("x AND NOT x[1]").evaluate(maps) > 0.5).sum()) == 25 + 49 + 1  # the speck is not an instance
    # Selection runs on the threshold given to evaluate: at 0.95 nothing passes.
    assert int((parse("x[1]").evaluate(maps, threshold=0.95) > 0).sum()) == 0


def test_find_instances_lists_boxes_areas_and_left_to_right_order() -> None:
    p = _boxes_map()
    found = find_instances(p > 0.5, p, order="area")
    assert [(i.box, i.area, i.order) for i in found] == [((2, 20, 11, 29), 81, 1), ((50, 1, 57, 8), 49, 3),
                                                        ((30, 10, 35, 15), 25, 2)]
    assert all(i.score == pytest.approx(0.9) for i in found)


def test_an_instance_keeps_its_box_only_and_gives_the_whole_mask_and_image_on_demand() -> None:
    """An image of thousands of specks held one image-size mask per speck (2 GB at 1024 x 1024)."""
    p = _boxes_map()
    for instance in find_instances(p > 0.5, p):
        x0, y0, x1, y1 = instance.box
        assert tuple(instance.window.shape) == (y1 - y0, x1 - x0) and instance.size == (40, 60)
        full = torch.zeros(40, 60, dtype=torch.bool)
        full[y0:y1, x0:x1] = True  # the squares fill their boxes
        assert torch.equal(instance.mask, full)
        for radius in (0, 1.5, 6, 40):  # the blur inside the widened box equals the blur of the whole mask
            whole = (feather(full.float(), radius).numpy() * 255.0 + 0.5).astype(np.uint8)
            assert np.abs(instance_image(instance, radius).astype(int) - whole).max() <= 1


def test_selection_on_empty_maps_selects_nothing() -> None:
    for shape in ((0, 8, 8), (0, 8), (3, 0, 8)):
        selected = parse("a[1] OR a[-1]").evaluate({"a": torch.rand(shape)})
        assert selected.shape == shape
    assert find_instances(torch.zeros(0, 5, dtype=torch.bool)) == []


@pytest.mark.parametrize("text, position, words", [
    ("star[0]", 5, "out of range"), ("star[]", 4, "empty instance selector"), ("star[1,]", 7, "expected an index"),
    ("star[foo 1]", 5, "unknown instance order 'foo'"), ("star[1 2]", 7, "expected ',' or ']'"),
    ("star[", 4, "never closed"), ("star]", 4, "unexpected ']'"), ("star[1.5]", 6, "unexpected '.'"),
    ("star[largest, 2]", 5, r"^\[largest\] stands alone; to pick several by size write \[area 1, 2\] \(largest"),
])
def test_selector_parse_errors_name_the_position(text: str, position: int, words: str) -> None:
    with pytest.raises(ExpressionError, match=words) as error:
        parse(text)
    assert error.value.position == position


@pytest.mark.parametrize("text", ["star[1]", "star[-1]", "face[1,3]", "face[area 2,-1]{+4} OR sky",
                                  "(a OR b)[center 1]", "star[largest]", "star[smallest]", '"rock [live]"'])
def test_selectors_round_trip(text: str) -> None:
    assert str(parse(text)) == text
    assert parse(str(parse(text))) == parse(text)


def _separated_instances(scene) -> tuple[str, list[np.ndarray]] | None:
    """A class phrase with 2+ objects whose visible parts are apart (so regions are objects), or None."""
    import cv2
    for shape, plural in zip(VOCABULARY.shapes, VOCABULARY.plurals):
        ids = [OBJECT_LABEL0 + k for k, o in enumerate(scene.spec.objects) if o.shape == shape]
        if len(ids) < 2:
            continue
        objects = [scene.labels == i for i in ids]
        count, _ = cv2.connectedComponents(scene.phrases[plural].astype(np.uint8), connectivity=8)
        areas = sorted(int(o.sum()) for o in objects)
        if count - 1 == len(objects) and areas[-1] != areas[-2] and areas[0] >= 0.0005 * scene.labels.size:
            return plural, objects
    return None


def test_selection_is_exact_on_50_micro_world_scenes() -> None:
    checked = 0
    for seed in split_seeds("test"):
        scene = make_scene(seed, 128)
        found = _separated_instances(scene)
        if found is None:
            continue
        plural, objects = found
        maps = {plural: torch.from_numpy(scene.phrases[plural]).float()}
        leftmost = min(objects, key=lambda o: (np.nonzero(o)[1].min(), np.nonzero(o)[0].min()))
        rightmost = max(objects, key=lambda o: (np.nonzero(o)[1].min(), np.nonzero(o)[0].min()))
        largest = max(objects, key=lambda o: int(o.sum()))
        for text, truth in ((f"{plural}[1]", leftmost), (f"{plural}[-1]", rightmost), (f"{plural}[largest]", largest)):
            assert np.array_equal(parse(text).evaluate(maps).numpy() > 0.5, truth), (seed, text)
        checked += 1
        if checked == 50:
            break
    assert checked == 50


def _same_corner_map() -> torch.Tensor:
    """40 x 60 map: a small corner (area 9) and a large frame (area 47) around it, apart, whose boxes
    share the top-left corner (2, 2)."""
    p = torch.zeros(40, 60)
    p[2, 2:7] = p[2:7, 2] = 0.9  # small: box (2, 2, 7, 7)
    p[2, 10:21] = p[2:21, 20] = p[20, 2:21] = 0.9  # large: box (2, 2, 21, 21)
    return p


@pytest.mark.parametrize("order", ["left", "top"])
def test_equal_box_corners_put_the_larger_instance_first(order: str) -> None:
    p = _same_corner_map()
    found = find_instances(p > 0.5, p, order=order)
    assert [(i.box, i.area, i.order) for i in found] == [((2, 2, 21, 21), 47, 1), ((2, 2, 7, 7), 9, 2)]
    assert int((parse(f"x[{order} 1]").evaluate({"x": p}) > 0).sum()) == 47


def test_ties_in_center_and_area_order_go_left_to_right() -> None:
    """Two 4 x 4 squares as far from the centre of a 40 x 40 map (16 px): one left of it, one above."""
    p = torch.zeros(40, 40)
    p[18:22, 2:6] = 0.9  # left of the centre: box (2, 18, 6, 22)
    p[2:6, 18:22] = 0.9  # above it: box (18, 2, 22, 6)
    for order in ("center", "area"):
        assert [i.box for i in find_instances(p > 0.5, p, order=order)] == [(2, 18, 6, 22), (18, 2, 22, 6)]
        assert _box(parse(f"x[{order} 1]").evaluate({"x": p})) == (2, 18, 6, 22)
    assert _box(parse("x[smallest]").evaluate({"x": p})) == (18, 2, 22, 6)


def test_a_region_of_exactly_the_fragment_size_is_an_instance() -> None:
    """64 x 64: 0.05 % of 4096 pixels is 2.048, so 3 pixels is the smallest instance and 2 a fragment."""
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[10, 10:13] = True  # 3 pixels
    mask[40, 40:42] = True  # 2 pixels
    assert [(i.box, i.area) for i in find_instances(mask)] == [((10, 10, 13, 11), 3)]


def test_an_instance_s_score_is_its_mean_probability() -> None:
    p = torch.zeros(40, 60)
    p[10:14, 10:14] = 0.6
    p[10:12, 10:14] = 1.0  # half of the square at 1.0, half at 0.6
    (instance,) = find_instances(p > 0.5, p)
    assert instance.score == pytest.approx(0.8)
    assert instance.to_dict() == {"order": 1, "box": [10, 10, 14, 14], "area": 16, "score": 0.8}


@pytest.mark.parametrize("text, indices", [("x[10000]", (10000,)), ("x[-10000]", (-10000,)),
                                           ("x[area 1, 10000]", (1, 10000))])
def test_selector_indices_up_to_the_limit_parse(text: str, indices: tuple[int, ...]) -> None:
    (selector,) = parse(text).modifiers
    assert selector.indices == indices
    with pytest.raises(ExpressionError, match="out of range"):
        parse(text.replace("10000", "10001"))
