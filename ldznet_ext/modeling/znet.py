"""ZNet: the SD UNet topology run at t = 0 on the latent z, decoding full-resolution mask logits."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..sd.unet import UNetConfig, UNetModel, normalization, zero_module


def upsampling_decoder(channels: int) -> nn.Sequential:
    """The official x8 decoder: 3x3 conv to one channel, then three rounds of
    [2x2 transposed conv (stride 2), SiLU, 3x3 conv], SiLU between stages."""
    layers: list[nn.Module] = [nn.Conv2d(channels, 1, 3, padding=1)]
    for _ in range(3):
        layers += [nn.SiLU(), nn.ConvTranspose2d(1, 1, 2, stride=2), nn.SiLU(), nn.Conv2d(1, 1, 3, padding=1)]
    return nn.Sequential(*layers)


class ZNet(UNetModel):
    """Text-conditioned segmentation UNet on z.

    ``forward(z [B, 4, h, w], context [B, 77, D]) -> logits [B, 1, 8h, 8w]``. The mask is decided as
    one channel at z resolution (``out``) and then up-sampled by ``final``; sigmoid only at inference.
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        ch = config.model_channels
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1)), nn.SiLU())
        self.final = upsampling_decoder(config.out_channels)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each UNet block's activations during the backward pass instead of keeping them
        (the official training does this: the SD v1-size head's activations do not fit otherwise).
        The state dict and the results are unchanged; a backward pass costs about one more forward."""
        for block in [*self.input_blocks, self.middle_block, *self.output_blocks]:
            if enabled:
                # an instance attribute shadows the class's forward; deleting it restores the plain call
                block.forward = _checkpointed(type(block).forward.__get__(block))
            elif "forward" in vars(block):
                del block.forward

    def segment(self, z: Tensor, context: Tensor, sd_features: Mapping[int, Tensor] | None = None) -> Tensor:
        timesteps = torch.zeros(z.shape[0], device=z.device)
        return self.final(self.out(self.forward_features(z, timesteps, context, sd_features))).float()

    def forward(self, z: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        return self.segment(z, context)


def _checkpointed(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(*args) -> Tensor:
        if not torch.is_grad_enabled():
            return forward(*args)
        return checkpoint(forward, *args, use_reentrant=False)
    return run
