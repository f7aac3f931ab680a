"""The always-visible "LD-ZNet mask" script for txt2img and img2img (imported by scripts/ldznet.py).

img2img (all single-image modes and the Batch tab): ``process`` computes the mask on the init
image and sets ``p.image_mask`` before ``p.init()`` reads it. txt2img: the accordion feeds the
"send to inpaint" button and, with the setting on, a mask saved beside every generated image.
A ``mask: <expression>`` line in the prompt replaces the accordion's expression
(:func:`request.with_prompt_line`, as in Preview) and is removed from the prompts the sampler
sees. The settings go into the infotext and come back through PNG Info. An image whose final mask
(after meeting the brush) is empty is not generated: ``p.n_iter`` 0 makes the host's sampling loop
run no batch (unlike an interruption, the Batch tab goes on with its next image), and the reason is
in the comments and the infotext. The detail pass (txt2img and img2img) repaints each instance of
its own expression on every generated image, after the host's composite (:mod:`.detail_pass`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from modules import scripts, shared
from PIL import Image

from ..errors import LdznetError, unexpected
from ..job import MaskJob
from ..outputs import write_mask
from . import detail_pass, host, xyz
from .request import (DETAIL_WARNING_KEY, ERROR_KEY, NEGATIVE_PROMPTS, TITLE, WARNING_KEY, check_init_images,
                      check_negative_prompt, detail_from_args, from_args, infotext, split_mask_line, with_prompt_line)

MASK_SUFFIX = "-ldznet-mask"
_PROMPT_LISTS = ("all_prompts", "all_hr_prompts")
SOFT_INPAINTING = "soft inpainting"  # the built-in script's title, lower-case


def main_prompt(p, name: str = "prompt") -> str:
    """The prompt (``name`` "negative_prompt": the negative prompt) of ``p``'s first image, after the
    host's setup_prompts: the one whose ``mask:`` line counts."""
    main = getattr(p, f"main_{name}", None) or getattr(p, name, "")
    return main if isinstance(main, str) else (main[0] if main else "")


def strip_mask_lines(p) -> None:
    """Remove the ``mask:`` line from every prompt of ``p`` when the main prompt has one.
    ``p.prompt`` is left as typed, so a reused ``p`` (img2img Batch tab) finds the line again for
    every image."""
    if split_mask_line(main_prompt(p))[1] is None:
        return
    for name in _PROMPT_LISTS:
        prompts = getattr(p, name, None)
        if prompts:
            setattr(p, name, [split_mask_line(x)[0] for x in prompts])
    if getattr(p, "main_prompt", None) is not None:
        p.main_prompt = split_mask_line(p.main_prompt)[0]


def brush_mask(p, size: tuple[int, int]) -> np.ndarray | None:
    """The user's own mask on ``p`` (inpaint brush, uploaded mask, batch mask folder) as uint8
    [H, W] at ``size`` = (W, H), read the way ``p.init()`` will read it; None when there is none or
    when it is the mask this script set for the previous image of a batch."""
    mask = getattr(p, "image_mask", None)
    if mask is None or mask is getattr(p, "_ldznet_mask", None):
        return None
    from modules import processing

    # p.init() rounds an alpha mask unless Soft Inpainting, on and given a mask, turned rounding off in
    # its process(), which runs after ours (metadata.ini): so its switch is read here.
    rounded = getattr(p, "mask_round", True) and not soft_inpainting_on(p)
    mask = processing.create_binary_mask(mask, round=rounded)
    if mask.size != size:
        mask = mask.resize(size, Image.BILINEAR)
    return np.asarray(mask, dtype=np.uint8)


def soft_inpainting_on(p) -> bool:
    """Whether the host's built-in Soft Inpainting (A1111 and Forge) is switched on for ``p``: the
    first of its script args, found by its title as the host's API finds scripts."""
    for other in getattr(getattr(p, "scripts", None), "alwayson_scripts", ()):
        if other.title().lower() == SOFT_INPAINTING:
            args = (getattr(p, "script_args", None) or ())[other.args_from:other.args_to]
            return bool(args) and bool(args[0])
    return False


def warn(p, key: str, warning: str) -> None:
    """A visible warning: in the comments, the infotext (under ``key``) and on stderr."""
    p.extra_generation_params[key] = warning
    p.comment(f"{TITLE}: {warning}")
    print(f"{TITLE}: {warning}", file=sys.stderr)


