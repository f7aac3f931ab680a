"""The WebUI's pure parts: script args, infotext, the prompt's mask line, combine modes, API checks."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ldznet_ext.detail import DetailPass
from ldznet_ext.errors import ExpressionError, LdznetError
from ldznet_ext.job import MaskJob
from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.refine import RefineSettings
from ldznet_ext.webui import api, request
from ldznet_ext.webui.request import ARG_NAMES, INFOTEXT_KEYS, combine, from_args, from_infotext, infotext, split_mask_line


@pytest.mark.parametrize("prompt, rest, expression", [
    ("a goblin\nmask: goblin", "a goblin", "goblin"),
    ("mask: goblin OR  sword\na goblin with a sword", "a goblin with a sword", "goblin OR sword"),
    ("a\n  MASK : cat{+4}\nb", "a\nb", "cat{+4}"),
    ("a masked ball, mask: no line start", "a masked ball, mask: no line start", None),
    ("no mask here", "no mask here", None),
    ("a knight\nmask: goblin <lora:goblin_style:0.8>\nsunset", "a knight\n<lora:goblin_style:0.8>\nsunset", "goblin"),
    ("mask: <hypernet:h:1> goblin OR sword <lora:a:1>", "<hypernet:h:1> <lora:a:1>", "goblin OR sword"),
])
def test_split_mask_line(prompt, rest, expression):
    assert split_mask_line(prompt) == (rest, expression)


@pytest.mark.parametrize("prompt, message", [("mask: a\nmask: b", "2 'mask:' lines"), ("x\nmask:  ", "empty"),
                                             ("x\nmask: <lora:a:1>", "empty")])
def test_split_mask_line_errors(prompt, message):
    with pytest.raises(LdznetError, match=message):
        split_mask_line(prompt)


OLD_INFOTEXT = {"LD-ZNet mask": "goblin OR sword{+4}", "LD-ZNet mode": "zero-shot", "LD-ZNet threshold": "0.35",
                "LD-ZNet grow": "-3", "LD-ZNet feather": "2.5", "LD-ZNet invert": "True",
                "LD-ZNet combine": "subtract", "LD-ZNet refine": "False"}
"""The infotext of a job with none of the options added with MaskJob: as written before it."""


def test_infotext_round_trip():
    job = MaskJob("goblin OR sword{+4}", "zero-shot", 0.35, -3, 2.5, True, "subtract", False)
    assert infotext(job) == OLD_INFOTEXT
    assert from_infotext(OLD_INFOTEXT) == job
    assert from_infotext({"Steps": "20"}) is None


def test_infotext_round_trips_every_field():
    job = MaskJob("goblin", "zero-shot", 0.123456789, 2048, 0.5, False, "add", True, 3, 40, 0.25, 7.5)
    params = infotext(job)
    assert params == {"LD-ZNet mask": "goblin", "LD-ZNet mode": "zero-shot", "LD-ZNet threshold": "0.123456789",
                      "LD-ZNet grow": "2048", "LD-ZNet feather": "0.5", "LD-ZNet invert": "False",
                      "LD-ZNet combine": "add", "LD-ZNet refine": "True", "LD-ZNet keep largest": "3",
                      "LD-ZNet min area": "40", "LD-ZNet refine strength": "0.25", "LD-ZNet refine radius": "7.5"}
    mask_keys = {INFOTEXT_KEYS[name] for name in request.MASK_ARG_NAMES}
    assert mask_keys - {"LD-ZNet presence"} == set(params)  # presence on: not written; no detail pass: none of it
    assert list(INFOTEXT_KEYS) == list(request.ARG_NAMES)
    assert from_infotext(params) == job
    assert request.infotext(job.replace(presence=False))["LD-ZNet presence"] == "False"
    assert from_infotext(request.infotext(job.replace(presence=False))) == job.replace(presence=False)
    assert from_infotext({**params, "LD-ZNet keep largest": "0"}).keep_largest is None  # the control's "all"


def test_pasted_values():
    """PNG Info fills every control: an older image without the newer keys resets them to their
    defaults (the control values of "all" and "automatic"); missing older keys leave controls alone."""
    pasted = {name: request.pasted_value(OLD_INFOTEXT, name) for name in request.ARG_NAMES}
    assert pasted == {"expression": "goblin OR sword{+4}", "mode": "zero-shot", "threshold": 0.35, "grow": -3.0,
                      "feather": 2.5, "invert": True, "combine": "subtract", "refine": False,
                      "keep_largest": 0, "min_area": 0, "refine_strength": 1.0, "refine_radius": 0,
                      "presence": True, "detail_expression": "", "detail_prompts": "", "detail_denoising": 0.4,
                      "detail_steps": 20, "detail_padding": 32}
    assert [request.pasted_value({}, name) for name in ("expression", "threshold", "min_area")] == ["", None, 0]
    assert from_args(list(pasted.values())) == from_infotext(OLD_INFOTEXT)
    assert request.paste_problems(OLD_INFOTEXT) == []


CONTROL_VALUES = {"expression": "", "mode": "LD-ZNet head", "threshold": 0.5, "grow": 0.0, "feather": 0.0, "invert": False,
                  "combine": "replace", "refine": True, "keep_largest": 0, "min_area": 0, "refine_strength": 1.0,
                  "refine_radius": 0.0, "presence": True, "detail_expression": "", "detail_prompts": "",
                  "detail_denoising": 0.4, "detail_steps": 20, "detail_padding": 32}
"""The accordion's controls' values before a paste (their Python types decide the host's conversion)."""


def _host_paste(params) -> dict:
    """The controls after A1111 v1.10.1's PNG Info paste (``infotext_utils.connect_paste``): each field's
    value (a callable field called, a string one looked up), None leaving the control, converted to the
    type of the control's value."""
    controls = {}
    for name, current in CONTROL_VALUES.items():
        key = request.PasteKey(name)
        value = key(params) if callable(key) else params.get(key)
        try:
            if value is None:
                controls[name] = current
            elif type(current) is bool and value == "False":
                controls[name] = False
            else:
                controls[name] = float(value) if type(current) is int else type(current)(value)
        except Exception:  # noqa: BLE001 (the host's own catch-all: the control is left as it is)
            controls[name] = current
    return controls


def test_a_paste_key_is_the_infotext_key_and_its_reader():
    """The host pastes PNG Info and an API request's infotext through a callable field, and copies the
    controls whose string field is in ``paste_field_names`` for Send to img2img: every field is both."""
    keys = [request.PasteKey(name) for name in ARG_NAMES]
    assert keys == list(INFOTEXT_KEYS.values()) and all(isinstance(key, str) and callable(key) for key in keys)
    assert [key in list(INFOTEXT_KEYS.values()) for key in keys] == [True] * len(ARG_NAMES)
    assert {key: key.name for key in keys} == {text: name for name, text in INFOTEXT_KEYS.items()}
    params = {"LD-ZNet mask": "cat", "LD-ZNet invert": "false", "LD-ZNet grow": "2.5", "LD-ZNet threshold": "nan"}
    assert [key(params) for key in keys[:6]] == ["cat", None, None, 2.5, None, False]


@pytest.mark.parametrize("key, value, control, problem", [
    ("LD-ZNet invert", "false", ("invert", False), None),  # the host's bool("false") ticked it
    ("LD-ZNet refine", "no", ("refine", True), "LD-ZNet refine: refine must be true or false, got 'no'"),
    ("LD-ZNet presence", "0", ("presence", True), "LD-ZNet presence: presence must be true or false, got '0'"),
    ("LD-ZNet threshold", "nan", ("threshold", 0.5), "LD-ZNet threshold: threshold must be a number in [0, 1), "
                                                     "got 'nan'"),
    ("LD-ZNet grow", "1e999", ("grow", 0), "LD-ZNet grow: grow must be a number in [-2048, 2048], got '1e999'"),
    ("LD-ZNet mode", "ZERO-SHOT", ("mode", "zero-shot"), None),  # the radio's own spelling
    ("LD-ZNet combine", "merge", ("combine", "replace"), "LD-ZNet combine: combine must be one of 'replace', "
                                                         "'add', 'subtract', 'intersect', got 'merge'"),
    ("LD-ZNet keep largest", "-3", ("keep_largest", 0), "LD-ZNet keep largest: keep_largest must be an integer in "
                                                        "[1, 100000], got -3"),
    ("LD-ZNet detail steps", "20.5", ("detail_steps", 20), "LD-ZNet detail steps: detail pass: steps must be an "
                                                           "integer in [1, 1000], got 20.5"),
    ("LD-ZNet mask", "cat AND (dog", ("expression", "cat AND (dog"), "LD-ZNet mask: '(' is never closed: expected ')' "
                                                                     "at position 8"),
    ("LD-ZNet newer knob", "3", ("expression", "cat"), "LD-ZNet newer knob: not known to this version of the "
                                                       "extension, not restored"),
])
def test_a_bad_infotext_value_is_never_pasted_as_another(key, value, control, problem):
    """PNG Info on an image whose infotext was edited or written by another version: a value a control
    cannot hold leaves it as it was and is named (the accordion's status), instead of the host's
    conversion making it another ("false" a ticked checkbox, "nan" a slider's NaN, an unknown mode no choice)."""
    params = {"LD-ZNet mask": "cat", key: value}
    name, expected = control
    assert _host_paste(params)[name] == expected
    assert request.paste_problems(params) == ([problem] if problem else [])


def test_every_problem_of_a_paste_is_listed():
    params = {"LD-ZNet mask": "cat", "LD-ZNet threshold": "2", "LD-ZNet detail": "face", "LD-ZNet detail padding":
              "-1", "LD-ZNet warning": "the mask is empty", "LD-ZNet z": "1", "Steps": "20"}
    assert request.paste_problems(params) == [
        "LD-ZNet threshold: threshold must be a number in [0, 1), got 2",
        "LD-ZNet detail padding: detail pass: padding must be an integer in [0, 2048], got -1",
        "LD-ZNet z: not known to this version of the extension, not restored"]
    from ldznet_ext.webui import ui

    assert ui.paste_status(params) == ("<p class='ldznet-error'>PNG Info: not restored: LD-ZNet threshold: threshold "
                                       "must be a number in [0, 1), got 2; LD-ZNet detail padding: detail pass: padding "
                                       "must be an integer in [0, 2048], got -1; LD-ZNet z: not known to this version "
                                       "of the extension, not restored</p>")
    assert ui.paste_status({"LD-ZNet mask": "cat"}) == ui.paste_status({"Steps": "20"}) == ""  # clears an old one


def test_from_args_defaults_and_strings():
    assert from_args(["cat"]) == MaskJob("cat")
    assert from_args(("cat", None, "0.25", None, None, "false")) == MaskJob("cat", threshold=0.25)
    assert from_args([]).active is False
    assert from_args(["cat"]).refine_settings().enabled  # refinement is on unless switched off
    assert not from_args(["cat", *[None] * 6, "false"]).refine_settings().enabled


def test_from_args_with_the_newer_args():
    """Args 9-12 (keep_largest, min_area, refine_strength, refine_radius) reach the job; 0 keeps
    all objects and picks the radius automatically, as None does."""
    job = from_args(["cat", "zero-shot", 0.3, 2, 1, True, "add", False, 2, "50", 0.5, 12])
    assert job == MaskJob("cat", "zero-shot", 0.3, 2, 1, True, "add", False, 2, 50, 0.5, 12)
    assert job.mask_options() == MaskOptions(threshold=0.3, invert=True, keep_largest=2, min_area=50, feather=1.0)
    assert job.refine_settings() == RefineSettings(enabled=False, strength=0.5, radius=12.0)
    for unset in (0, 0.0, "0", None):
        assert from_args(["cat", *[None] * 7, unset, None, None, unset]) == MaskJob("cat")
    assert [request.control_value(job, name) for name in request.MASK_ARG_NAMES] == [
        "cat", "zero-shot", 0.3, 2.0, 1.0, True, "add", False, 2, 50, 0.5, 12.0, True]
    assert [request.control_value(MaskJob(), name) for name in request.ZERO_MEANS_NONE] == [0, 0]


@pytest.mark.parametrize("args", [
    ["cat", "LD-ZNet head", 0.4, 8, 4, False, "replace"],  # the README's example, 7 args
    ["cat", "zero-shot", "0.4", "-8", "4", "true", "Subtract", "false"],  # 8 args, as text
])
def test_todays_positional_args_give_todays_job(args):
    """7 and 8 args mean what they meant before the newer args were appended: the same fields,
    and the newer options at their defaults (which are the engine's behaviour before them)."""
    job = from_args(args)
    old = dict(zip(("expression", "mode", "threshold", "grow", "feather", "invert", "combine", "refine"),
                   (args[0], args[1], float(args[2]), float(args[3]), float(args[4]), str(args[5]).lower() == "true",
                    args[6].lower(), str(args[7]).lower() == "true" if len(args) > 7 else True)))
    assert job.as_dict() == {**old, "keep_largest": None, "min_area": 0, "refine_strength": 1.0,
                             "refine_radius": None, "presence": True}
    assert job.mask_options() == MaskOptions(threshold=old["threshold"], invert=old["invert"], feather=old["feather"])
    assert job.refine_settings() == RefineSettings(enabled=old["refine"])


def test_the_prompt_line_wins_over_the_accordion():
    job = MaskJob("sword", threshold=0.3, grow=2)
    assert request.with_prompt_line(job, "a knight\nmask: goblin") == MaskJob("goblin", threshold=0.3, grow=2)
    assert request.with_prompt_line(job, "a knight") is job
    assert request.with_prompt_line(job, None) is job
    assert request.with_prompt_line(MaskJob(), "mask: cat{+2}").expression == "cat{+2}"
    with pytest.raises(LdznetError, match="2 'mask:' lines"):
        request.with_prompt_line(job, "mask: a\nmask: b")


EIGHT = ["cat", "zero-shot", 0.5, 0, 0, False, "add", True]


@pytest.mark.parametrize("args, message", [
    ("cat", "args must be a list"),
    (["cat", "head"], "mode must be one of 'LD-ZNet head', 'zero-shot', got 'head'"),
    (["cat", "zero-shot", 1.0], r"^threshold must be a number in \[0, 1\), got 1.0$"),
    (["cat", "zero-shot", 0.5, 3000], r"^grow must be a number in \[-2048, 2048\], got 3000$"),
    (["cat", "zero-shot", 0.5, 0, -1], r"^feather must be a number in \[0, 256\], got -1$"),
    (["cat", "zero-shot", "x"], r"^threshold must be a number in \[0, 1\), got 'x'$"),
    (["cat", "zero-shot", 0.5, 0, 0, "yes"], "invert must be true or false, got 'yes'"),
    (["cat", "zero-shot", 0.5, 0, 0, False, "xor"], "combine must be one of"),
    ([1], "expression \\(arg 0\\) must be text"),
    (["cat", "zero-shot", 0.5, 0, 0, False, "add", "on"], "refine must be true or false, got 'on'"),
    ([*EIGHT, -1], r"^keep_largest must be an integer in \[1, 100000\], got -1$"),
    ([*EIGHT, None, 2.5], r"^min_area must be an integer in \[0, 1000000000\], got 2.5$"),
    ([*EIGHT, None, None, 2], r"^refine_strength must be a number in \[0, 1\], got 2$"),
    ([*EIGHT, None, None, None, 0.5], r"^refine_radius must be a number in \[1, 2048\], got 0.5$"),
    ([*EIGHT] * 3, "got 24 args, expected at most 18"),
    ([None] * (len(ARG_NAMES) + 1), f"^got {len(ARG_NAMES) + 1} args, expected at most {len(ARG_NAMES)}: "),
    (["cat OR"], "expected a term"),
])
def test_from_args_errors(args, message):
    with pytest.raises(LdznetError, match=message):
        from_args(args)


THIRTEEN = [*EIGHT, None, None, None, None, None]
"""Every mask arg: the detail pass's come after them."""


def test_the_detail_pass_args_come_after_the_mask_args():
    args = [*THIRTEEN, "face[1] OR hand", "a smiling face [SEP] a hand", "0.55", 12, "8"]
    assert from_args(args) == from_args(THIRTEEN) == MaskJob("cat", "zero-shot", 0.5, combine="add")
    assert request.detail_from_args(args) == DetailPass("face[1] OR hand", "a smiling face [SEP] a hand", 0.55, 12, 8)
    assert request.detail_from_args([*THIRTEEN, "face", None, None, None, None]) == DetailPass("face", "", 0.4, 20, 32)
    assert not request.detail_from_args(THIRTEEN).active and not request.detail_from_args([*THIRTEEN, " "]).active


@pytest.mark.parametrize("detail, message", [
    (["face", "", 0], r"^detail pass: denoising must be a number in \(0, 1\], got 0$"),
    (["face", "", 0.5, 0], r"^detail pass: steps must be an integer in \[1, 1000\], got 0$"),
    (["face", "", 0.5, 20, -1], r"^detail pass: padding must be an integer in \[0, 2048\], got -1$"),
    (["face", "", 0.5, "many"], r"^detail pass: steps must be an integer in \[1, 1000\], got 'many'$"),
    (["face OR"], r"^detail pass: expected a term or '\(' after 'OR', found the end of the text at position 7$"),
    ([3], r"^detail_expression \(arg 13\) must be text, got 3$"),
    (["face", ["a", "b"]], r"^detail_prompts \(arg 14\) must be text"),
])
def test_detail_pass_arg_errors(detail, message):
    with pytest.raises(LdznetError, match=message):
        request.detail_from_args([*THIRTEEN, *detail])


def test_detail_pass_infotext_round_trip():
    """A txt2img with only the detail pass records the mask settings it masks with (not an empty
    expression), and PNG Info puts every control back; an image without a pass turns it off."""
    job = MaskJob(threshold=0.4, feather=3)
    detail = DetailPass("face[1]", "a smiling face, detailed [SEP] an old face", 0.35, 12, 16)
    params = infotext(job, detail)
    assert params == {"LD-ZNet mode": "LD-ZNet head", "LD-ZNet threshold": "0.4", "LD-ZNet grow": "0",
                      "LD-ZNet feather": "3", "LD-ZNet invert": "False", "LD-ZNet combine": "replace",
                      "LD-ZNet refine": "True", "LD-ZNet detail": "face[1]",
                      "LD-ZNet detail prompts": "a smiling face, detailed [SEP] an old face",
                      "LD-ZNet detail denoising": "0.35", "LD-ZNet detail steps": "12", "LD-ZNet detail padding": "16"}
    assert request.detail_from_infotext(params) == detail and from_infotext(params) is None
    pasted = [request.pasted_value(params, name) for name in request.ARG_NAMES]
    assert request.detail_from_args(pasted) == detail and from_args(pasted) == job
    assert "LD-ZNet detail prompts" not in infotext(job, DetailPass("face"))
    assert infotext(job) == infotext(job, DetailPass()) == {}
    assert infotext(MaskJob("cat"), DetailPass()) == infotext(MaskJob("cat"))
    assert request.detail_from_infotext(OLD_INFOTEXT) is None
    assert not request.detail_from_args([request.pasted_value(OLD_INFOTEXT, name) for name in request.ARG_NAMES]).active


def test_combine_modes_on_hand_arrays():
    ours = np.array([[0, 255, 255, 0, 128]], np.uint8)
    brush = np.array([[255, 255, 0, 0, 255]], np.uint8)
    assert combine(ours, brush, "replace").tolist() == [[0, 255, 255, 0, 128]]
    assert combine(ours, brush, "add").tolist() == [[255, 255, 255, 0, 255]]
    assert combine(ours, brush, "subtract").tolist() == [[0, 0, 255, 0, 0]]
    assert combine(ours, brush, "intersect").tolist() == [[0, 255, 0, 0, 128]]
    assert combine(ours, None, "intersect").tolist() == ours.tolist()
    with pytest.raises(LdznetError, match="brush mask is 2x1 but the image is 5x1"):
        combine(ours, brush[:, :2], "add")


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _ready(job):
    pass


def test_check_generation():
    args = {"alwayson_scripts": {"LD-ZNet Mask": {"args": ["cat", "zero-shot", 2]}}, "init_images": ["x"]}
    with pytest.raises(api.ApiError, match=r"alwayson_scripts\['ld-znet mask'\].args: threshold") as caught:
        api.check_generation(args, True, _ready)
    assert caught.value.status == 422
    with pytest.raises(api.ApiError, match="prompt: '\\(' is never closed"):
        api.check_generation({"prompt": "x\nmask: (cat", "init_images": ["x"]}, True, _ready)
    with pytest.raises(api.ApiError, match="^init_images: img2img has no init image to mask$"):
        api.check_generation({"prompt": "mask: cat"}, True, _ready)
    with pytest.raises(api.ApiError, match="^init_images: img2img got 2 init images, but the host inpaints them all"):
        api.check_generation({"prompt": "mask: cat", "init_images": ["x", "y"]}, True, _ready)
    api.check_generation({"prompt": "cat", "init_images": ["x", "y"]}, True, _ready)  # no mask: the host's affair
    with pytest.raises(api.ApiError, match="args must be a list"):
        api.check_generation({"alwayson_scripts": {"ld-znet mask": {"args": "cat"}}}, False, _ready)

    def not_ready(job):
        raise LdznetError(f"no head for {job.expression}")

    with pytest.raises(api.ApiError, match="no head for cat"):
        api.check_generation({"prompt": "mask: cat", "init_images": ["x"]}, True, not_ready)
    api.check_generation({"prompt": "no mask", "alwayson_scripts": {"other": {"args": [1]}}}, True, not_ready)


def test_a_mask_line_in_the_negative_prompt_is_refused():
    """Nothing masks by it, and the sampler would get the expression as words to avoid."""
    request.check_negative_prompt("blurry, masked ball, mask: inline is text")
    request.check_negative_prompt(None)
    with pytest.raises(LdznetError, match="^the negative prompt has a 'mask:' line; move it to the prompt"):
        request.check_negative_prompt("blurry\n  Mask : goblin")
    payload = {"prompt": "a knight", "negative_prompt": "blurry\nmask: goblin"}
    with pytest.raises(api.ApiError, match="^negative_prompt: the negative prompt has a 'mask:' line") as caught:
        api.check_generation(payload, False, _ready)
    assert caught.value.status == 422
    api.check_generation({"prompt": "a knight\nmask: goblin", "negative_prompt": "blurry"}, False, _ready)
    with pytest.raises(api.ApiError, match="^hr_negative_prompt: the negative prompt has a 'mask:' line"):
        api.check_generation({"prompt": "a knight", "hr_negative_prompt": "mask: goblin"}, False, _ready)


def test_mask_response_validation():
    image = _b64(Image.new("RGB", (8, 6)))
    cases = [({"image": image}, 422, "expression is required"),
             ({"image": image, "expression": "cat", "colour": 1}, 422, "unknown fields \\['colour'\\]"),
             ({"image": "!!", "expression": "cat"}, 422, "image is not valid base64"),
             ({"image": base64.b64encode(b"not a png").decode(), "expression": "cat"}, 422, "not an image"),
             ({"image": image, "expression": "cat", "mask": _b64(Image.new("L", (4, 4)))}, 422, "mask is 4x4"),
             ({"image": image, "expression": "cat", "threshold": -1}, 422, "threshold must be")]
    for payload, status, message in cases:
        with pytest.raises(api.ApiError, match=message) as caught:
            api.mask_response(payload, None, _ready)
        assert caught.value.status == status
    with pytest.raises(api.ApiError, match="pixels; the limit is 40") as caught:
        api.decode_image(image, "image", max_pixels=40)
    assert caught.value.status == 413


def _job_of(payload: dict) -> MaskJob:
    """The job POST /ldznet/v1/mask hands to compute for ``payload`` (with a small image)."""
    seen = []

    def compute(image, job, brush):
        seen.append(job)
        mask = np.zeros(image.shape[:2], np.uint8)
        return SimpleNamespace(mask=mask, prediction=SimpleNamespace(expression=job.expression,
                                                                     presence_report=lambda: {},
                                                                     probability_image=lambda: mask.astype(np.uint16),
                                                                     instances=lambda: []))

    api.mask_response({"image": _b64(Image.new("RGB", (8, 6))), **payload}, compute, _ready)
    return seen[0]


def test_todays_mask_body_gives_todays_job():
    """The README's body of POST /ldznet/v1/mask: every field as before, the newer ones at their
    defaults; null still means the default."""
    body = {"expression": "goblin  OR sword", "mode": "zero-shot", "threshold": 0.4, "grow": 8, "feather": 4,
            "invert": True, "combine": "add", "refine": False}
    assert _job_of(body).as_dict() == {**body, "expression": "goblin OR sword", "grow": 8.0, "feather": 4.0,
                                       "keep_largest": None, "min_area": 0, "refine_strength": 1.0,
                                       "refine_radius": None, "presence": True}
    assert _job_of({"expression": "cat", "threshold": None, "refine": None}) == MaskJob("cat")


def test_mask_body_takes_the_newer_fields_by_name():
    body = {"expression": "cat", "keep_largest": 2, "min_area": 30, "refine_strength": 0.5, "refine_radius": 6}
    assert _job_of(body) == MaskJob("cat", keep_largest=2, min_area=30, refine_strength=0.5, refine_radius=6.0)
    with pytest.raises(api.ApiError, match=r"^keep_largest must be an integer in \[1, 100000\], got 0$") as caught:
        _job_of({"expression": "cat", "keep_largest": 0})
    assert caught.value.status == 422


def test_schema_route():
    schema = api.schema_response()
    assert schema["job"] == MaskJob.json_schema()
    assert schema["script_args"] == list(request.ARG_NAMES)
    assert list(request.MASK_ARG_NAMES) == list(MaskJob.field_names())
    assert schema["script_args"][len(request.MASK_ARG_NAMES):] == [
        "detail_expression", "detail_prompts", "detail_denoising", "detail_steps", "detail_padding"]
    assert schema["script_args"][:8] == ["expression", "mode", "threshold", "grow", "feather", "invert", "combine",
                                         "refine"]
    assert (schema["image_fields"], schema["script_args_zero_is_null"]) == (["image", "mask"],
                                                                            ["keep_largest", "refine_radius"])
    assert json.loads(json.dumps(schema)) == schema


def test_generation_check_uses_the_prompt_line_first():
    """The pre-generation check validates the job the script will run: the prompt's line, not the args'."""
    seen = []
    payload = {"prompt": "a\nmask: goblin", "init_images": ["x"],
               "alwayson_scripts": {"LD-ZNet mask": {"args": ["sword", "zero-shot", 0.3]}}}
    api.check_generation(payload, True, seen.append)
    assert seen == [MaskJob("goblin", "zero-shot", 0.3)]


def test_generation_check_validates_the_detail_pass():
    """A txt2img with only a detail pass is checked (its mask job, the accordion's settings with the
    pass's expression); bad detail args are a 422 naming the pass."""
    seen = []
    args = [*THIRTEEN[:1], None, 0.3, *[None] * 10]
    payload = {"prompt": "a knight", "alwayson_scripts": {"LD-ZNet mask": {"args": ["", *args[1:], "face[1]"]}}}
    api.check_generation(payload, False, seen.append)
    assert seen == [MaskJob("face[1]", threshold=0.3)]
    payload["alwayson_scripts"]["LD-ZNet mask"]["args"] += ["", 2]
    with pytest.raises(api.ApiError, match=r"args: detail pass: denoising must be a number in \(0, 1\], got 2$"):
        api.check_generation(payload, False, seen.append)


def _asgi(guard, path, body: bytes, headers=()):
    """Drive an ASGI app with one request; returns (status, body, body the inner app received)."""
    seen, sent = {}, []
    chunks = [body[:3], body[3:]]

    async def inner(scope, receive, send):
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen["body"] = b"".join(parts)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    guard.app = inner
    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], seen.get("body")


