"""The detail pass's plan (ldznet_ext.detail): prompts per instance, crop boxes, seeds, settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldznet_ext.detail import DetailPass, crop_box, instance_prompt, plan, split_prompts
from ldznet_ext.errors import ExpressionError, LdznetError
from ldznet_ext.job import MaskJob
from ldznet_ext.masks.instances import find_instances


@pytest.mark.parametrize("text, prompts", [
    ("", [""]),
    ("  a cat  ", ["a cat"]),
    ("a smiling face [SEP] an old face", ["a smiling face", "an old face"]),
    ("a[SEP]b [SEP]  [SEP] c", ["a", "b", "", "c"]),
    ("[SEP] b", ["", "b"]),
    ("a [sep] b", ["a [sep] b"]),  # ADetailer's token is upper case
])
def test_split_prompts(text, prompts):
    assert split_prompts(text) == prompts


def test_instance_prompt_reuses_the_last_and_empty_is_the_default():
    prompts = ["a", "", "c"]
    assert [instance_prompt(prompts, i, "orig") for i in range(5)] == ["a", "orig", "c", "c", "c"]
    assert [instance_prompt([""], i, "orig") for i in range(2)] == ["orig", "orig"]
    assert [instance_prompt(["", "b"], i, "orig") for i in range(3)] == ["orig", "b", "b"]


def _mask(shape=(40, 50)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[10:20, 5:15] = 255  # rows 10..19, columns 5..14
    return mask


@pytest.mark.parametrize("padding, box", [(0, (5, 10, 15, 20)), (3, (2, 7, 18, 23)), (8, (0, 2, 23, 28)),
                                          (100, (0, 0, 50, 40))])
def test_crop_box_is_the_padded_bounding_box_clamped_to_the_image(padding, box):
    assert crop_box(_mask(), padding) == box


def test_crop_box_of_soft_and_empty_masks():
    mask = np.zeros((6, 7), np.uint8)
    assert crop_box(mask, 4) is None
    mask[5, 6] = 1  # any non-zero value counts, as in the host's bounding box
    assert crop_box(mask, 2) == (4, 3, 7, 6)


def _two_objects() -> torch.Tensor:
    mask = torch.zeros(40, 60, dtype=torch.bool)
    mask[5:15, 40:52] = True  # the right object, listed second
    mask[20:30, 4:14] = True
    return mask


def test_plan_gives_each_instance_its_mask_box_prompt_and_seed():
    instances = find_instances(_two_objects())
    steps = plan(instances, DetailPass("thing", "a red thing [SEP] ", padding=4), "the original", seed=1234)
    assert [s.order for s in steps] == [1, 2]
    assert [s.box for s in steps] == [(0, 16, 18, 34), (36, 1, 56, 19)]
    assert [s.prompt for s in steps] == ["a red thing", "the original"]
    assert [s.seed for s in steps] == [1234, 1235]
    for step, instance in zip(steps, instances):
        assert step.mask.dtype == np.uint8 and set(np.unique(step.mask)) == {0, 255}
        assert np.array_equal(step.mask > 0, instance.mask.numpy())


def test_plan_feathers_the_masks_and_the_box_covers_the_soft_edge():
    instances = find_instances(_two_objects())
    steps = plan(instances[:1], DetailPass("thing", padding=0), "p", seed=0, feather=2)
    mask = steps[0].mask
    assert 0 < mask[19, 8] < 255 and mask[25, 8] == 255  # soft just outside the object, solid inside
    assert steps[0].box == crop_box(mask, 0) and steps[0].box[1] < 20  # the box grew with the edge


def test_plan_of_no_instances_is_empty():
    assert plan([], DetailPass("thing"), "p", seed=3) == []
    for bad in ({"seed": "7"}, {"seed": 1.5}, {"seed": 2**64}, {"seed": 1, "feather": 20000}, {"seed": 1, "feather": -1}):
        with pytest.raises(LdznetError, match=r"^(seed|feather) must be "):
            plan([], DetailPass("thing"), "p", **bad)


def test_detail_pass_settings():
    assert DetailPass() == DetailPass("", "", 0.4, 20, 32) and not DetailPass().active
    assert DetailPass("  face[1]   OR hand ", "x", "0.5", "12", "0") == DetailPass("face[1] OR hand", "x", 0.5, 12, 0)
    assert DetailPass("face", steps=12.0).steps == 12 and isinstance(DetailPass("face", steps=12.0).steps, int)
    assert DetailPass("face").mask_job(MaskJob("cat", threshold=0.3, combine="add")) == MaskJob(
        "face", threshold=0.3, combine="replace")
    # what shapes the main mask does not shape the pass: an inverted main mask made the pass repaint the
    # whole background as one "instance", and keep_largest=1 left every face but one as it was
    shaped = MaskJob("sky", mode="zero-shot", threshold=0.4, grow=20, feather=3, invert=True, refine=False,
                     keep_largest=1, min_area=50, refine_strength=0.5, presence=False)
    assert DetailPass("face").mask_job(shaped) == MaskJob("face", mode="zero-shot", threshold=0.4, feather=3,
                                                          refine=False, refine_strength=0.5, presence=False)
    with pytest.raises(ExpressionError, match="at position 8$"):
        DetailPass("face AND")
    with pytest.raises(LdznetError, match=r"^denoising must be a number in \(0, 1\], got 1.5$"):
        DetailPass("face", denoising=1.5)
    with pytest.raises(LdznetError, match=r"^detail prompts must be text, got int$"):
        DetailPass("face", 3)
