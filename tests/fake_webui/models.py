"""Models for the WebUI tests: a small SD v1-topology model with an 8x VAE (A1111 sizes latents
as image/8) and a tiny LD-ZNet head for it, a random full-size SD v1 and head (for Forge, whose
loader knows only the real sizes), and a stand-in for ldm's LatentDiffusion (which needs
pytorch_lightning) built around ldm's real UNetModel and DiagonalGaussianDistribution, with the
methods A1111 v1.10.1 calls on ``shared.sd_model``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldznet_ext.modeling.build import build_head, head_config
from ldznet_ext.sd.model import StableDiffusion
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL, VAEConfig

WEBUI_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
HEAD_LATENT = 8  # z side of the tiny head's positional embeddings: 64 px working size


def _perturb(module: nn.Module, std: float) -> None:
    # Fresh ldm-style UNets zero their transformers' output convs, which makes eps ignore the text.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def tiny_sd(seed: int = 0) -> StableDiffusion:
    """Random tiny SD v1-topology model (UNet "tiny", 8x VAE, 2-layer 64-d CLIP) whose UNet
    output depends on the text."""
    torch.manual_seed(seed)
    sd = StableDiffusion(UNetModel(unet_config("tiny")), AutoencoderKL(WEBUI_VAE), TextEncoder.from_config(text_config("tiny")))
    _perturb(sd.unet, 0.05)
    return sd.eval().requires_grad_(False)


def tiny_head(seed: int = 0):
    """(head, config): a random LD-ZNet head for ``tiny_sd`` whose output depends on its inputs."""
    config = head_config("ldznet", "tiny", latent_size=HEAD_LATENT)
    torch.manual_seed(seed)
    head = build_head(config).eval().requires_grad_(False)
    _perturb(head, 0.05)
    return head, config


def _wake(module: nn.Module, std: float = 0.01) -> nn.Module:
    # Only the zero-initialised weights get noise: a full-size UNet stays numerically tame.
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.add_(torch.randn_like(p) * std)
    return module


def full_size_sd(seed: int = 0) -> StableDiffusion:
    """Random SD v1 of the real size (what Forge's loader recognises as SD 1.5; 1.07 G parameters)
    whose UNet output depends on the text. Building it takes about a minute on one CPU core.

    The text encoder's last LayerNorm gets a random bias, as trained ones have: with none, its output's
    mean is 0 up to rounding, and Forge's default emphasis, which divides by that mean, turns some
    prompts into NaN (exactly 0 for "cat" with torch 2.14.1)."""
    torch.manual_seed(seed)
    sd = StableDiffusion(UNetModel(unet_config("sd-v1")), AutoencoderKL(VAEConfig()),
                         TextEncoder.from_config(text_config("sd-v1")))
    _wake(sd.unet)
    with torch.no_grad():
        sd.text_encoder.transformer.final_layer_norm.bias.normal_(0, 0.1)
    return sd.eval().requires_grad_(False)


FULL_SIZE_HEAD_LATENT = 16  # 128 px working size


def full_size_head(seed: int = 0):
    """(head, config): a random LD-ZNet head for ``full_size_sd``."""
    config = head_config("ldznet", "sd-v1", latent_size=FULL_SIZE_HEAD_LATENT)
    torch.manual_seed(seed)
    return _wake(build_head(config).eval().requires_grad_(False)), config


class _Wrapper(nn.Module):
    """ldm's DiffusionWrapper for conditioning_key 'crossattn'."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = "crossattn"

    def forward(self, x: Tensor, t: Tensor, c_crossattn: list) -> Tensor:
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class _FirstStage(nn.Module):
    """ldm's AutoencoderKL.encode: a DiagonalGaussianDistribution."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        self.encoder = vae.encoder

    def encode(self, x: Tensor):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.vae.quant_conv(self.vae.encoder(x)))


class FakeLatentDiffusion(nn.Module):
    """What A1111 calls on an SD 1.x ``LatentDiffusion``, over ldm's own UNetModel.

    ``model.diffusion_model`` is ldm's openaimodel.UNetModel loaded with ``sd``'s UNet weights, or ``unet``
    where given; ``cond_stage_model`` is ``sd``'s text encoder (A1111 wraps it for chunks and emphasis; not
    modelled).
    """

    def __init__(self, sd: StableDiffusion, unet: nn.Module | None = None):
        super().__init__()
        if unet is None:
            from conftest import ldm_unet  # tests/ is on sys.path under pytest

            unet = ldm_unet(sd.unet.config)
            unet.load_state_dict(sd.unet.state_dict(), strict=True)
        self.model = _Wrapper(unet.eval())
        self.first_stage_model = _FirstStage(sd.vae)
        self.cond_stage_model = sd.text_encoder
        self.scale_factor = 0.18215
        self.register_buffer("alphas_cumprod", sd.schedule.alphas_cumprod.float())
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3, self.is_ssd = True, False, False, False, False
        self.cond_stage_key = "txt"
        self.latent_channels = 4

    def encode_first_stage(self, x: Tensor):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior) -> Tensor:
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        z = encoder_posterior.sample() if isinstance(encoder_posterior, DiagonalGaussianDistribution) else encoder_posterior
        return self.scale_factor * z

    def get_learned_conditioning(self, c: list) -> Tensor:
        return self.cond_stage_model.encode(c)

    def apply_model(self, x_noisy: Tensor, t: Tensor, cond) -> Tensor:
        cond = cond if isinstance(cond, dict) else {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)
