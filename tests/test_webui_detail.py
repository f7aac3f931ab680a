"""The detail pass on the fake WebUI: one "only masked" img2img per instance, in turn, with its own
mask, prompt and seed; nothing outside the padded crops changes; the same seed gives the same image;
infotext; an expression that selects nothing leaves the image and says so."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

from fake_webui import world  # noqa: E402

from modules import processing  # noqa: E402
from modules.scripts import PostprocessImageArgs  # noqa: E402

from ldznet_ext.detail import DetailPass  # noqa: E402
from ldznet_ext.segmenter import Prediction  # noqa: E402
from ldznet_ext.webui import host, script  # noqa: E402
from ldznet_ext.webui.engine import MaskResult  # noqa: E402
from ldznet_ext.webui.request import detail_from_infotext  # noqa: E402

SIZE = (64, 48)  # (W, H)
OBJECTS = {"goblin": (6, 20, 18, 34), "sword": (40, 8, 52, 16)}  # (x0, y0, x1, y1)
MASK_ARGS = ("", "LD-ZNet head", 0.5, 0, 0, False, "replace", True, 0, 0, 1.0, 0, True)


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((SIZE[1], SIZE[0], 3)) * 255).astype(np.uint8))


def _box_mask(box) -> np.ndarray:
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    return mask


@pytest.fixture
def objects(tmp_path, monkeypatch):
    """Masks of known objects: each term of an OR of OBJECTS' names selects its rectangle."""
    world.install(tmp_path)
    processing.inpaint_calls.clear()
    jobs = []

    def compute(image, job, brush=None):
        jobs.append(job)
        selected = torch.zeros(SIZE[1], SIZE[0], dtype=torch.bool)
        for term in job.expression.split(" OR "):
            if term in OBJECTS:
                x0, y0, x1, y1 = OBJECTS[term]
                selected[y0:y1, x0:x1] = True
        prediction = Prediction(job.tree(), selected.float(), selected.float(), {}, {}, selected)
        return MaskResult(prediction.mask_image(), prediction)

    monkeypatch.setattr(host, "compute", compute)
    return jobs


def _generate(detail_args, seed=100, is_img2img=False, width=32, height=32, image_seed=5):
    """A generation through the script with the detail pass's args; returns (p, generated, final image)."""
    s = script.LdznetScript()
    s.is_img2img = is_img2img
    args = (*MASK_ARGS, *detail_args)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a goblin with a sword", negative_prompt="blurry",
                                                    seed=seed, width=width, height=height, steps=30)
    processing.process_images(p, s, args)
    generated = _image(image_seed)
    pp = PostprocessImageArgs(generated)
    s.postprocess_image_after_composite(p, pp, *args)
    return p, generated, pp.image


DETAIL = ("goblin OR sword", "a green goblin [SEP] a shiny sword", 0.3, 7, 4)


def test_two_objects_are_each_inpainted_once(objects):
    p, generated, final = _generate(DETAIL)
    calls = processing.inpaint_calls
    assert len(calls) == 2 and [job.expression for job in objects] == ["goblin OR sword"]
    for call, name in zip(calls, ("goblin", "sword")):  # left to right
        assert np.array_equal(np.asarray(call.image_mask), _box_mask(OBJECTS[name]))
        assert (call.inpaint_full_res, call.inpaint_full_res_padding, call.mask_blur) == (True, 4, 0)
        assert (call.denoising_strength, call.steps, call.width, call.height) == (0.3, 7, 32, 32)
        assert call.scripts is None and call.closed and call.negative_prompt == "blurry"
    assert [c.prompt for c in calls] == ["a green goblin", "a shiny sword"]
    assert [c.seed for c in calls] == [100, 101]
    assert np.array_equal(np.asarray(calls[0].init_images[0]), np.asarray(generated))
    assert not np.array_equal(np.asarray(calls[1].init_images[0]), np.asarray(generated))  # in turn


def test_pixels_outside_every_padded_crop_are_unchanged(objects):
    """The fake host repaints the whole "only masked" region, widened to the output's aspect ratio
    (here 4:1, beyond the padded crop); the pass keeps only the padded crops."""
    _, generated, final = _generate(DETAIL, width=64, height=16)
    before, after = np.asarray(generated), np.asarray(final)
    outside = np.ones(before.shape[:2], bool)
    for x0, y0, x1, y1 in OBJECTS.values():
        crop = (slice(max(y0 - 4, 0), y1 + 4), slice(max(x0 - 4, 0), x1 + 4))
        outside[crop] = False
        assert (before[crop] != after[crop]).any(axis=-1).all()  # the fake's noise: every crop pixel differs
    assert np.array_equal(before[outside], after[outside])
    assert final.size == generated.size and final.mode == "RGB"


