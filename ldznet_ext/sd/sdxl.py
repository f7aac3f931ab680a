"""SDXL built from our modules: the two text encoders of sgm's conditioner, its size vector, and the
model itself (a ``backbones.base.Backbone`` for zero-shot masks).

sgm's conditioner (configs/inference/sd_xl_base.yaml) concatenates the CLIP ViT-L hidden state of
layer -2 (768) and OpenCLIP bigG's penultimate layer (1280) into the [B, 77, 2048] context; the UNet's
vector ``y`` [B, 2816] is bigG's pooled text (the projected EOS token after ``ln_final``) followed by
sinusoidal embeddings of six numbers: original size (h, w), crop (top, left) and target size (h, w).
Module names follow the single file's ``conditioner.embedders.0.transformer.*`` (transformers'
``CLIPTextModel``) and ``conditioner.embedders.1.model.*`` (open_clip's text tower).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..backbones.base import Conditioning
from .model import StableDiffusion
from .openclip import OpenCLIPTextEncoder, openclip_ids
from .schedule import PREDICTIONS, NoiseSchedule, v_to_eps
from .text import TextEncoder
from .tokenizer import tokenize
from .unet import UNetModel, timestep_embedding
from .vae import AutoencoderKL

SDXL_SCALE_FACTOR = 0.13025


def size_vector(pooled: Tensor, sizes: Tensor, dim: int) -> Tensor:
    """sgm's vector y [B, P + 6 dim]: ``pooled`` [B, P], then each of the six numbers of ``sizes``
    [B, 6] (original h, w, crop top, left, target h, w) as a ``dim``-wide sinusoidal embedding."""
    embedded = timestep_embedding(sizes.flatten().float(), dim).view(sizes.shape[0], -1)
    return torch.cat([pooled, embedded.to(pooled.dtype)], dim=1)


def pooled_text(vector: Tensor, dim: int) -> Tensor:
    """The pooled text [B, P] at the head of sgm's vector y [B, P + 6 dim] (:func:`size_vector`'s first part)."""
    return vector[:, :vector.shape[1] - 6 * dim]


def working_sizes(z: Tensor, downsample_factor: int) -> Tensor:
    """The six size numbers [B, 6] (int64) for latents ``z`` [B, C, h, w]: an image of their size (h, w
    times ``downsample_factor``), uncropped and not resized (original = target size, crop 0, 0), as A1111
    and Forge condition a generation of that size."""
    height, width = (side * downsample_factor for side in z.shape[-2:])
    sizes = torch.zeros(z.shape[0], 6, dtype=torch.long, device=z.device)  # filled, not copied from the host:
    sizes[:, 0::4], sizes[:, 1::4] = height, width  # a CUDA graph can hold fills (original and target size)
    return sizes


def working_size_vector(pooled: Tensor, z: Tensor, downsample_factor: int, dim: int) -> Tensor:
    """The vector y for latents ``z`` [B, C, h, w]: ``pooled`` and the :func:`working_sizes` embedded."""
    return size_vector(pooled, working_sizes(z, downsample_factor), dim)


class SDXLConditioner(nn.Module):
    """sgm's text conditioning: ``embedders[0]`` CLIP ViT-L (ours, transformers' CLIPTextModel),
    ``embedders[1].model`` open_clip bigG."""

    def __init__(self, clip_l: TextEncoder, bigg: OpenCLIPTextEncoder):
        super().__init__()
        second = nn.Module()
        second.model = bigg
        self.embedders = nn.ModuleList([clip_l, second])

    @property
    def context_dim(self) -> int:
        return self.embedders[0].context_dim + self.embedders[1].model.ln_final.weight.shape[0]

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (context [B, 77, 768 + 1280], pooled [B, 1280]) on the module's device."""
        clip_l, bigg = self.embedders[0], self.embedders[1].model
        ids = tokenize(prompts).to(bigg.token_embedding.weight.device)
        hidden = clip_l.transformer(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        penultimate, pooled = bigg(openclip_ids(ids))
        return torch.cat([hidden, penultimate.to(hidden.dtype)], dim=-1), pooled


class StableDiffusionXL(StableDiffusion):
    """An SDXL-family model built from our modules (see ``checkpoint.load_stable_diffusion``).

    Its conditioning is (context, pooled); each UNet call builds the vector ``y`` for an image of the
    latent's size, uncropped, as A1111 does for a generation of that size. ``prediction`` "v" (a
    v-prediction fine-tune) is converted to eps, which the zero-shot score reads.
    """

    def __init__(self, unet: UNetModel, vae: AutoencoderKL, conditioner: SDXLConditioner,
                 schedule: NoiseSchedule | None = None, scale_factor: float = SDXL_SCALE_FACTOR,
                 prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        super().__init__(unet, vae, conditioner, schedule, scale_factor)
        self.prediction = prediction
        pooled_width = conditioner.embedders[1].model.text_projection.shape[1]
        self.size_dim = (unet.config.adm_in_channels - pooled_width) // 6

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """prompts -> context [B, 77, 2048] and bigG's pooled text [B, 1280]."""
        context, pooled = self.text_encoder.encode(prompts)
        return Conditioning(context, pooled)

    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        t = t.to(z_t.device)
        y = working_size_vector(conditioning.pooled.to(z_t.device), z_t, self.downsample_factor, self.size_dim)
        out = self.unet(z_t, t, conditioning.context, y)
        return out if self.prediction == "eps" else v_to_eps(out, z_t, self.schedule, t)
