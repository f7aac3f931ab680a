"""What the fake-host zero-shot tests (SDXL, SD 2.x) compare: one image and job, our own model on a
host's weights, the WebUI engine's prediction, one UNet call as A1111's sampler makes it, the host's
zero-shot masks against ours, and a Forge adapter beside our model.
Import after ``fake_webui.world`` (it puts the fake ``modules`` on sys.path)."""
from __future__ import annotations

from collections.abc import Callable

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


def assert_host_zero_shot_is_ours(sd, loaded, backbone_is_right: Callable[[object], bool]) -> None:
    """With ``loaded`` (over ``sd``'s modules) installed as the WebUI's model: the job's backbone passes
    ``backbone_is_right``, the host's zero-shot masks are our model's on the same weights and schedule, the
    host model is untouched, and no separate mask model is loaded."""
    from ldznet_ext.webui import host

    state = {k: v.clone() for k, v in loaded.state_dict().items()}
    before = sampler_call(loaded)
    with host.job_backbone(ZERO_SHOT) as backbone:
        assert backbone_is_right(backbone)
    host.check_ready(ZERO_SHOT)

    result = host.compute(IMAGE, ZERO_SHOT)

    expected = engine_prediction(our_model(sd, loaded.alphas_cumprod))
    assert torch.equal(result.prediction.probability, expected.probability)
    assert np.array_equal(result.mask, expected.mask_image())
    assert torch.equal(sampler_call(loaded), before)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert host.engine().mask_model.loaded is None  # no separate model for zero-shot


def checked_forge_adapter(engine, check: Callable[[object], None], adapter_class: type) -> tuple:
    """(adapter, ours, loads): ``engine`` (a fake Forge engine) passed through ``check`` and wrapped in
    ``adapter_class`` as the host does, our model on its weights and schedule, and the list of the patchers the
    adapter asked Forge to load."""
    check(engine)
    loads = []
    adapter = adapter_class(engine, loads.append)
    return adapter, our_model(engine.sd, engine.forge_objects.unet.model.predictor.alphas_cumprod), loads
