"""The img2img/txt2img script on the fake WebUI: p.image_mask before p.init(), the Batch tab's
reused p, the prompt's mask line, infotext, masks saved beside images, failures."""
from __future__ import annotations

import configparser
import copy
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

from fake_webui import world  # noqa: E402

import modules.scripts  # noqa: E402
import modules.shared  # noqa: E402
from modules import processing, script_callbacks  # noqa: E402

from ldznet_ext.webui import host, script, xyz  # noqa: E402
from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.job import MaskJob  # noqa: E402
from ldznet_ext.webui.request import from_infotext  # noqa: E402

pytestmark = pytest.mark.usefixtures("every_term_found")  # option plumbing on tiny random models

ARGS = ("", "LD-ZNet head", 0.3, 0, 0, False, "replace")


def _image(seed: int, size=(56, 40)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


@pytest.fixture
def img2img(tmp_path):
    world.install(tmp_path)
    s = script.LdznetScript()
    s.is_img2img = True
    return s


def _run(s, p, args=ARGS):
    return processing.process_images(p, s, args)


def test_process_sets_the_mask_before_init(img2img):
    image = _image(1)
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(prompt="a photo\nmask: goblin", init_images=[image]),
             ("", "LD-ZNet head", 0.3))
    expected = host.compute(image, MaskJob("goblin", threshold=0.3)).mask
    assert np.array_equal(np.asarray(p.used_masks[0]), expected)
    assert p.all_prompts == ["a photo"] and p.main_prompt == "a photo" and p.prompt == "a photo\nmask: goblin"
    assert p.extra_generation_params["LD-ZNet mask"] == "goblin"
    assert from_infotext(p.extra_generation_params) == MaskJob("goblin", threshold=0.3)


def test_the_prompt_line_wins_over_the_accordion(img2img):
    """The precedence Preview uses too (request.with_prompt_line): the line's expression, the accordion's settings."""
    image = _image(1)
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(prompt="a photo\nmask: goblin", init_images=[image]),
             ("sword", "LD-ZNet head", 0.3, 2))
    expected = host.compute(image, MaskJob("goblin", threshold=0.3, grow=2)).mask
    assert np.array_equal(np.asarray(p.used_masks[0]), expected)
    assert from_infotext(p.extra_generation_params) == MaskJob("goblin", threshold=0.3, grow=2)
    assert p.all_prompts == ["a photo"]


def test_the_newer_args_reach_the_mask_and_the_infotext(img2img):
    image = _image(2)
    args = ("goblin", "LD-ZNet head", 0.51, 0, 0, False, "replace", True, 1, 2, 0.5, 6)
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(init_images=[image]), args)
    job = MaskJob("goblin", threshold=0.51, keep_largest=1, min_area=2, refine_strength=0.5, refine_radius=6)
    assert np.array_equal(np.asarray(p.used_masks[0]), host.compute(image, job).mask)
    assert not np.array_equal(np.asarray(p.used_masks[0]), host.compute(image, MaskJob("goblin", threshold=0.51)).mask)
    assert p.extra_generation_params["LD-ZNet keep largest"] == "1" and from_infotext(p.extra_generation_params) == job


def test_no_expression_leaves_p_alone(img2img):
    brush = Image.new("L", (56, 40), 255)
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(prompt="plain", init_images=[_image(1)], mask=brush))
    assert p.image_mask is brush and p.extra_generation_params == {}


@pytest.mark.parametrize("mode", ["add", "subtract", "intersect"])
def test_combine_with_the_brush(img2img, mode):
    image = _image(2)
    brush = np.zeros((40, 56), np.uint8)
    brush[:, :28] = 255
    rgba = Image.fromarray(np.dstack([brush] * 4), "RGBA")  # an uploaded RGBA mask: alpha carries it
    args = ("goblin", "LD-ZNet head", 0.3, 0, 0, False, mode)
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(init_images=[image], mask=rgba), args)
    ours = host.compute(image, MaskJob("goblin", threshold=0.3)).mask
    expected = {"add": np.maximum(ours, brush), "subtract": np.minimum(ours, 255 - brush),
                "intersect": np.minimum(ours, brush)}[mode]
    assert np.array_equal(np.asarray(p.used_masks[0]), expected)


