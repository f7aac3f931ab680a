"""What the fake-host zero-shot tests (SDXL, SD 2.x) compare: one image and job, our own model on a
host's weights, the WebUI engine's prediction, and one UNet call as A1111's sampler makes it.
Import after ``fake_webui.world`` (it puts the fake ``modules`` on sys.path)."""
from __future__ import annotations

import numpy as np
import torch

from ldznet_ext.job import MaskJob
from ldznet_ext.sd.schedule import NoiseSchedule

IMAGE = (np.random.default_rng(3).random((40, 56, 3)) * 255).astype(np.uint8)
ZERO_SHOT = MaskJob("goblin OR sword", "zero-shot", threshold=0.5)


def our_model(host_sd, alphas_cumprod: torch.Tensor):
    """Our model of ``host_sd``'s class (StableDiffusionXL, StableDiffusion2) on the host's weights and
    noise schedule."""
    return type(host_sd)(host_sd.unet, host_sd.vae, host_sd.text_encoder, NoiseSchedule(alphas_cumprod),
                         prediction=host_sd.prediction).eval()


def engine_prediction(model):
    """What the WebUI's engine makes of IMAGE and ZERO_SHOT on ``model`` with the current settings."""
    from ldznet_ext.webui import host

    segmenter = host.engine().segmenter(model, ZERO_SHOT, host.engine_options())
    segmenter.set_image(IMAGE)
    return segmenter.predict(ZERO_SHOT.tree(), ZERO_SHOT.mask_options())


def sampler_call(model) -> torch.Tensor:
    """A UNet call as A1111's sampler makes it, with a fixed seed."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([500.0]), model.get_learned_conditioning(["a goblin"]))
