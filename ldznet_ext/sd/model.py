"""A standalone SD v1 model, itself a ``backbones.base.Backbone``.

The segmenter asks a backbone to encode an image to z, encode text, call the UNet at a timestep
(under the feature tap, which reads the UNet's layout), and for the noise schedule.
``StableDiffusion`` answers with our own modules; the WebUI adapters answer with the host's model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..backbones.base import CaptureModules, Conditioning, UNetLayout, ldm_layout
from .schedule import NoiseSchedule
from .text import TextEncoder
from .unet import UNetModel
from .vae import SCALE_FACTOR, AutoencoderKL


class StableDiffusion(nn.Module):
    """An SD v1 model built from our modules (see ``checkpoint.load_stable_diffusion``)."""

    def __init__(self, unet: UNetModel, vae: AutoencoderKL, text_encoder: TextEncoder,
                 schedule: NoiseSchedule | None = None, scale_factor: float = SCALE_FACTOR,
                 resolution: int | None = None, vocabulary: frozenset[str] | None = None):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.schedule = schedule or NoiseSchedule()
        self.scale_factor = scale_factor
        self.resolution = resolution  # the image side it was trained at, when its file says so
        # The words it was trained to name, when its file lists them (a closed world such as the embedded
        # micro model's); None: any word (``masks.presence.knows_term``).
        self.vocabulary = vocabulary

    @property
    def device(self) -> torch.device:
        return self.unet.time_embed[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def layout(self) -> UNetLayout:
        return ldm_layout(self.unet)

    @property
    def capture_modules(self) -> CaptureModules:
        """What ``encode_image`` and ``predict_noise`` run: CUDA graphs may capture them (``graphs.py``)."""
        return CaptureModules(self.vae, self.unet)

    def encode_image(self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        image = image.to(device=self.device, dtype=self.vae.encoder.conv_in.weight.dtype)
        return self.vae.encode(image, sample=sample, generator=generator) * self.scale_factor

    def decode_latent(self, z: Tensor) -> Tensor:
        """z (scaled) -> image [B, 3, H, W] in about [-1, 1]."""
        return self.vae.decode(z / self.scale_factor)

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """prompts -> context [B, 77, D] (CLIP)."""
        return Conditioning(self.text_encoder.encode(prompts))

    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        return self.unet(z_t, t.to(z_t.device), conditioning.context)