def test_api_guard():
    def check(payload, is_img2img):
        api.check_generation(payload, is_img2img, _ready)

    guard = api.ApiGuard(None, check, {"u": "p"}, max_bytes=100)
    auth = [(b"authorization", b"Basic " + base64.b64encode(b"u:p"))]
    good = json.dumps({"prompt": "cat"}).encode()
    assert _asgi(guard, "/sdapi/v1/img2img", good, auth) == (200, b"ok", good)
    bad = json.dumps({"alwayson_scripts": {"ld-znet mask": {"args": ["cat", "nope"]}}}).encode()
    status, body, seen = _asgi(guard, "/sdapi/v1/txt2img", bad, auth)
    assert (status, seen) == (422, None) and "mode must be one of" in json.loads(body)["detail"]
    assert _asgi(guard, "/sdapi/v1/txt2img", bad) == (200, b"ok", bad)  # the host's auth answers it
    assert _asgi(guard, "/ldznet/v1/mask", b"{}")[0] == 401
    assert _asgi(guard, "/ldznet/v1/mask", b"{}", auth) == (200, b"ok", b"{}")
    status, body, _ = _asgi(guard, "/ldznet/v1/mask", b"x" * 101, auth)
    assert status == 413 and "limit of 100 bytes" in json.loads(body)["detail"]
    assert _asgi(guard, "/sdapi/v1/img2img", b"not json", auth)[:2] == (200, b"ok")


