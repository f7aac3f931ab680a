"""Random models of the real size as one fp16 single file each, for Forge, whose loader recognises a
checkpoint only by the real models' shapes: an SDXL base (sgm's key layout) and an SD 2.1 base (ldm's).
The shapes come from our modules built on the meta device; each tensor is drawn and written on its own,
so memory stays at one tensor (an SDXL file holds 3.47 G parameters, far more than a test should keep
in memory)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ldznet_ext.backbones.family import UNET_PREFIX, VAE_PREFIX
from ldznet_ext.sd.checkpoint import BIGG_PREFIX, CLIP_L_PREFIX, SD2_TEXT_PREFIX
from ldznet_ext.sd.openclip import OpenCLIPTextEncoder
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL, VAEConfig

# SD 2.1 base's UNet (ldm's configs/stable-diffusion/v2-inference.yaml): SD v1's topology with linear
# projections, heads 64 channels wide and OpenCLIP ViT-H's 1024-d context.
SD2_UNET = unet_config("sd-v1", linear_projection=True, num_head_channels=64, context_dim=1024)


def _shapes(parts: dict[str, torch.nn.Module], logit_scale_prefix: str) -> dict[str, tuple[int, ...]]:
    """{key: shape}, sorted, of the modules (built on the meta device) under their prefixes, with the
    open_clip tower's ``logit_scale`` scalar that real files hold."""
    shapes = {prefix + key: tuple(t.shape) for prefix, state in parts.items() for key, t in state.items()}
    shapes[logit_scale_prefix + "logit_scale"] = ()
    return dict(sorted(shapes.items()))


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """{key: shape} of an SDXL base single file: UNet, VAE, CLIP ViT-L and OpenCLIP bigG (with logit_scale)."""
    with torch.device("meta"):
        parts = {UNET_PREFIX: UNetModel(unet_config("sdxl")).state_dict(),
                 VAE_PREFIX: AutoencoderKL(VAEConfig()).state_dict(),
                 CLIP_L_PREFIX: TextEncoder.from_config(text_config("sd-v1")).text_state_dict(),
                 BIGG_PREFIX: OpenCLIPTextEncoder(width=1280, layers=32, heads=20, mlp_width=5120,
                                                  embed_dim=1280).state_dict()}
    return _shapes(parts, BIGG_PREFIX)


def sd2_shapes() -> dict[str, tuple[int, ...]]:
    """{key: shape} of an SD 2.1 base single file: UNet, VAE and OpenCLIP ViT-H's text tower (with logit_scale)."""
    with torch.device("meta"):
        parts = {UNET_PREFIX: UNetModel(SD2_UNET).state_dict(),
                 VAE_PREFIX: AutoencoderKL(VAEConfig()).state_dict(),
                 SD2_TEXT_PREFIX: OpenCLIPTextEncoder(width=1024, layers=24, heads=16, mlp_width=4096,
                                                      embed_dim=1024).state_dict()}
    return _shapes(parts, SD2_TEXT_PREFIX)


def _draw(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values as a fresh network's, without the zero-initialised output layers (which would make the UNet
    ignore its text): weights N(0, 1/fan_in), norm scales 1, biases small, embeddings N(0, 0.02^2)."""
    if not shape:
        return torch.tensor(4.6)
    if len(shape) == 1:
        if key.endswith("weight"):  # every 1-D weight is a norm's scale
            return torch.ones(shape)
        return torch.randn(shape, generator=generator) * 0.01
    if "embedding" in key:
        return torch.randn(shape, generator=generator) * 0.02
    return torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    for key, shape in shapes.items():
        yield _draw(key, shape, generator).half()


def write_random_fp16(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
    """Write random tensors of ``shapes`` (safetensors, fp16) tensor by tensor, atomically (temporary file +
    rename)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            for tensor in _tensors(shapes, seed):
                out.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_full_size_sdxl(path: str | os.PathLike, seed: int = 0) -> None:
    """A random SDXL base file at ``path``."""
    write_random_fp16(path, sdxl_shapes(), seed)


def write_full_size_sd2(path: str | os.PathLike, seed: int = 0) -> None:
    """A random SD 2.1 base file at ``path`` (Forge reads it as eps: its probe, the spread of one
    transformer norm's bias, sees our small biases)."""
    write_random_fp16(path, sd2_shapes(), seed)
