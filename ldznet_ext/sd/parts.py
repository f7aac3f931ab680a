"""Which parts of an SD v1 model a segmentation head reads, and how to leave out the rest.

A head needs the VAE *encoder* (image -> z), the text encoder and the UNet up to the last block the
feature tap reads (``backbones.base.LDZNET_BLOCKS``: the transformer in output block 5 of SD v1); the tap stops
the UNet call there. The VAE decoder, the remaining output blocks and the UNet's ``out`` are never
run, so ``load_stable_diffusion(..., parts="mask")`` replaces them by :class:`SkippedPart` before
any weight is read: their tensors are never materialised.
"""

from __future__ import annotations

from torch import nn

from ..backbones.base import LDZNET_BLOCKS
from ..errors import LdznetError
from .unet import UNetModel
from .vae import AutoencoderKL

PARTS = ("all", "mask")
"""What ``load_stable_diffusion`` can load: the whole model, or what a segmentation head reads."""


class SkippedPart(nn.Sequential):
    """Stands where a part was not loaded: no weights, no layers (the tap finds no transformer in
    it), and a clear error when something tries to run it."""

    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def forward(self, *args, **kwargs):
        raise LdznetError(f"{self.part} was not loaded: this model was loaded with parts='mask', only what a "
                          "segmentation head reads (VAE encoder, text encoder, UNet up to the last tapped block); "
                          "load it with parts='all' to run the rest")


def last_tapped_output_block(unet: UNetModel, blocks: tuple[int, ...] = LDZNET_BLOCKS) -> int:
    """Index of the output block holding the last tapped spatial transformer (-1: none is tapped
    there, the tap stops before the decoder)."""
    last = max(blocks)
    for index, block in enumerate(unet.output_blocks):
        if any(getattr(layer, "block_number", None) == last for layer in block):
            return index
    return -1


def trim_for_masks(unet: UNetModel, vae: AutoencoderKL) -> None:
    """Replace, in place, what a head never runs by :class:`SkippedPart`: the UNet's output blocks
    after the last tapped one and its ``out``, the VAE's decoder and ``post_quant_conv``. Call it on
    models built on the meta device, before loading weights."""
    keep = last_tapped_output_block(unet)
    for index in range(keep + 1, len(unet.output_blocks)):
        unet.output_blocks[index] = SkippedPart(f"UNet output block {index}")
    unet.out = SkippedPart("the UNet's output layer ('out')")
    vae.decoder = SkippedPart("the VAE decoder")
    vae.post_quant_conv = SkippedPart("the VAE decoder's post_quant_conv")


def check_parts(parts: str) -> None:
    """LdznetError unless ``parts`` is one of :data:`PARTS`."""
    if parts not in PARTS:
        raise LdznetError(f"parts must be one of {', '.join(PARTS)}, got {parts!r}")
