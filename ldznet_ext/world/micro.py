"""The micro SD v1: SD v1's exact architecture at a size trainable in minutes, and its recipe.

The model keeps every structural trait of SD v1 (VAE with f = 8 and 4 latent channels, the
ldm UNet with 4 levels and 16 spatial transformers, a CLIP text tower with the real tokenizer
and 77 positions) and SD's own latent scale 0.18215, so every code path that handles SD v1
handles it. ``MicroRecipe`` holds every training hyper-parameter; the same preset gives the
same recipe on any device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import transformers

from ..errors import LdznetError
from ..limits import MICRO_IMAGE_SIZE, MIN_SNR_GAMMA
from ..sd.model import StableDiffusion
from ..sd.text import TextEncoder, text_config
from ..sd.unet import UNetConfig, UNetModel, unet_config
from ..sd.vae import AutoencoderKL, VAEConfig

MICRO_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
"""1.25 M parameters; f = 8, so a 128 px image has a 16 x 16 latent."""

MICRO_UNET: UNetConfig = unet_config("tiny")
"""2.5 M parameters: model_channels 32, channel_mult (1, 1, 2, 2), 2 heads, 64-d context."""

MICRO_TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
"""CLIP text tower fields that differ from ViT-L/14; vocabulary (49,408) and 77 positions stay."""


def micro_text_config() -> transformers.CLIPTextConfig:
    """The micro text encoder's ``CLIPTextConfig`` (3.3 M parameters, 3.2 M of them token embeddings)."""
    config = text_config("tiny")
    for name, value in MICRO_TEXT.items():
        setattr(config, name, value)
    return config


def build_micro_sd(seed: int = 0) -> StableDiffusion:
    """A randomly initialised micro SD v1 (float32, train mode); equal seeds give equal weights."""
    torch.manual_seed(seed)
    return StableDiffusion(UNetModel(MICRO_UNET), AutoencoderKL(MICRO_VAE),
                           TextEncoder.from_config(micro_text_config()))


@dataclass(frozen=True)
class MicroRecipe:
    """Every hyper-parameter of ``ldznet world train-sd``; steps count optimizer updates.

    Every stage trains on train-split seeds ``0 .. scenes - 1`` rendered at ``image_size``.
    """

    name: str
    seed: int = 0
    image_size: int = 128
    scenes: int = 16384
    # Stage 1, VAE: L1 + mse_weight * MSE + kl_weight * KL, the KL summed per image and weighed
    # against the per-image sum of the reconstruction error, as ldm does.
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_crop: int = 64  # random square crops (px): the VAE is convolutional, crops cost 4x less
    vae_lr: float = 1e-3
    vae_warmup: int = 100
    vae_mse_weight: float = 0.1
    vae_kl_weight: float = 1e-6
    scale_images: int = 512  # train images whose latent std sets the latent rescaling
    # Stage 2, text tower (skipped when text_steps is 0): CLIP's contrastive loss between captions
    # and a small image tower reading the VAE's latents; the tower is then frozen in stage 3, as
    # SD v1 freezes CLIP's. With text_steps 0, stage 3 trains a random text tower with the UNet.
    text_steps: int = 0
    text_batch: int = 256
    text_lr: float = 1e-3
    text_warmup: int = 100
    # Stage 3, UNet (and text tower when stage 2 is skipped): eps-prediction, uniform t, SD's
    # schedule, EMA weights saved.
    unet_steps: int = 2000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    uncond_p: float = 0.1  # captions replaced by "" (unconditional)
    # 0: SD's plain eps MSE. gamma > 0: min-SNR weighting (Hang et al., ICCV 2023), each sample's eps
    # MSE times min(SNR_t, gamma) / SNR_t, which takes weight off the low-noise steps (local detail)
    # and leaves it on the steps where the image's layout, and so the caption, must be inferred.
    unet_min_snr_gamma: float = 0.0
    ema_decay: float = 0.995  # horizon ~200 steps, a tenth of the run as SD's 0.9999
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    # Logging and probes.
    log_every: int = 50
    probe_scenes: int = 64  # val scenes for the quality probes

    def __post_init__(self) -> None:
        MICRO_IMAGE_SIZE.check(self.image_size, "image_size")
        MIN_SNR_GAMMA.check(self.unet_min_snr_gamma, "unet_min_snr_gamma")
        if self.image_size % 64 or self.vae_crop > self.image_size:
            raise LdznetError(f"image_size must be a multiple of 64 and >= vae_crop ({self.vae_crop}), "
                              f"got {self.image_size}")

    def with_overrides(self, **values) -> MicroRecipe:
        """This recipe with the given fields replaced, those given as None left as they are (the CLI's
        unset options); the new values are checked as any recipe's are."""
        return replace(self, **{name: value for name, value in values.items() if value is not None})

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES: dict[str, MicroRecipe] = {
    "full": MicroRecipe("full"),
    "clip": MicroRecipe("clip", text_steps=1500),
    "smoke": MicroRecipe("smoke", image_size=64, scenes=32, vae_steps=8, vae_batch=4, vae_warmup=2, scale_images=16,
                         text_steps=8, text_batch=16, text_warmup=2,
                         unet_steps=8, unet_batch=16, unet_warmup=2, log_every=2, probe_scenes=8),
}


def micro_recipe(name: str) -> MicroRecipe:
    """The preset ``"full"`` (the shipped model), ``"clip"`` (full with the contrastive text-tower
    stage) or ``"smoke"`` (seconds on a CPU, for tests; all three stages)."""
    if name not in RECIPES:
        raise LdznetError(f"unknown micro recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]