class _SoftInpainting:
    """The host's built-in Soft Inpainting as the script finds it: a title and its slice of p.script_args."""
    args_from, args_to = 2, 9

    def title(self):
        return "Soft Inpainting"


@pytest.mark.parametrize("soft", [False, True])
def test_a_soft_alpha_brush_is_rounded_unless_soft_inpainting_is_on(img2img, soft):
    """The host rounds an alpha mask in p.init() unless Soft Inpainting, on, turned that off in its
    process(), which now runs after ours: the brush is combined as the host will read it."""
    image = _image(2)
    alpha = np.zeros((40, 56), np.uint8)
    alpha[:, :20], alpha[:, 20:40] = 200, 100
    brush = Image.fromarray(np.dstack([np.full((40, 56), 255, np.uint8)] * 3 + [alpha]), "RGBA")
    p = processing.StableDiffusionProcessingImg2Img(init_images=[image], mask=brush)
    p.scripts = SimpleNamespace(alwayson_scripts=[_SoftInpainting()])
    p.script_args = ("x", "y", soft, 1, 0.5, 4, 0, 0.5, 2)
    _run(img2img, p, ("goblin", "LD-ZNet head", 0.3, 0, 0, False, "intersect"))
    ours = host.compute(image, MaskJob("goblin", threshold=0.3)).mask
    read = alpha if soft else np.where(alpha > 128, 255, 0).astype(np.uint8)
    assert np.array_equal(np.asarray(p.image_mask), np.minimum(ours, read)) and ours[:, :40].any()
    assert script.soft_inpainting_on(p) is soft


class _AxisOption:
    """The host's xyz_grid.AxisOption (scripts/xyz_grid.py), as far as the axes use it."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices


@pytest.fixture
def xyz_grid(monkeypatch):
    """The host's X/Y/Z plot script module, found as the host loads it (module name "xyz_grid.py")."""
    grid = SimpleNamespace(AxisOption=_AxisOption, axis_options=[_AxisOption("Nothing", str, None)])
    data = SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=grid)
    monkeypatch.setattr(modules.scripts, "scripts_data", [SimpleNamespace(script_class=object, module=None), data],
                        raising=False)
    return grid


def test_xyz_plot_axes_set_each_cell_s_mask(img2img, xyz_grid):
    """As the grid runs a cell: a shallow copy of p, each axis's apply, then the scripts' process()."""
    xyz.add_axes()
    xyz.add_axes()  # once, whatever the host calls
    axes = {option.label: option for option in xyz_grid.axis_options[1:]}
    assert list(axes) == ["[LD-ZNet] mask", "[LD-ZNet] mode", "[LD-ZNet] threshold", "[LD-ZNet] grow",
                          "[LD-ZNet] feather"]
    assert [axes[label].type for label in axes] == [str, str, float, float, float]
    assert axes["[LD-ZNet] mode"].choices() == ["LD-ZNet head", "zero-shot"]
    image = _image(4)
    base = processing.StableDiffusionProcessingImg2Img(prompt="a photo\nmask: goblin", init_images=[image])
    masks = []
    for expression, threshold in (("goblin", 0.3), ("sword", 0.99)):
        cell = copy.copy(base)
        axes["[LD-ZNet] threshold"].apply(cell, threshold, [0.3, 0.99])
        if expression != "goblin":
            axes["[LD-ZNet] mask"].apply(cell, expression, ["goblin", "sword"])
        _run(img2img, cell, ("", "LD-ZNet head", 0.5, 0, 1.5))
        job = MaskJob(expression, threshold=threshold, feather=1.5)
        assert from_infotext(cell.extra_generation_params) == job
        masks.append(np.asarray(cell.image_mask))
        assert np.array_equal(masks[-1], host.compute(image, job).mask)
    assert not np.array_equal(*masks) and not hasattr(base, "_ldznet_xyz")


@pytest.mark.parametrize("label, values, message", [("[LD-ZNet] threshold", [0.3, 1.5], "threshold must be"),
                                                    ("[LD-ZNet] mask", ["goblin", "goblin AND"], "position 10"),
                                                    ("[LD-ZNet] mode", ["fast"], "mode must be one of")])
def test_xyz_plot_values_are_checked_before_the_grid_runs(xyz_grid, label, values, message):
    xyz.add_axes()
    axis = next(option for option in xyz_grid.axis_options if option.label == label)
    with pytest.raises(LdznetError, match=message):
        axis.confirm(None, values)


