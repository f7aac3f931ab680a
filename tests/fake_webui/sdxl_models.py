"""SDXL-family host models for the WebUI tests, built around one tiny StableDiffusionXL of our modules:
an A1111-shaped one (sgm's DiffusionEngine as A1111 v1.10.1 extends it: ``conditioner``,
``model.diffusion_model``, ``first_stage_model``, ``scale_factor``) and a Forge-shaped one (its
``backend/diffusion_engine/sdxl.py``: ``forge_objects.unet`` a patcher around a KModel, ``embedder``)."""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from conftest import randomize_  # tests/ is on sys.path under pytest
from fake_webui.models import WEBUI_VAE
from ldznet_ext.sd.schedule import NoiseSchedule
from ldznet_ext.sd.sd2 import StableDiffusion2
from ldznet_ext.sd.openclip import OpenCLIPTextEncoder
from ldznet_ext.sd.sdxl import SDXLConditioner, StableDiffusionXL
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.unet import UNetModel, timestep_embedding, unet_config
from ldznet_ext.sd.vae import AutoencoderKL

SIZE_DIM = 8  # tiny-sdxl's y: bigG's 32-d pooled text + 6 x 8
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def tiny_sdxl(prediction: str = "eps", schedule: NoiseSchedule | None = None) -> StableDiffusionXL:
    """A random tiny SDXL (UNet "tiny-sdxl", the WebUI tests' 8x VAE, CLIP ViT-L 64 wide, bigG 32 wide)."""
    unet = randomize_(UNetModel(unet_config("tiny-sdxl")), seed=1)
    vae = randomize_(AutoencoderKL(WEBUI_VAE), seed=2, std=0.05)
    clip_l = randomize_(TextEncoder.from_config(text_config("tiny")), seed=3)
    bigg = randomize_(OpenCLIPTextEncoder(width=32, layers=2, heads=1, mlp_width=128, embed_dim=32), seed=4)
    return StableDiffusionXL(unet, vae, SDXLConditioner(clip_l, bigg), schedule, prediction=prediction).eval()


def _sizes(height: int, width: int, rows: int) -> list[Tensor]:
    """Original size, crop (0, 0) and target size, each [rows, 2], as both hosts build them."""
    return [torch.tensor([[height, width]] * rows), torch.zeros(rows, 2), torch.tensor([[height, width]] * rows)]


class SizeEmbedder(nn.Module):
    """sgm's ConcatTimestepEmbedderND: each number of x [B, d] embedded ``outdim`` wide, concatenated."""

    def __init__(self, input_key: str, outdim: int):
        super().__init__()
        self.input_key, self.outdim = input_key, outdim

    def forward(self, x: Tensor) -> Tensor:
        return timestep_embedding(x.flatten().float(), self.outdim).view(x.shape[0], -1)


class GeneralConditioner(nn.Module):
    """sgm's GeneralConditioner of sd_xl_base.yaml: CLIP ViT-L and bigG (crossattn; bigG's pooled text
    starts the vector), then the three size embedders."""

    def __init__(self, text: SDXLConditioner):
        super().__init__()
        self.text = text
        self.embedders = nn.ModuleList([*text.embedders, *(SizeEmbedder(key, SIZE_DIM) for key in SIZE_KEYS)])

    def forward(self, batch: dict, force_zero_embeddings=()) -> dict:
        context, pooled = self.text.encode(list(batch["txt"]))
        sizes = [embedder(batch[embedder.input_key]) for embedder in self.embedders[2:]]
        return {"crossattn": context, "vector": torch.cat([pooled, *sizes], dim=1)}


class OpenAIWrapper(nn.Module):
    """sgm's OpenAIWrapper: the UNet called with the conditioning dict's crossattn and vector."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: Tensor, t: Tensor, c: dict) -> Tensor:
        return self.diffusion_model(x, t, c["crossattn"], c["vector"])


class InferenceFirstStage(nn.Module):
    """sgm's AutoencoderKLInferenceWrapper: ``encode`` samples the posterior with the global RNG."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def encode(self, x: Tensor) -> Tensor:
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x))).sample()


