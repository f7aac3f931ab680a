"""The WebUI side of a mask job (:class:`ldznet_ext.job.MaskJob`): script args (UI or API), infotext,
the ``mask: <expression>`` line of a prompt and which expression wins, and how the mask meets the
user's brush. Pure Python: no WebUI, no gradio.

Script args are positional (the order of ``ARG_NAMES``), as the host passes component values and
as API clients send ``alwayson_scripts: {"ld-znet mask": {"args": [...]}}``. Fields added later go
at the end, so older arg lists keep their meaning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

import numpy as np

from ..detail import DetailPass
from ..errors import ExpressionError, LdznetError
from ..job import COMBINE_MODES, MaskJob, checked_choice

TITLE = "LD-ZNet mask"
MASK_ARG_NAMES = MaskJob.field_names()
"""The args of the mask job: :class:`MaskJob`'s fields, in order (a new field is a new last arg)."""
DETAIL_ARG_NAMES = ("detail_expression", "detail_prompts", "detail_denoising", "detail_steps", "detail_padding")
"""The args of the detail pass (:class:`DetailPass`'s fields, prefixed)."""
ARG_NAMES = MASK_ARG_NAMES + DETAIL_ARG_NAMES
ZERO_MEANS_NONE = ("keep_largest", "refine_radius")
"""Script args whose 0 stands for None (all objects, automatic radius): a number box cannot be empty."""
_TEXT_ARG_NAMES = ("expression", "detail_expression", "detail_prompts")
"""Script args that are text, where "" means none (no mask, no pass, the generation's prompt)."""

INFOTEXT_KEYS = {
    "expression": "LD-ZNet mask",
    "mode": "LD-ZNet mode",
    "threshold": "LD-ZNet threshold",
    "grow": "LD-ZNet grow",
    "feather": "LD-ZNet feather",
    "invert": "LD-ZNet invert",
    "combine": "LD-ZNet combine",
    "refine": "LD-ZNet refine",
    "keep_largest": "LD-ZNet keep largest",
    "min_area": "LD-ZNet min area",
    "refine_strength": "LD-ZNet refine strength",
    "refine_radius": "LD-ZNet refine radius",
    "presence": "LD-ZNet presence",
    "detail_expression": "LD-ZNet detail",
    "detail_prompts": "LD-ZNet detail prompts",
    "detail_denoising": "LD-ZNet detail denoising",
    "detail_steps": "LD-ZNet detail steps",
    "detail_padding": "LD-ZNet detail padding",
}
"""Infotext key of each setting; the expression's key is the accordion's title. The detail keys are
written only for a generation with a detail pass."""
WRITTEN_WHEN_SET = ("keep_largest", "min_area", "refine_strength", "refine_radius", "presence")
"""Infotext keys written only when not the default, so a job that leaves them alone reads as before."""
WARNING_KEY = "LD-ZNet warning"
DETAIL_WARNING_KEY = "LD-ZNet detail warning"
ERROR_KEY = "LD-ZNet error"
"""Infotext keys of a warning and of an error: the host's API answer carries the infotext
parameters, not the comments, also when a stopped generation returns no images."""
_INFOTEXT_PREFIX = "LD-ZNet "

_MASK_LINE = re.compile(r"^[ \t]*mask[ \t]*:(.*)(?:\n|$)", re.IGNORECASE | re.MULTILINE)
# An extra-network tag as both WebUIs find them in prompts (modules/extra_networks.py: <lora:name:0.8>).
_EXTRA_NETWORK_TAG = re.compile(r"<\w+:[^>]+>")


def _job(values: Mapping[str, object]) -> MaskJob:
    """A job from WebUI values by field name (the mask's; others are ignored): None takes the
    default, 0 of ZERO_MEANS_NONE is None."""
    kept = {name: value for name, value in values.items() if value is not None and name in MASK_ARG_NAMES}
    for name in ZERO_MEANS_NONE:
        if name in kept and _is_zero(kept[name]):
            del kept[name]
    return MaskJob(**kept)


def _is_zero(value) -> bool:
    try:
        return not isinstance(value, bool) and float(value) == 0
    except (TypeError, ValueError):
        return False


def _values(args: Sequence) -> dict[str, object]:
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise LdznetError(f"args must be a list in the order {list(ARG_NAMES)}, got {type(args).__name__}")
    if len(args) > len(ARG_NAMES):
        raise LdznetError(f"got {len(args)} args, expected at most {len(ARG_NAMES)}: {list(ARG_NAMES)}")
    values = dict(zip(ARG_NAMES, args))
    for name in _TEXT_ARG_NAMES:
        if not isinstance(values.get(name, ""), (str, type(None))):
            raise LdznetError(f"{name} (arg {ARG_NAMES.index(name)}) must be text, got {values[name]!r}")
    return values


def from_args(args: Sequence) -> MaskJob:
    """The job of positional script args in ARG_NAMES order; missing trailing args take defaults,
    None means "default" (the host fills unsent API args with the UI's defaults)."""
    return _job(_values(args))