def test_a_grid_module_of_another_shape_keeps_the_ui(xyz_grid, capsys):
    del xyz_grid.AxisOption
    xyz.add_axes()
    assert capsys.readouterr().err.startswith("LD-ZNet: the X/Y/Z plot axes were not added (AttributeError")
    assert len(xyz_grid.axis_options) == 1


def test_batch_tab_reuses_p(img2img):
    """img2img's Batch tab runs one p for every image, changing only init_images (and image_mask
    when a mask folder is set). Each image gets its own mask; a blank mask that switched
    "only masked" off for one image does not carry over."""
    p = processing.StableDiffusionProcessingImg2Img(prompt="mask: goblin", init_images=None, inpaint_full_res=True)
    images = [_image(3), _image(4)]
    masks = []
    for image, threshold in ((images[0], 0.99), (images[1], 0.3)):  # 0.99: a blank mask
        p.init_images = [image]
        _run(img2img, p, ("", "LD-ZNet head", threshold))
        masks.append(np.asarray(p.image_mask))
    assert not masks[0].any() and p.used_masks[0] is None
    assert np.array_equal(masks[1], host.compute(images[1], MaskJob("goblin", threshold=0.3)).mask)
    assert p.inpaint_full_res is True and p.used_masks[1] is not None


def test_several_init_images_stop_the_generation(img2img):
    """The host inpaints every init image with p.image_mask, which is made for the first."""
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(prompt="mask: goblin",
                                                                   init_images=[_image(1), _image(2)]))
    assert modules.shared.state.interrupted and p.image_mask is None
    assert p.extra_generation_params["LD-ZNet error"].startswith("img2img got 2 init images")


def test_failure_stops_the_generation(tmp_path):
    world.install(tmp_path, head=False)
    s = script.LdznetScript()
    s.is_img2img = True
    p = _run(s, processing.StableDiffusionProcessingImg2Img(prompt="mask: goblin", init_images=[_image(1)]))
    assert modules.shared.state.interrupted
    assert any("no LD-ZNet head is selected" in c for c in p.comments) and p.image_mask is None