def test_the_same_seed_gives_the_same_image(objects):
    first = np.asarray(_generate(DETAIL, seed=7)[2])
    assert np.array_equal(first, np.asarray(_generate(DETAIL, seed=7)[2]))
    assert not np.array_equal(first, np.asarray(_generate(DETAIL, seed=8)[2]))


def test_the_pass_leaves_the_hosts_global_rng_as_it_found_it(objects, monkeypatch):
    """The host's img2img seeds the global torch RNG (``rng.randn``), and A1111 encodes the next
    img2img's init image with a draw from it (the VAE posterior's sample): a pass that left it
    reseeded made a repeated img2img request with the same seed give another image."""
    inpaint = processing._inpaint

    def seeding_inpaint(p):
        torch.manual_seed(p.seed)
        torch.randn(4)
        return inpaint(p)

    monkeypatch.setattr(processing, "_inpaint", seeding_inpaint)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    _generate(DETAIL)
    assert len(processing.inpaint_calls) == 2
    assert torch.equal(torch.get_rng_state(), before)


def test_fewer_prompts_reuse_the_last_and_empty_is_the_original(objects):
    _generate(("goblin OR sword", "", 0.3, 7, 4))
    _generate(("goblin OR sword", "a goblin", 0.3, 7, 4))
    assert [c.prompt for c in processing.inpaint_calls] == ["a goblin with a sword"] * 2 + ["a goblin"] * 2


def test_the_infotext_records_the_pass(objects):
    p, _, _ = _generate(DETAIL)
    assert detail_from_infotext(p.extra_generation_params) == DetailPass(*DETAIL)
    assert "LD-ZNet mask" not in p.extra_generation_params and p.extra_generation_params["LD-ZNet threshold"] == "0.5"


def test_no_instance_leaves_the_image_and_says_so(objects):
    p, generated, final = _generate(("goblin[3]", "", 0.3, 7, 4))  # the fake world has no such selector
    assert final is generated and processing.inpaint_calls == []
    warning = "the detail pass found no instance (nothing selected for 'goblin[3]' at threshold 0.5): " \
              "the image is as generated"
    assert p.extra_generation_params["LD-ZNet detail warning"] == warning
    assert f"LD-ZNet mask: {warning}" in p.comments


def test_no_detail_expression_runs_nothing(objects):
    p, generated, final = _generate(("", "a goblin", 0.3, 7, 4))
    assert final is generated and processing.inpaint_calls == [] and objects == []
    assert p.extra_generation_params == {}


@pytest.mark.usefixtures("every_term_found")
def test_on_the_tiny_model_in_img2img(tmp_path):
    """Without stand-ins: the pass masks the composited image with the head (threshold 0: one
    instance, the whole image) and inpaints it once, its mask the head's."""
    world.install(tmp_path)
    processing.inpaint_calls.clear()
    s = script.LdznetScript()
    s.is_img2img = True
    args = ("", "LD-ZNet head", 0.0, *MASK_ARGS[3:], "goblin", "", 0.5, 3, 0)
    p = processing.StableDiffusionProcessingImg2Img(prompt="a goblin", init_images=[_image(1)], seed=3)
    processing.process_images(p, s, args)
    generated = _image(2)
    s.postprocess_image_after_composite(p, PostprocessImageArgs(generated), *args)
    from ldznet_ext.job import MaskJob

    real_compute = host.compute
    expected = real_compute(generated, MaskJob("goblin", threshold=0.0)).mask
    assert len(processing.inpaint_calls) == 1
    assert np.array_equal(np.asarray(processing.inpaint_calls[0].image_mask), expected)


def test_an_empty_mask_names_why_it_is_empty():
    """An expression that selected something and a brush that took it away were reported as "nothing
    selected at threshold 0.5"."""
    from ldznet_ext.job import MaskJob
    from ldznet_ext.masks.presence import TermPresence

    selected = torch.zeros(4, 6, dtype=torch.bool)
    selected[1:3, 1:3] = True
    empty = np.zeros((4, 6), np.uint8)
    job = MaskJob("goblin", combine="intersect")
    found = Prediction(job.tree(), selected.float(), selected.float(), {}, {}, selected)
    assert MaskResult(empty, found).empty_reason(job) == "'intersect' with the brush mask left nothing of 'goblin'"
    absent = Prediction(job.tree(), torch.zeros(4, 6), torch.zeros(4, 6), {},
                        {"goblin": TermPresence(False, 0.1)}, torch.zeros(4, 6, dtype=torch.bool))
    assert MaskResult(empty, absent).empty_reason(job) == "no match for 'goblin'"
    nothing = Prediction(job.tree(), torch.zeros(4, 6), torch.zeros(4, 6), {}, {}, torch.zeros(4, 6, dtype=torch.bool))
    assert MaskResult(empty, nothing).empty_reason(job) == "nothing selected for 'goblin' at threshold 0.5"
