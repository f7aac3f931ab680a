"""Backbone adapter over Forge's SDXL-family model (``backend/diffusion_engine/sdxl.py``), for zero-shot
masks with no extra download.

Forge's ``get_learned_conditioning`` runs its two text engines (CLIP ViT-L and OpenCLIP bigG, with
emphasis and embeddings) and returns {"crossattn": [B, 77k, 2048], "vector": [B, pooled + 6 x size
width]}, the sizes embedded by ``sd_model.embedder``; its KModel takes them as
``apply_model(x, sigma, c_crossattn=..., y=...)`` and returns x0 for eps and v-prediction models
alike (see ``backbones.forge``). The vector's size part depends on the image, so ``encode_text``
keeps its pooled text and every UNet call rebuilds the size part for the latent's size
(original = target = that size, crop 0, 0), as Forge conditions a generation of that size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..sd.sdxl import pooled_text, working_size_vector
from .base import Conditioning
from .family import LABELS, check_zero_shot_prediction, host_family
from .forge import PREDICTION_TYPES, ForgeBackbone


def check_forge_sdxl_model(sd_model) -> None:
    """Raise CheckpointError unless Forge's loaded model is an SDXL-family model whose own features
    zero-shot masks can read: base-family text engines, a 4-channel UNet, eps or v prediction."""
    if sd_model is None or getattr(sd_model, "forge_objects", None) is None:
        raise CheckpointError("no Stable Diffusion model is loaded")
    family = host_family(sd_model, sd1_unless_told=False)
    if family != "sdxl":
        raise CheckpointError(f"the loaded model is {LABELS[family]}, not SDXL")
    if not hasattr(sd_model, "text_processing_engine_l"):
        raise CheckpointError("the loaded model is an SDXL refiner (one text encoder, no target size); zero-shot "
                              "masks need an SDXL base-family model (SDXL, Pony, Illustrious, NoobAI, SSD-1B)")
    kmodel = sd_model.forge_objects.unet.model
    in_channels = kmodel.diffusion_model.input_blocks[0][0].in_channels
    if in_channels != 4:
        raise CheckpointError(f"the loaded model is an SDXL inpainting model ({in_channels} input channels); "
                              "zero-shot masks need an SDXL model with 4: load the model it was made from")
    check_zero_shot_prediction("the loaded model", getattr(kmodel.predictor, "prediction_type", "epsilon"),
                               PREDICTION_TYPES)


class ForgeSDXLBackbone(ForgeBackbone):
    """The segmenter's Backbone over Forge's SDXL-family ``shared.sd_model`` (``load_model_gpu`` as in
    :class:`ForgeBackbone`)."""

    def __init__(self, sd_model, load_model_gpu, zero_terminal_snr: bool = False):
        super().__init__(sd_model, load_model_gpu, zero_terminal_snr)
        self.size_dim = sd_model.embedder.dim

    def text_engine(self):
        """The CLIP ViT-L text engine (the OpenCLIP one places the tokens alike)."""
        return getattr(self.sd_model, "text_processing_engine_l", None)

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """prompts -> context [B, 77k, 2048] and the pooled text of Forge's vector [B, 1280]."""
        with torch.inference_mode():
            conditioning = self.sd_model.get_learned_conditioning(list(prompts))
        # clones: normal tensors, not inference-mode ones
        pooled = pooled_text(conditioning["vector"], self.size_dim)
        return Conditioning(conditioning["crossattn"].clone(), pooled.clone())

    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """eps [B, 4, h, w] through KModel.apply_model with the vector of the latent's size."""
        y = working_size_vector(conditioning.pooled.to(self.device), z_t, self.downsample_factor, self.size_dim)
        return self.eps_from_x0(z_t, t, c_crossattn=conditioning.context.to(self.device), y=y)