def test_any_failure_of_the_mask_stops_the_generation(img2img, monkeypatch):
    """An error that is not ours (out of memory while a mask model loads) was logged by the host, which then
    inpainted the whole image unmasked while the infotext named the mask."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(script.host, "compute", out_of_memory)
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(prompt="mask: goblin", init_images=[_image(1)]))
    assert modules.shared.state.interrupted and p.image_mask is None
    assert p.extra_generation_params["LD-ZNet error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.mark.parametrize("is_img2img, name", [(True, "negative_prompt"), (False, "negative_prompt"),
                                               (False, "hr_negative_prompt")])
def test_a_mask_line_in_the_negative_prompt_stops_the_generation(tmp_path, is_img2img, name):
    world.install(tmp_path)
    s = script.LdznetScript()
    s.is_img2img = is_img2img
    kind = processing.StableDiffusionProcessingImg2Img if is_img2img else processing.StableDiffusionProcessingTxt2Img
    extra = {"init_images": [_image(1)]} if is_img2img else {}
    p = kind(prompt="a photo", **extra)
    setattr(p, name, "blurry\nmask: goblin")  # the hires pass's own is an attribute of the host's txt2img p
    p = _run(s, p)
    assert modules.shared.state.interrupted
    assert p.extra_generation_params["LD-ZNet error"].startswith("the negative prompt has a 'mask:' line")
    assert getattr(p, "image_mask", None) is None


def test_metadata_ini_orders_our_process_before_the_scripts_that_read_the_mask():
    """The host's callback name for our process() is EXTENSION/SCRIPT FILE/script_process/CLASS
    (modules/script_callbacks.add_callback); a section under another name is silently ignored."""
    repo = Path(__file__).resolve().parents[1]
    config = configparser.ConfigParser()
    config.read(repo / "metadata.ini")
    # the host's script file is scripts/ldznet.py, where the class is imported, not defined
    assert "from ldznet_ext.webui.script import LdznetScript" in (repo / "scripts" / "ldznet.py").read_text()
    ours = f"ldznet/ldznet.py/script_process/{script.LdznetScript.__name__}"
    assert config.get("Extension", "Name") == "ldznet"
    before = re.split(r"[,\s]+", config.get(f"callbacks/{ours}", "Before").strip())
    assert before == ["soft-inpainting/soft_inpainting.py/script_process/Script",
                      "sd_forge_controlnet/controlnet.py/script_process/ControlNetForForgeOfficial",
                      "sd-webui-controlnet/controlnet.py/script_process/Script"]
    assert "process" in vars(script.LdznetScript)


def test_txt2img_saves_a_mask_beside_each_image(tmp_path):
    world.install(tmp_path)
    modules.shared.opts.data["ldznet_save_masks"] = True
    s = script.LdznetScript()
    s.is_img2img = False
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a goblin\nmask: goblin")
    _run(s, p, ("", "LD-ZNet head", 0.3))
    assert p.all_prompts == ["a goblin"]
    generated = _image(5)
    from modules.scripts import PostprocessImageArgs

    s.postprocess_image_after_composite(p, PostprocessImageArgs(generated), *ARGS)
    target = tmp_path / "00001-1.png"
    script.save_pending_mask(script_callbacks.ImageSaveParams(generated, p, str(target), {}))
    saved = np.asarray(Image.open(tmp_path / "00001-1-ldznet-mask.png"))
    assert np.array_equal(saved, host.compute(generated, MaskJob("goblin", threshold=0.3)).mask)
    script.save_pending_mask(script_callbacks.ImageSaveParams(_image(6), p, str(tmp_path / "grid.png"), {}))
    assert not (tmp_path / "grid-ldznet-mask.png").exists()


def test_an_empty_mask_is_reported(img2img):
    """An expression that selects nothing leaves a visible warning in the comments and the infotext
    (the host then generates without a mask); the next image of a reused p that has a mask drops it."""
    p = processing.StableDiffusionProcessingImg2Img(prompt="mask: goblin", init_images=[_image(3)])
    _run(img2img, p, ("", "LD-ZNet head", 0.99))
    warning = "the mask is empty (nothing selected for 'goblin' at threshold 0.99): the image was not inpainted"
    assert not np.asarray(p.image_mask).any() and p.batches_sampled == 0 and p.n_iter == 1
    assert p.extra_generation_params["LD-ZNet warning"] == warning
    assert f"LD-ZNet mask: {warning}" in p.comments
    p.init_images = [_image(4)]
    _run(img2img, p, ("", "LD-ZNet head", 0.3))
    assert np.asarray(p.image_mask).any() and "LD-ZNet warning" not in p.extra_generation_params
    assert p.batches_sampled == 1


def test_a_term_not_found_is_named_and_nothing_is_inpainted(img2img, monkeypatch):
    """Presence (here a rule no map passes): the warning names the term; a brush mask added to the
    empty one still gets its image inpainted."""
    from ldznet_ext import segmenter
    from ldznet_ext.masks.presence import PresenceRule
    monkeypatch.setattr(segmenter, "HEAD_RULE", PresenceRule(0.0, 0.999))
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(prompt="mask: goblin", init_images=[_image(3)]),
             ("", "LD-ZNet head", 0.3))
    assert p.batches_sampled == 0
    assert p.extra_generation_params["LD-ZNet warning"] == (
        "the mask is empty (no match for 'goblin'): the image was not inpainted")
    brush = Image.new("L", _image(3).size, 0)
    brush.paste(255, (0, 0, 8, 8))
    p = _run(img2img, processing.StableDiffusionProcessingImg2Img(prompt="mask: goblin", init_images=[_image(3)],
                                                                  mask=brush), ("", "LD-ZNet head", 0.3, 0, 0,
                                                                                False, "add"))
    assert p.batches_sampled == 1 and "LD-ZNet warning" not in p.extra_generation_params


def test_a_failure_is_in_the_infotext(tmp_path):
    """The API's answer to a stopped generation has no images but carries the infotext parameters."""
    world.install(tmp_path, head=False)
    s = script.LdznetScript()
    s.is_img2img = True
    p = _run(s, processing.StableDiffusionProcessingImg2Img(prompt="mask: goblin", init_images=[_image(1)]))
    assert p.extra_generation_params["LD-ZNet error"].startswith("no LD-ZNet head is selected")
