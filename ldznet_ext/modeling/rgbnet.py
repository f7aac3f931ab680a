"""RGBNet, the paper's baseline: ZNet's architecture on the RGB image instead of z.

A learned convolutional stem maps the image to the latent resolution and channel count, where the
UNet (initialised from SD like ZNet) takes over.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..sd.unet import UNetConfig
from .znet import ZNet


def image_stem(out_channels: int, widths: tuple[int, ...] = (64, 128, 256)) -> nn.Sequential:
    """[B, 3, H, W] in [-1, 1] -> [B, out_channels, H/8, W/8]: a 3x3 conv, three stride-2 4x4 convs, a 3x3 conv."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1), nn.SiLU()]
    previous = widths[0]
    for width in widths:
        layers += [nn.Conv2d(previous, width, 4, stride=2, padding=1), nn.SiLU()]
        previous = width
    layers.append(nn.Conv2d(previous, out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class RGBNet(ZNet):
    """``forward(image [B, 3, H, W] in [-1, 1], context) -> logits [B, 1, H, W]`` (H, W multiples of 8;
    ``with_presence``: as ZNet's)."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        self.stem = image_stem(config.in_channels)

    def forward(self, image: Tensor, context: Tensor,  # type: ignore[override]
                with_presence: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if image.shape[-1] % 8 or image.shape[-2] % 8:
            raise ValueError(f"RGBNet needs image sides that are multiples of 8, got {tuple(image.shape[-2:])}")
        return self.segment(self.stem(image.to(self.dtype)), context, with_presence=with_presence)
