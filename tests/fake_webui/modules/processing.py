"""modules.processing: the parts of StableDiffusionProcessing(Img2Img) and process_images that
decide what a script sees and when (A1111 v1.10.1):
- ``mask=`` given to the constructor becomes ``p.image_mask`` (``p.mask`` is reset to None);
- ``setup_prompts()`` fills all_prompts / main_prompt from ``p.prompt`` before scripts' process();
- process() runs before ``p.init()``, which reads ``p.image_mask`` (create_binary_mask, invert) and,
  with "only masked" (inpaint_full_res) on and a blank mask, switches inpaint_full_res off on ``p``;
- ``process_images(p)`` without scripts (how extensions run an img2img of their own) inpaints: the
  "only masked" region (the mask's box grown by the padding, then widened to the output's aspect
  ratio, as masking.expand_crop_region does) is replaced by noise drawn from the seed and the
  prompt, all of it, as the host does with Settings > "overlay_inpaint" off. Every such call is
  recorded in ``inpaint_calls``.
"""
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

inpaint_calls: list = []


def create_binary_mask(image, round=True):
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        if round:
            image = image.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
        else:
            image = image.split()[-1].convert("L")
    else:
        image = image.convert("L")
    return image


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img:
    prompt: str = ""
    init_images: list = None
    mask: Any = None
    batch_size: int = 1
    n_iter: int = 1
    inpaint_full_res: bool = True
    inpainting_mask_invert: int = 0
    mask_round: bool = True
    scripts: Any = None
    script_args: tuple = ()
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str = None
    scheduler: str = None
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    denoising_strength: float = 0.75
    mask_blur: int = 4
    inpainting_fill: int = 0
    inpaint_full_res_padding: int = 0
    resize_mode: int = 0
    styles: list = None
    sd_model: Any = None
    outpath_samples: str = None
    outpath_grids: str = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    override_settings: dict = None
    image_mask: Any = field(default=None, init=False)

    def __post_init__(self):
        self.image_mask = self.mask
        self.mask = None
        self.extra_generation_params = {}
        self.comments = {}
        self.all_prompts = None
        self.main_prompt = None
        self.used_masks = []
        self.iteration = self.batch_index = 0
        self.closed = False

    def comment(self, text):
        self.comments[text] = 1

    def close(self):
        self.closed = True

    def setup_prompts(self):
        self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = self.batch_size * self.n_iter * [self.negative_prompt]
        self.all_seeds = [self.seed + x for x in range(len(self.all_prompts))]
        self.main_prompt = self.all_prompts[0]

    def init(self):
        """What p.init() does with the mask; records the mask it would inpaint with."""
        image_mask = self.image_mask
        if image_mask is not None:
            image_mask = create_binary_mask(image_mask, round=self.mask_round)
            if self.inpainting_mask_invert:
                image_mask = ImageOps.invert(image_mask)
            if self.inpaint_full_res and not np.asarray(image_mask).any():
                image_mask = None
                self.inpaint_full_res = False
        self.used_masks.append(image_mask)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessingImg2Img):
    pass


@dataclass
class Processed:
    images: list


def _widen(low: int, high: int, extra: int, limit: int) -> tuple[int, int]:
    """[low, high) grown by ``extra`` about its centre and shifted into [0, limit)."""
    size = min(high - low + extra, limit)
    low = min(max(low - extra // 2, 0), limit - size)
    return low, low + size


def _only_masked_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """masking.get_crop_region_v2, then expand_crop_region simplified: the short side grows about
    the centre until the box has the output's aspect ratio, shifted into the image."""
    x0, y0, x1, y1 = mask.getbbox()
    x0, y0 = max(x0 - padding, 0), max(y0 - padding, 0)
    x1, y1 = min(x1 + padding, mask.width), min(y1 + padding, mask.height)
    if (x1 - x0) * height > (y1 - y0) * width:
        y0, y1 = _widen(y0, y1, round((x1 - x0) * height / width) - (y1 - y0), mask.height)
    else:
        x0, x1 = _widen(x0, x1, round((y1 - y0) * width / height) - (x1 - x0), mask.width)
    return x0, y0, x1, y1


def _inpaint(p) -> Processed:
    """An extension's own img2img with "only masked": the region is replaced by noise of the seed and prompt."""
    image = p.init_images[0].convert("RGB")
    mask = create_binary_mask(p.image_mask)
    inpaint_calls.append(p)
    if not p.inpaint_full_res or mask.getbbox() is None:
        raise AssertionError("the fake inpaints only masked regions")
    x0, y0, x1, y1 = _only_masked_region(mask, p.inpaint_full_res_padding, p.width, p.height)
    rng = np.random.default_rng([p.seed, zlib.crc32(p.prompt.encode()), p.steps, round(p.denoising_strength * 1000)])
    pixels = np.asarray(image).copy()
    pixels[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
    return Processed([Image.fromarray(pixels)])


def process_images(p, script=None, args=()):
    """The order of process_images for one always-on script: setup_prompts, process, init. Without a
    script: an extension's own img2img (:func:`_inpaint`)."""
    if script is None:
        return _inpaint(p)
    p.setup_prompts()
    script.process(p, *args)
    p.init()
    p.batches_sampled = p.n_iter  # the host's sampling loop runs range(p.n_iter) after process
    script.postprocess(p, p, *args)
    return p