def test_expression_error_position():
    with pytest.raises(ExpressionError) as caught:
        MaskJob("cat AND")
    assert caught.value.position == 7


def test_the_script_named_twice_is_refused():
    """The host finds scripts by lower-case title and runs the last entry's args, so checking the first
    let bad args through to the generation (its error only in the infotext)."""
    payload = {"prompt": "x", "alwayson_scripts": {"LD-ZNet mask": {"args": ["cat"]},
                                                   "ld-znet mask": {"args": ["cat", "nope"]}}}
    with pytest.raises(api.ApiError) as caught:
        api.check_generation(payload, False, lambda job: None)
    assert (caught.value.status, caught.value.detail) == (
        422, "alwayson_scripts names the LD-ZNet script 2 times ('LD-ZNet mask', 'ld-znet mask'); send its args once")


def test_the_readme_lists_the_script_args_in_order() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"`alwayson_scripts` args, in order: `\[([^\]]*)\]`", readme).group(1)
    assert tuple(" ".join(listed.split()).split(", ")) == ARG_NAMES
    assert f"after the {len(request.MASK_ARG_NAMES)} mask args" in " ".join(readme.split())


def _host_infotext_round_trip(params: dict[str, str]) -> dict[str, str]:
    """A1111's infotext rule for a value: written as JSON when it holds a comma, colon or line break,
    else as it is; read back through JSON when it starts and ends with a double quote."""
    def write(text: str) -> str:
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    def read(text: str) -> str:
        if len(text) >= 2 and text[0] == text[-1] == '"':
            try:
                return json.loads(text)
            except ValueError:
                return text
        return text

    return {key: read(write(value)) for key, value in params.items()}


@pytest.mark.parametrize("expression", ['"rock & roll"', '"black cat"', '"a, b" OR c', 'c OR "d"', "plain"])
def test_infotext_keeps_quoted_terms_through_the_hosts_quoting(expression):
    """'"rock & roll"' came back as 'rock & roll': the AND of two terms, another mask."""
    job = MaskJob(expression)
    detail = DetailPass(expression, prompts='"a hand"')
    params = _host_infotext_round_trip(infotext(job, detail))
    assert from_infotext(params).expression == job.expression
    assert request.detail_from_infotext(params) == detail