def detail_from_args(args: Sequence) -> DetailPass:
    """The detail pass of positional script args (ARG_NAMES order; missing or None: defaults, which
    leave it off)."""
    return _detail(_values(args))


def _detail(values: Mapping[str, object]) -> DetailPass:
    """The detail pass of WebUI values by arg name; None takes the default; errors say "detail pass"."""
    kept = {name.removeprefix("detail_"): value for name, value in values.items()
            if name in DETAIL_ARG_NAMES and value is not None}
    try:
        return DetailPass(**kept)
    except ExpressionError as error:
        raise ExpressionError(f"detail pass: {error}") from None  # the position is in the message
    except LdznetError as error:
        raise LdznetError(f"detail pass: {error}") from None


def control_value(job: MaskJob, name: str):
    """The script arg (control value) of field ``name`` for ``job``: 0 for None in ZERO_MEANS_NONE."""
    value = getattr(job, name)
    return 0 if value is None and name in ZERO_MEANS_NONE else value


def infotext(job: MaskJob, detail: DetailPass | None = None) -> dict[str, str]:
    """Infotext parameters of ``job`` and ``detail`` (the host quotes values that need it): the
    mask's settings when either is active (the pass masks with them), its expression when it has
    one; the pass's settings when it is active (its prompts when there are any)."""
    detail = detail or DetailPass()
    if not (job.active or detail.active):
        return {}
    default = MaskJob()
    written = [name for name in MASK_ARG_NAMES if (name not in WRITTEN_WHEN_SET or getattr(job, name) !=
                                                   getattr(default, name)) and (name != "expression" or job.active)]
    params = {INFOTEXT_KEYS[name]: _format(getattr(job, name)) for name in written}
    if detail.active:
        params.update({INFOTEXT_KEYS[name]: _format(getattr(detail, name.removeprefix("detail_")))
                       for name in DETAIL_ARG_NAMES if name != "detail_prompts" or detail.prompts})
    return params


def from_infotext(params: Mapping[str, str]) -> MaskJob | None:
    """The job recorded in parsed infotext, or None when it holds no LD-ZNet mask. Keys it lacks
    (older images have no WRITTEN_WHEN_SET keys) take their defaults."""
    if not params.get(INFOTEXT_KEYS["expression"]):
        return None
    return _job(_recorded(params))


def detail_from_infotext(params: Mapping[str, str]) -> DetailPass | None:
    """The detail pass recorded in parsed infotext, or None when there was none."""
    if not params.get(INFOTEXT_KEYS["detail_expression"]):
        return None
    return _detail(_recorded(params))


def _recorded(params: Mapping[str, str]) -> dict[str, str]:
    """{arg name: value} of the LD-ZNet keys in parsed infotext ``params``."""
    return {name: params[key] for name, key in INFOTEXT_KEYS.items() if key in params}


def pasted_value(params: Mapping[str, str], name: str) -> str | bool | int | float | None:
    """What PNG Info and the send-to buttons put into the control of field ``name``: the recorded
    value as the control holds it (a bool, a number, a choice as the control spells it, text); when
    the infotext has none, "" for the expressions and the detail prompts (no mask, no pass) and the
    control's default for WRITTEN_WHEN_SET and the detail pass's numbers (so an image made without
    them resets them); otherwise None, which leaves the control as it is. A recorded value the field
    refuses is None too (:func:`paste_problems` says so): the host would turn it into another value
    ("false" or "no" into a ticked checkbox, "nan" into a slider's NaN). Text is pasted as recorded."""
    key = INFOTEXT_KEYS[name]
    if key in params:
        if name in _TEXT_ARG_NAMES:
            return params[key] if isinstance(params[key], str) else None
        try:
            return _control(name, params[key])
        except LdznetError:
            return None
    if name in _TEXT_ARG_NAMES:
        return ""
    if name in DETAIL_ARG_NAMES:
        return getattr(DetailPass(), name.removeprefix("detail_"))
    return control_value(MaskJob(), name) if name in WRITTEN_WHEN_SET else None


class PasteKey(str):
    """The infotext field of control ``name`` as the host needs it: the key text (``INFOTEXT_KEYS``) that
    is also the function reading it (:func:`pasted_value`). The host calls a callable field to paste PNG
    Info and an API request's ``infotext`` (so a value is checked and a missing one gets its default,
    never the host's conversion: ``bool("false")`` ticks a checkbox), and it matches string fields
    against the script's ``paste_field_names`` to copy controls with "Send to img2img": a plain
    function would be left behind there, a plain string pasted unchecked."""

    name: str

    def __new__(cls, name: str) -> PasteKey:
        key = super().__new__(cls, INFOTEXT_KEYS[name])
        key.name = name
        return key

    def __call__(self, params: Mapping[str, str]) -> str | bool | int | float | None:
        return pasted_value(params, self.name)


