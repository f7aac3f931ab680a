"""The detail pass on the host: after a generation, one img2img per instance of the pass's
expression, "only masked" with padding, in turn on the image so far (:mod:`ldznet_ext.detail` plans
it). Each img2img runs without scripts (ours would run the pass again inside it), with the
generation's sampler, CFG scale and size, and the instance's prompt and seed. Only the padded crop
of each result is kept, so nothing outside the crops changes, also where the host pastes a wider
region back (Settings > "overlay_inpaint" off).
"""

from __future__ import annotations

import torch
from PIL import Image

from ..detail import DetailPass, DetailStep, plan
from ..errors import LdznetError
from ..job import MaskJob
from . import host


def _of_image(p, name: str, fallback):
    """``p``'s per-image value ``name`` (all_prompts, all_seeds...) for the image being post-processed:
    the list is indexed by iteration * batch_size + batch_index, as the host fills it."""
    values = getattr(p, name, None)
    if not values:
        return fallback
    index = getattr(p, "iteration", 0) * getattr(p, "batch_size", 1) + getattr(p, "batch_index", 0)
    return values[min(index, len(values) - 1)]


def _img2img(p, image: Image.Image, step: DetailStep, detail: DetailPass, negative_prompt: str):
    from modules import processing, shared

    inner = processing.StableDiffusionProcessingImg2Img(
        init_images=[image], mask=Image.fromarray(step.mask, "L"), mask_blur=0, inpainting_fill=1,
        inpaint_full_res=True, inpaint_full_res_padding=detail.padding, inpainting_mask_invert=0, resize_mode=0,
        denoising_strength=detail.denoising, steps=detail.steps, prompt=step.prompt, negative_prompt=negative_prompt,
        styles=[], seed=step.seed, subseed=step.seed, subseed_strength=0, seed_resize_from_h=-1,
        seed_resize_from_w=-1, sampler_name=p.sampler_name, scheduler=getattr(p, "scheduler", None),
        cfg_scale=p.cfg_scale, width=p.width, height=p.height, batch_size=1, n_iter=1,
        sd_model=p.sd_model or shared.sd_model, outpath_samples=p.outpath_samples, outpath_grids=p.outpath_grids,
        do_not_save_samples=True, do_not_save_grid=True, override_settings={})
    # The mask is soft where the job feathers it; mask_blur 0 keeps it as the user saw it in Preview.
    inner.scripts, inner.script_args = None, []
    return inner


def run(p, image: Image.Image, job: MaskJob, detail: DetailPass) -> tuple[Image.Image, str | None]:
    """(the image with every instance inpainted, None), or (``image``, why nothing was done) when the
    expression selects nothing. The host's global RNG is left as the pass found it. The caller holds the
    GPU (a generation in progress)."""
    mask_job = detail.mask_job(job)
    result = host.compute(image, mask_job)
    prompt, seed = _of_image(p, "all_prompts", p.prompt), int(_of_image(p, "all_seeds", p.seed))
    steps = plan(result.prediction.instances(), detail, prompt, seed, mask_job.feather)
    if not steps:
        return image, f"the detail pass found no instance ({result.empty_reason(mask_job)}): the image is as generated"
    negative_prompt = _of_image(p, "all_negative_prompts", getattr(p, "negative_prompt", ""))
    # Each img2img reseeds the global torch RNG, from which A1111 samples the next img2img's init
    # latent: restored afterwards, the next generation starts as it would have without the pass.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        return _inpaint_each(p, image.convert("RGB"), steps, detail, negative_prompt), None


def _inpaint_each(p, current: Image.Image, steps: list[DetailStep], detail: DetailPass,
                  negative_prompt: str) -> Image.Image:
    """``current`` with each step's img2img pasted in turn, inside its padded crop."""
    from modules import processing, shared

    for step in steps:
        if shared.state.interrupted:
            break
        inner = _img2img(p, current, step, detail, negative_prompt)
        try:
            processed = processing.process_images(inner)
        finally:
            inner.close()
        if not processed.images:  # interrupted inside
            break
        repainted = processed.images[0]
        if repainted.size != current.size:
            raise LdznetError(f"the detail pass's img2img returned {repainted.width}x{repainted.height} for a "
                              f"{current.width}x{current.height} image")
        current = current.copy()  # the img2img keeps its init image
        current.paste(repainted.convert("RGB").crop(step.box), step.box[:2])
    return current
