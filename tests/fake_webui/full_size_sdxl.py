"""A random SDXL base of the real size as one fp16 single file (sgm's key layout), for Forge, whose loader
recognises a checkpoint only by the real models' shapes. The shapes come from our modules built on the
meta device; each tensor is drawn and written on its own, so memory stays at one tensor (the file
holds 3.47 G parameters, far more than a test should keep in memory)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ldznet_ext.backbones.family import UNET_PREFIX, VAE_PREFIX
from ldznet_ext.sd.checkpoint import BIGG_PREFIX, CLIP_L_PREFIX
from ldznet_ext.sd.sdxl import OpenCLIPTextEncoder
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL, VAEConfig

def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """{key: shape} of an SDXL base single file: UNet, VAE, CLIP ViT-L and OpenCLIP bigG (with logit_scale)."""
    with torch.device("meta"):
        parts = {UNET_PREFIX: UNetModel(unet_config("sdxl")).state_dict(),
                 VAE_PREFIX: AutoencoderKL(VAEConfig()).state_dict(),
                 CLIP_L_PREFIX: TextEncoder.from_config(text_config("sd-v1")).text_state_dict(),
                 BIGG_PREFIX: OpenCLIPTextEncoder(width=1280, layers=32, heads=20, mlp_width=5120,
                                                  embed_dim=1280).state_dict()}
    shapes = {prefix + key: tuple(t.shape) for prefix, state in parts.items() for key, t in state.items()}
    shapes[BIGG_PREFIX + "logit_scale"] = ()
    return dict(sorted(shapes.items()))


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


def write_full_size_sdxl(path: str | os.PathLike, seed: int = 0) -> None:
    """Write the file (safetensors, fp16) tensor by tensor, atomically (temporary file + rename)."""
    shapes = sdxl_shapes()
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
