"""SD 2.x built from our modules: its OpenCLIP ViT-H text conditioning and v-prediction detection
(a ``backbones.base.Backbone`` for zero-shot masks).

ldm's ``FrozenOpenCLIPEmbedder`` (layer "penultimate", configs/stable-diffusion/v2-inference.yaml)
runs the open_clip text tower to its penultimate layer and applies ``ln_final`` to it: the
[B, 77, 1024] context. Module names follow the single file's ``cond_stage_model.model.*``. A1111
builds ViT-H-14's tower (24 layers) and loads a file into it non-strictly, so a file without the last
layer and the projection, which the context never reads (diffusers' scripts/convert_diffusers_to_
original_stable_diffusion.py writes 23 layers), gives the same context; so does a diffusers folder,
whose text encoder is the tower less its last layer.

A 768-v file (SD 2.0-v, 2.1) and a 512 eps file (SD 2.0-base, 2.1-base) hold the same tensors: no
field says which prediction a file makes. A1111 v1.10.1 (``sd_models_config.
is_using_v_parameterization_for_sd2``) decides by running the UNet once: a latent of 0.5 at t = 999
with a context of 0.5; the output minus the input averaging below -1 means v. :func:`predicts_v`
runs that same probe, so a file is read as A1111 reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..backbones.base import Conditioning
from ..errors import CheckpointError
from .model import StableDiffusion
from .openclip import OpenCLIPTextEncoder, openclip_ids
from .schedule import PREDICTIONS, NoiseSchedule, v_to_eps
from .tokenizer import tokenize
from .unet import UNetModel
from .vae import AutoencoderKL

# A1111's probe: input and context value, timestep, and the mean (output - input) below which it reads v.
_PROBE_VALUE, _PROBE_TIMESTEP, _PROBE_V_BELOW = 0.5, 999, -1.0
def context_blocks(held: int, depth: int | None = None) -> int:
    """How many open_clip layers SD 2.x's context runs: all but the last of the tower ldm builds, ``depth``
    layers deep (None: the ``held`` layers a file holds). A file holds the tower whole or without its last
    layer (as diffusers' conversion to a single file writes it); CheckpointError otherwise."""
    if depth is None:
        depth = held
    if depth < 2:
        raise CheckpointError(f"its OpenCLIP text tower is {depth} layer deep; SD 2.x's context reads the layer before "
                              "the last")
    if not depth - 1 <= held <= depth:
        raise CheckpointError(f"its OpenCLIP text encoder holds {held} layers; SD 2.x's context runs {depth - 1} of "
                              f"a tower {depth} deep, held whole or without its last layer")
    return depth - 1


class OpenCLIPContext(nn.Module):
    """SD 2.x's text conditioning: ``ln_final`` of the tokens after the first ``blocks`` layers of the open_clip
    tower ``model`` (ldm's "penultimate": :func:`context_blocks`)."""

    def __init__(self, model: OpenCLIPTextEncoder, blocks: int):
        super().__init__()
        self.model, self.blocks = model, blocks

    @property
    def context_dim(self) -> int:
        return int(self.model.ln_final.weight.shape[0])

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> context [B, 77, width] on the module's device (open_clip pads with zeros)."""
        ids = openclip_ids(tokenize(prompts)).to(self.model.token_embedding.weight.device)
        return self.model.ln_final(self.model.hidden_state(ids, self.blocks))


class StableDiffusion2(StableDiffusion):
    """An SD 2.x model (see ``checkpoint.load_stable_diffusion``); ``prediction`` "v" (the 768-v
    models) is converted to eps, which the zero-shot score reads."""

    def __init__(self, unet: UNetModel, vae: AutoencoderKL, text_encoder: OpenCLIPContext,
                 schedule: NoiseSchedule | None = None, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        super().__init__(unet, vae, text_encoder, schedule)
        self.prediction = prediction

    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        t = t.to(z_t.device)
        out = self.unet(z_t, t, conditioning.context)
        return out if self.prediction == "eps" else v_to_eps(out, z_t, self.schedule, t)


@torch.no_grad()
def predicts_v(unet: UNetModel) -> bool:
    """A1111's v-prediction probe for SD 2.x UNets (module docstring), in the UNet's dtype and device (A1111's:
    float32)."""
    weight = unet.time_embed[0].weight
    x = torch.full((1, unet.config.in_channels, 8, 8), _PROBE_VALUE, dtype=weight.dtype, device=weight.device)
    context = torch.full((1, 2, unet.config.context_dim), _PROBE_VALUE, dtype=weight.dtype, device=weight.device)
    out = unet(x, torch.tensor([_PROBE_TIMESTEP], device=weight.device), context)
    return float((out.float() - x.float()).mean()) < _PROBE_V_BELOW
