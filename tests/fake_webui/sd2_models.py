"""SD 2.x host models for the WebUI tests, built around one tiny StableDiffusion2 of our modules: an
A1111-shaped one (ldm's LatentDiffusion of v2-inference.yaml / v2-inference-v.yaml as A1111 v1.10.1 loads
it: ``is_sd2``, ``parameterization``, ``cond_stage_model.model``) and a Forge-shaped one (its
``backend/diffusion_engine/sd20.py``: ``forge_objects.unet`` a patcher around a KModel)."""

from __future__ import annotations

from torch import Tensor

from conftest import randomize_  # tests/ is on sys.path under pytest
from fake_webui.models import WEBUI_VAE, FakeLatentDiffusion
from fake_webui.sdxl_models import FakeForgeEngine
from ldznet_ext.sd.sd2 import OpenCLIPContext, StableDiffusion2
from ldznet_ext.sd.openclip import OpenCLIPTextEncoder
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL

def tiny_sd2(prediction: str = "eps", in_channels: int = 4) -> StableDiffusion2:
    """A random tiny SD 2.x: SD 2.x's UNet topology (linear projections, heads of a fixed width) at test
    widths, the WebUI tests' 8x VAE, an open_clip text tower 64 wide."""
    unet = randomize_(UNetModel(unet_config("tiny", linear_projection=True, num_head_channels=16,
                                            in_channels=in_channels)), seed=1)
    vae = randomize_(AutoencoderKL(WEBUI_VAE), seed=2, std=0.05)
    tower = randomize_(OpenCLIPTextEncoder(width=64, layers=3, heads=1, mlp_width=256, embed_dim=64), seed=4)
    return StableDiffusion2(unet, vae, OpenCLIPContext(tower, blocks=2), prediction=prediction).eval()


def fake_a1111_sd2(sd: StableDiffusion2, conditioning_key: str = "crossattn") -> FakeLatentDiffusion:
    """A1111's SD 2.x LatentDiffusion over ``sd``'s own modules (its UNet, VAE and OpenCLIP context; ldm's
    UNet with linear projections differs from ours in the last bits, so the adapter's parity is shown on ours);
    ``conditioning_key`` "hybrid" (inpainting, depth) or "crossattn-adm" (unCLIP) for the variants."""
    model = FakeLatentDiffusion(sd, unet=sd.unet)
    model.is_sd1, model.is_sd2 = False, True
    model.parameterization = sd.prediction
    model.model.conditioning_key = conditioning_key
    return model.eval()


class FakeForgeSD2(FakeForgeEngine):
    """What Forge's StableDiffusion2 engine offers: ``forge_objects`` and its text conditioning."""

    def __init__(self, sd: StableDiffusion2, prediction_type: str = "epsilon"):
        super().__init__(sd, prediction_type)
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3, self.is_inpaint = False, True, False, False, False

    def get_learned_conditioning(self, prompt: list) -> Tensor:
        return self.sd.text_encoder.encode(prompt)
