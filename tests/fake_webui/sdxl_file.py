"""A tiny SDXL-architecture single file that A1111 v1.10.1 can build: sgm's key layout, an 8x VAE (A1111
sizes latents as image/8) and, as the OpenCLIP embedder, the text tower of open_clip's ViT-S-32-alt,
the smallest one open_clip registers (A1111 builds that embedder from an architecture name)."""

from __future__ import annotations

import os

import torch

from conftest import randomize_  # tests/ is on sys.path under pytest
from fake_webui.models import WEBUI_VAE
from ldznet_ext.backbones.family import UNET_PREFIX, VAE_PREFIX
from ldznet_ext.checkpoint_io import write_safetensors
from ldznet_ext.sd.checkpoint import BIGG_PREFIX, CLIP_L_PREFIX
from ldznet_ext.sd.openclip import OpenCLIPTextEncoder
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL

OPENCLIP_ARCH = "ViT-S-32-alt"
SIZE_DIM = 8  # each of the vector's six size numbers is embedded 8 wide
CLIP_L_WIDTH, OPENCLIP_WIDTH = 64, 256
UNET = unet_config("tiny-sdxl", context_dim=CLIP_L_WIDTH + OPENCLIP_WIDTH,
                   adm_in_channels=OPENCLIP_WIDTH + 6 * SIZE_DIM)
# The file says what its shapes cannot: the heads (tiny CLIP ViT-L: 2 of 32; the UNet's: 16 wide).
METADATA = {"unet": UNET.to_dict(), "text": {"num_attention_heads": 2}}


def openclip_tower(seed: int) -> OpenCLIPTextEncoder:
    """Random (seeded) weights in the shapes of ViT-S-32-alt's text tower."""
    return randomize_(OpenCLIPTextEncoder(width=OPENCLIP_WIDTH, layers=10, heads=4, mlp_width=1024,
                                          embed_dim=OPENCLIP_WIDTH), seed=seed)


def tiny_a1111_sdxl_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random (seeded) weights: UNet "tiny-sdxl" widened to this context and vector, the WebUI tests'
    8x VAE, a 64-wide CLIP ViT-L and ViT-S-32-alt's text tower, each under its real prefix."""
    unet = randomize_(UNetModel(UNET), seed=seed + 1)
    vae = randomize_(AutoencoderKL(WEBUI_VAE), seed=seed + 2, std=0.05)
    clip_l = randomize_(TextEncoder.from_config(text_config("tiny")), seed=seed + 3)
    openclip = openclip_tower(seed + 4)
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    state.update({CLIP_L_PREFIX + k: v for k, v in clip_l.text_state_dict().items()})
    state.update({BIGG_PREFIX + k: v for k, v in openclip.state_dict().items()})
    state[BIGG_PREFIX + "logit_scale"] = torch.tensor(4.6)  # in real files, as open_clip's CLIP has it
    return state


def write_tiny_a1111_sdxl(path: str | os.PathLike, seed: int = 0, extra: dict | None = None) -> None:
    """The file in fp16 (``extra``: more tensors, e.g. the ``v_pred`` marker)."""
    state = {k: v.half() for k, v in tiny_a1111_sdxl_state(seed).items()}
    write_safetensors(path, {**state, **(extra or {})}, METADATA)
