"""modules.processing: the parts of StableDiffusionProcessing(Img2Img) and process_images that
decide what a script sees and when (A1111 v1.10.1):
- ``mask=`` given to the constructor becomes ``p.image_mask`` (``p.mask`` is reset to None);
- ``setup_prompts()`` fills all_prompts / main_prompt from ``p.prompt`` before scripts' process();
- process() runs before ``p.init()``, which reads ``p.image_mask`` (create_binary_mask, invert) and,
  with "only masked" (inpaint_full_res) on and a blank mask, switches inpaint_full_res off on ``p``.
"""
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import ImageOps


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
    image_mask: Any = field(default=None, init=False)

    def __post_init__(self):
        self.image_mask = self.mask
        self.mask = None
        self.extra_generation_params = {}
        self.comments = {}
        self.all_prompts = None
        self.main_prompt = None
        self.used_masks = []

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
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


def process_images(p, script, args):
    """The order of process_images for one always-on script: setup_prompts, process, init."""
    p.setup_prompts()
    script.process(p, *args)
    p.init()
    p.batches_sampled = p.n_iter  # the host's sampling loop runs range(p.n_iter) after process
    script.postprocess(p, p, *args)
    return p


