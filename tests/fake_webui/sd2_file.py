"""A tiny SD 2.x-architecture single file that A1111 v1.10.1 can build from ldm's v2-inference(-v).yaml
shape: ldm's key layout (``cond_stage_model.model.*`` for the OpenCLIP text tower), a UNet with linear
projections and heads of a fixed width whose context is the tower's width, an 8x VAE, and as the text
tower open_clip's ViT-S-32-alt (A1111 builds the embedder from an architecture name)."""

from __future__ import annotations

import os

import torch

from conftest import randomize_  # tests/ is on sys.path under pytest
from fake_webui.models import WEBUI_VAE
from fake_webui.sdxl_file import OPENCLIP_WIDTH, openclip_tower
from ldznet_ext.backbones.family import UNET_PREFIX, VAE_PREFIX
from ldznet_ext.checkpoint_io import write_safetensors
from ldznet_ext.sd.checkpoint import SD2_TEXT_PREFIX
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL

UNET = unet_config("tiny", linear_projection=True, num_head_channels=16, context_dim=OPENCLIP_WIDTH)
METADATA = {"unet": UNET.to_dict()}  # the heads are 16 wide, not SD 2.x's 64: the file says so
# Added to the UNet's output bias: A1111's probe (sd2.predicts_v) then reads the file as v-prediction.
V_PROBE_SHIFT = -2.0


def tiny_a1111_sd2_state(seed: int = 0, v_by_probe: bool = False) -> dict[str, torch.Tensor]:
    """Random (seeded) weights under the real prefixes; ``v_by_probe``: the output bias shifted so that the
    probe says v (the output still depends on the input and the text)."""
    unet = randomize_(UNetModel(UNET), seed=seed + 1)
    if v_by_probe:
        with torch.no_grad():
            unet.out[2].bias.add_(V_PROBE_SHIFT)
    vae = randomize_(AutoencoderKL(WEBUI_VAE), seed=seed + 2, std=0.05)
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    state.update({SD2_TEXT_PREFIX + k: v for k, v in openclip_tower(seed + 4).state_dict().items()})
    state[SD2_TEXT_PREFIX + "logit_scale"] = torch.tensor(4.6)  # in real files, as open_clip's CLIP has it
    return state


def write_tiny_a1111_sd2(path: str | os.PathLike, seed: int = 0, v_by_probe: bool = False,
                         extra: dict | None = None) -> None:
    """The file in fp16 (``extra``: more tensors, e.g. the ``v_pred`` marker)."""
    state = {k: v.half() for k, v in tiny_a1111_sd2_state(seed, v_by_probe).items()}
    write_safetensors(path, {**state, **(extra or {})}, METADATA)
