"""A VAE from a file of its own (``--vae``), used in place of a checkpoint's VAE or where it has none.

WebUI users keep VAEs beside their checkpoints (``models/VAE/``): checkpoints published without one,
or a fixed VAE preferred to the baked-in one. A VAE file comes in one of three layouts, read the same:
ldm's (``encoder.down.0.block.0.*``, as A1111 and ComfyUI save VAEs), diffusers' (``encoder.down_blocks.*``,
``vae/diffusion_pytorch_model.safetensors`` or the ``vae/`` folder), or a whole single-file checkpoint whose
``first_stage_model.*`` is taken. Only tensors are read (``checkpoint_io``), never pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from ..backbones.family import VAE_FILE_KEY, VAE_PREFIX, checkpoint_part
from ..checkpoint_io import SINGLE_FILE, named_path, read_state_dict, readable_file
from ..errors import CheckpointError
from .diffusers_folder import is_diffusers_folder, read_part, vae_to_ldm
from .vae import VAEConfig, conv_attention_weights

LATENT_CHANNELS = 4  # every SD 1.x, SD 2.x and SDXL UNet denoises 4-channel latents
_DIFFUSERS_MARK = "encoder.down_blocks."
_NOT_WEIGHTS = ("loss.", "model_ema.")


def read_vae_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The ldm-layout VAE weights (no prefix) of a VAE file, a diffusers ``vae/`` folder or a single-file
    checkpoint's VAE; CheckpointError naming the file when it holds no 4-channel SD VAE."""
    path = Path(path)
    if path.is_dir():  # a diffusers model's vae/ folder, or the model's folder, whose vae/ is taken
        path = named_path(path)
        state = read_part(path, "vae") if is_diffusers_folder(path) else read_part(path.parent, path.name)
    else:
        state = read_state_dict(readable_file(path, "VAE file", f"a VAE file ({SINGLE_FILE}, .pt or .bin)"))
    if any(k.startswith(VAE_PREFIX) for k in state):
        state = checkpoint_part(state, VAE_PREFIX)
    elif any(k.startswith(_DIFFUSERS_MARK) for k in state):
        state = vae_to_ldm(state)
    if VAE_FILE_KEY not in state:
        raise CheckpointError(f"{path.name}: not a VAE: it has no '{VAE_FILE_KEY}' (ldm layout), "
                              f"'{_DIFFUSERS_MARK}*' (diffusers) or '{VAE_PREFIX}*' (a whole checkpoint)")
    # training losses and EMA bookkeeping (model_ema.decay, .num_updates) some VAE files carry, not weights;
    # attention weights as older converters wrote them
    state = conv_attention_weights({k: v for k, v in state.items() if not k.startswith(_NOT_WEIGHTS)})
    moments = state.get("encoder.conv_out.weight")  # mean and log-variance of each latent channel
    if moments is not None and moments.ndim == 4 and moments.shape[0] != 2 * LATENT_CHANNELS:
        raise CheckpointError(f"{path.name}: a VAE with {moments.shape[0] // 2}-channel latents (SD 3 and Flux VAEs "
                              f"have 16); SD 1.x, SD 2.x and SDXL models need one with {LATENT_CHANNELS}")
    try:
        config = VAEConfig.from_state_dict(state)
    except (CheckpointError, IndexError, ValueError) as error:
        raise CheckpointError(f"{path.name}: not a VAE this program reads: {error}") from error
    if config.embed_dim != LATENT_CHANNELS:
        raise CheckpointError(f"{path.name}: the VAE's quant_conv makes {config.embed_dim}-channel latents; SD 1.x, "
                              f"SD 2.x and SDXL models need {LATENT_CHANNELS}")
    return state