class FakeDiffusionEngine(nn.Module):
    """What A1111 v1.10.1 calls on an SDXL ``DiffusionEngine`` (modules/sd_models_xl.py)."""

    def __init__(self, sd: StableDiffusionXL, parameterization: str = "eps"):
        super().__init__()
        self.model = OpenAIWrapper(sd.unet)
        self.first_stage_model = InferenceFirstStage(sd.vae)
        self.conditioner = GeneralConditioner(sd.text_encoder)
        self.scale_factor = 0.13025
        self.register_buffer("alphas_cumprod", sd.schedule.alphas_cumprod.float())
        self.parameterization = parameterization
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3, self.is_ssd = False, False, True, False, False
        self.is_sdxl_inpaint = False
        self.cond_stage_key = "txt"

    def get_learned_conditioning(self, batch) -> dict:
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        original, crop, target = _sizes(height, width, len(batch))
        return self.conditioner({"txt": batch, "original_size_as_tuple": original, "crop_coords_top_left": crop,
                                 "target_size_as_tuple": target})

    def encode_first_stage(self, x: Tensor) -> Tensor:
        return self.scale_factor * self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, x: Tensor) -> Tensor:
        return x

    def apply_model(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        return self.model(x, t, cond)


class Predictor(nn.Module):
    """Forge's k_prediction.Prediction: sigma <-> t, input scaling, x0 from eps or v."""

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod.float()
        self.log_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).log()
        self.prediction_type = prediction_type

    def timestep(self, sigma: Tensor) -> Tensor:
        return (sigma.log()[None] - self.log_sigmas[:, None]).abs().argmin(dim=0)

    def calculate_denoised(self, sigma: Tensor, out: Tensor, x: Tensor) -> Tensor:
        sigma = sigma.view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return x / (sigma ** 2 + 1) - out * sigma / (sigma ** 2 + 1) ** 0.5
        return x - out * sigma


class KModel(nn.Module):
    """Forge's KModel.apply_model: sigma and x = z + sigma * noise in, x0 out; SDXL's vector ``y`` to the UNet."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = Predictor(alphas_cumprod, prediction_type)
        self.computation_dtype = torch.float32

    def apply_model(self, x: Tensor, t: Tensor, c_crossattn=None, **kwargs) -> Tensor:
        sigma = t.view(-1, 1, 1, 1)
        out = self.diffusion_model(x / (sigma ** 2 + 1) ** 0.5, self.predictor.timestep(t).float(), c_crossattn,
                                   kwargs.get("y"))
        return self.predictor.calculate_denoised(t, out.float(), x)


class FakeForgeEngine:
    """What every Forge engine offers: ``forge_objects``, its UNet patcher around a KModel of ``sd``'s UNet and
    schedule and its VAE's downscale ratio (``sd`` kept for the engine's text conditioning)."""

    def __init__(self, sd: StableDiffusionXL | StableDiffusion2, prediction_type: str = "epsilon"):
        self.sd = sd
        kmodel = KModel(sd.unet, sd.schedule.alphas_cumprod, prediction_type)
        self.forge_objects = types.SimpleNamespace(unet=types.SimpleNamespace(model=kmodel, load_device="cpu"),
                                                   vae=types.SimpleNamespace(downscale_ratio=sd.downsample_factor))


class FakeForgeSDXL(FakeForgeEngine):
    """What Forge's StableDiffusionXL engine offers: ``forge_objects``, ``embedder`` and its conditioning."""

    def __init__(self, sd: StableDiffusionXL, prediction_type: str = "epsilon"):
        super().__init__(sd, prediction_type)
        self.embedder = types.SimpleNamespace(dim=SIZE_DIM)
        self.text_processing_engine_l = object()
        self.is_sd1, self.is_sdxl, self.is_inpaint = False, True, False

    def get_learned_conditioning(self, prompt: list) -> dict:
        context, pooled = self.sd.text_encoder.encode(prompt)
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        numbers = torch.cat(_sizes(height, width, 1), dim=1).flatten().float()
        flat = timestep_embedding(numbers, SIZE_DIM).flatten()[None].repeat(pooled.shape[0], 1)
        return {"crossattn": context, "vector": torch.cat([pooled, flat.to(pooled)], dim=1)}