def fail(p, error: Exception | str) -> None:
    """Stop the generation with a visible reason: inpainting the wrong area is worse than nothing."""
    message = f"{TITLE}: {error}"
    print(message, file=sys.stderr)
    p.comment(message)
    p.extra_generation_params[ERROR_KEY] = str(error)
    shared.state.interrupted = True


class LdznetScript(scripts.Script):
    """Text-prompted inpainting masks (the accordion "LD-ZNet mask")."""

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        from . import ui

        return ui.build_accordion(self, is_img2img)

    def process(self, p, *args) -> None:
        try:
            for name in NEGATIVE_PROMPTS:
                check_negative_prompt(main_prompt(p, name))
            job = xyz.apply(with_prompt_line(from_args(args), main_prompt(p)), p)
            detail = detail_from_args(args)
            strip_mask_lines(p)
            p._ldznet_job = job if job.active else None
            p._ldznet_detail = (job, detail) if detail.active else None
            p.extra_generation_params.update(infotext(job, detail))
            if job.active and self.is_img2img:
                self._set_mask(p, job)
        except LdznetError as error:
            fail(p, error)
        except Exception as error:  # noqa: BLE001 - the host would log it and inpaint the whole image, unmasked
            fail(p, unexpected(error))

    def _set_mask(self, p, job: MaskJob) -> None:
        check_init_images(len(getattr(p, "init_images", None) or ()))
        image = p.init_images[0]
        result = host.compute(image, job, brush_mask(p, image.size))
        p._ldznet_mask = p.image_mask = Image.fromarray(result.mask, "L")
        if not hasattr(p, "_ldznet_n_iter"):  # a reused p (Batch tab): every image starts from the user's count
            p._ldznet_n_iter = p.n_iter
        p.n_iter = p._ldznet_n_iter
        if result.mask.any():
            p.extra_generation_params.pop(WARNING_KEY, None)  # a reused p: the previous image's
        else:
            warn(p, WARNING_KEY, f"the mask is empty ({result.empty_reason(job)}): the image was not inpainted")
            p.n_iter = 0  # postprocess restores it
        # A blank mask makes p.init() switch "only masked" off on this p; a reused p (Batch tab)
        # must start every image from the user's choice.
        if not hasattr(p, "_ldznet_full_res"):
            p._ldznet_full_res = p.inpaint_full_res
        p.inpaint_full_res = p._ldznet_full_res

    def postprocess(self, p, processed, *args) -> None:
        """The user's batch count back on ``p``, which the Batch tab reuses (its prompts are set up from it)."""
        if hasattr(p, "_ldznet_n_iter"):
            p.n_iter = p._ldznet_n_iter

    def postprocess_image_after_composite(self, p, pp, *args) -> None:
        self._detail(p, pp)
        job = getattr(p, "_ldznet_job", None)
        if job is None:
            return
        try:
            if not host.setting("ldznet_save_masks"):
                return
            result = host.compute(pp.image, job.replace(combine="replace"))
        except LdznetError as error:
            print(f"{TITLE}: mask not saved: {error}", file=sys.stderr)
            return
        p._ldznet_pending = (pp.image, result.mask)

    def _detail(self, p, pp) -> None:
        """The detail pass on the composited image (the whole image, also after "only masked")."""
        planned = getattr(p, "_ldznet_detail", None)
        if planned is None or shared.state.interrupted:
            return
        p.extra_generation_params.pop(DETAIL_WARNING_KEY, None)  # a reused p or a batch: the previous image's
        try:
            pp.image, warning = detail_pass.run(p, pp.image, *planned)
        except LdznetError as error:
            warn(p, DETAIL_WARNING_KEY, f"the detail pass stopped: {error}")
            return
        if warning is not None:
            warn(p, DETAIL_WARNING_KEY, warning)


def save_pending_mask(params) -> None:
    """on_image_saved: write the mask computed for the image just saved, beside it."""
    pending = getattr(params.p, "_ldznet_pending", None)
    if pending is None or pending[0] is not params.image:
        return
    params.p._ldznet_pending = None
    path = Path(params.filename)
    write_mask(path.with_name(path.stem + MASK_SUFFIX + ".png"), pending[1])