def _control(name: str, recorded):
    """The control value of field ``name`` recorded as ``recorded``, checked as the job or the pass checks it."""
    if name in DETAIL_ARG_NAMES:
        return getattr(_detail({name: recorded}), name.removeprefix("detail_"))
    return control_value(_job({name: recorded}), name)


def paste_problems(params: Mapping[str, str]) -> list[str]:
    """What PNG Info cannot restore from parsed infotext ``params``, one entry each: a recorded value
    its field refuses (the control is left as it is; text is pasted and refused when it is used) and
    LD-ZNet keys this version does not know (an image made by a newer one)."""
    problems = []
    for name, key in INFOTEXT_KEYS.items():
        if key in params:
            try:
                _control(name, params[key])
            except LdznetError as error:
                problems.append(f"{key}: {error}")
    known = {*INFOTEXT_KEYS.values(), WARNING_KEY, DETAIL_WARNING_KEY, ERROR_KEY}
    unknown = [key for key in params if isinstance(key, str) and key.startswith(_INFOTEXT_PREFIX) and key not in known]
    if unknown:
        problems.append(f"{', '.join(unknown)}: not known to this version of the extension, not restored")
    return problems


def _format(value) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)  # "0.35", but never a rounded value
    text = str(value)
    # The host quotes a value only for a comma, colon or line break, but reads any value between double
    # quotes as JSON: a quoted term ("rock & roll") would come back without its quotes (rock AND roll).
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return json.dumps(text, ensure_ascii=False)
    return text


def split_mask_line(prompt: str) -> tuple[str, str | None]:
    """(prompt without its ``mask: <expression>`` line, the expression or None).

    The line may stand anywhere in the prompt; "mask:" is case-insensitive. Two mask lines are an
    error, since which one wins would be a guess. Extra-network tags on the line (``<lora:name:0.8>``)
    stay in the prompt, in the line's place: they are the generation's (masks use the checkpoint alone).
    """
    found = _MASK_LINE.findall(prompt)
    if not found:
        return prompt, None
    if len(found) > 1:
        raise LdznetError(f"the prompt has {len(found)} 'mask:' lines; write one, e.g. 'mask: cat OR dog'")
    tags = " ".join(_EXTRA_NETWORK_TAG.findall(found[0]))
    expression = " ".join(_EXTRA_NETWORK_TAG.sub(" ", found[0]).split())
    if not expression:
        raise LdznetError("the prompt's 'mask:' line is empty; write the expression after it, e.g. 'mask: cat'")
    rest = _MASK_LINE.sub(lambda line: tags + "\n" * (bool(tags) and line.group(0).endswith("\n")), prompt)
    return rest.strip(), expression


def check_init_images(count: int) -> None:
    """LdznetError unless a masked img2img has exactly one init image: the host inpaints every image
    of the request with the one mask, which is made for the first."""
    if count == 0:
        raise LdznetError("img2img has no init image to mask")
    if count > 1:
        raise LdznetError(f"img2img got {count} init images, but the host inpaints them all with one mask, "
                          "made for the first; send one image per request (or use the Batch tab)")


NEGATIVE_PROMPTS = ("negative_prompt", "hr_negative_prompt")
"""A generation's negative prompts by their names on ``p`` and in API bodies (the hires pass's own, when set)."""


def check_negative_prompt(negative_prompt: str | None) -> None:
    """LdznetError when the negative prompt has a ``mask:`` line: nothing masks by it, and the
    sampler would be given the expression as words to avoid, so a line typed into the wrong box
    would cost a whole generation without the mask the user asked for."""
    if isinstance(negative_prompt, str) and _MASK_LINE.search(negative_prompt):
        raise LdznetError("the negative prompt has a 'mask:' line; move it to the prompt (only the prompt's "
                          "line sets the mask)")


def with_prompt_line(job: MaskJob, prompt: str | None) -> MaskJob:
    """The job a generation with ``prompt`` runs, and Preview shows: a ``mask:`` line in the prompt
    replaces the accordion's expression; every other setting stays the accordion's. Without a line
    (or a prompt) the accordion's expression applies."""
    expression = split_mask_line(prompt)[1] if isinstance(prompt, str) else None
    return job if expression is None else job.replace(expression=expression)


def combine(mask: np.ndarray, brush: np.ndarray | None, mode: str) -> np.ndarray:
    """Combine our mask with a brush/uploaded mask, both uint8 [H, W] (255 = repaint).

    replace: ours; add: union (max); subtract: ours minus the brush; intersect: min. Without a
    brush mask every mode returns ours. Soft (feathered) values combine as fuzzy sets.
    """
    mode = checked_choice(mode, "combine", COMBINE_MODES)
    if brush is None or mode == "replace":
        return mask.copy()
    if brush.shape != mask.shape:
        raise LdznetError(f"the brush mask is {brush.shape[1]}x{brush.shape[0]} but the image is "
                          f"{mask.shape[1]}x{mask.shape[0]}; they must be the same size")
    if mode == "add":
        return np.maximum(mask, brush)
    if mode == "intersect":
        return np.minimum(mask, brush)
    return np.minimum(mask, 255 - brush)
