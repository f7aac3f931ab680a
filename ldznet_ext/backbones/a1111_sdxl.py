"""Backbone adapter over AUTOMATIC1111's SDXL-family model (``shared.sd_model``: sgm's DiffusionEngine as
extended by A1111's ``modules/sd_models_xl.py``), for zero-shot masks with no extra download.

The text goes through the model's own ``get_learned_conditioning`` (A1111's wrappers of the CLIP
ViT-L and OpenCLIP bigG embedders: chunks, emphasis, embeddings), which returns
{"crossattn": [B, 77k, 2048], "vector": [B, pooled + 6 x size width]}; the UNet through
``apply_model(x, t, {"crossattn", "vector"})`` (sgm's wrapper: the raw eps or v at SD timestep t).
The vector's size part depends on the image, not the text, so ``encode_text`` keeps its pooled text
and every UNet call rebuilds the size part for the latent's size (original = target = that size,
crop 0, 0), as A1111 conditions a generation of that size. Nothing is changed on the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..sd.schedule import PREDICTIONS
from ..sd.sdxl import pooled_text, working_size_vector
from .a1111 import A1111Backbone, check_torch_unet, model_name
from .base import Conditioning
from .family import LABELS, check_zero_shot_prediction, host_family
from .sampling import sample_posterior

# The inputs of sgm's size embedders in an SDXL base-family conditioner (a refiner has an aesthetic score instead).
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def _input_keys(sd_model) -> list:
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", ())
    return [getattr(embedder, "input_key", None) for embedder in embedders]


def check_a1111_sdxl_model(sd_model, current_unet=None) -> None:
    """Raise CheckpointError unless A1111's loaded model is an SDXL-family model whose own features
    zero-shot masks can read: sizes in its vector, a 4-channel UNet, eps or v prediction, torch modules."""
    name = model_name(sd_model)
    family = host_family(sd_model)
    if family != "sdxl":
        raise CheckpointError(f"{name} is {LABELS[family]}, not SDXL")
    if not all(key in _input_keys(sd_model) for key in SIZE_KEYS):
        raise CheckpointError(f"{name} has no SDXL size conditioning (an SDXL refiner?); zero-shot masks "
                              "need an SDXL base-family model (SDXL, Pony, Illustrious, NoobAI, SSD-1B)")
    in_channels = sd_model.model.diffusion_model.input_blocks[0][0].in_channels
    if in_channels != 4 or getattr(sd_model, "is_sdxl_inpaint", False):
        raise CheckpointError(f"{name} is an SDXL inpainting model ({in_channels} input channels); zero-shot masks "
                              "need an SDXL model with 4: load the model the inpainting model was made from")
    check_zero_shot_prediction(name, getattr(sd_model, "parameterization", "eps"), PREDICTIONS)
    check_torch_unet(current_unet)


class A1111SDXLBackbone(A1111Backbone):
    """The segmenter's Backbone over A1111's SDXL-family ``shared.sd_model``; ``devices`` is ``modules.devices``."""

    def __init__(self, sd_model, devices, zero_terminal_snr: bool = False):
        super().__init__(sd_model, devices, zero_terminal_snr)
        self.size_dim = next(embedder.outdim for embedder in sd_model.conditioner.embedders
                             if getattr(embedder, "input_key", None) == SIZE_KEYS[0])

    def text_wrapper(self):
        """The CLIP ViT-L embedder's wrapper (the OpenCLIP one places the tokens alike)."""
        return self.sd_model.conditioner.embedders[0]

    @torch.no_grad()
    def encode_image(self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """image [B, 3, H, W] in [-1, 1] -> z [B, 4, H/8, W/8] times the model's scale factor, the posterior
        mean unless ``sample``. sgm's ``encode`` samples with the global RNG, so the moments come from the
        first stage's encoder and quant_conv (what that encode runs), on the device its weights are on
        (the CPU between uses under --medvram/--lowvram)."""
        first_stage = self.sd_model.first_stage_model
        weights = first_stage.quant_conv.weight
        with self.devices.autocast():
            moments = first_stage.quant_conv(first_stage.encoder(image.to(weights.device, self.devices.dtype_vae)))
            mean, logvar = moments.chunk(2, dim=1)
            z = sample_posterior(mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)), generator) if sample else mean
            return (self.sd_model.scale_factor * z).float().to(self.device)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """prompts -> context [B, 77k, 2048] and the pooled text of the host's vector [B, 1280]."""
        with self.devices.autocast():
            conditioning = self.sd_model.get_learned_conditioning(list(prompts))
        return Conditioning(conditioning["crossattn"], pooled_text(conditioning["vector"], self.size_dim))

    @torch.no_grad()
    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """eps [B, 4, h, w] from ``sd_model.apply_model`` with the vector of the latent's size
        (a v-prediction model's v converted to eps)."""
        z_t, t = z_t.to(self.device), t.to(self.device)
        y = working_size_vector(conditioning.pooled.to(self.device), z_t, self.downsample_factor, self.size_dim)
        with self.devices.autocast():
            out = self.sd_model.apply_model(z_t, t, {"crossattn": conditioning.context.to(self.device), "vector": y})
        return self.as_eps(out, z_t, t)
