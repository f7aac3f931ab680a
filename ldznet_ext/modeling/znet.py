"""ZNet: the SD UNet topology run at t = 0 on the latent z, decoding full-resolution mask logits."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..sd.unet import UNetConfig, UNetModel, normalization, zero_module
from .presence import PresenceHead


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
    A head built with a presence output (``build_head``) has ``presence``; ``with_presence=True``
    then returns ``(logits, presence logit [B])`` from the same UNet pass.
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        ch = config.model_channels
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1)), nn.SiLU())
        self.final = upsampling_decoder(config.out_channels)
        self.presence: PresenceHead | None = None  # a submodule only when built with one: old keys stay

    def add_presence(self) -> None:
        """Give the head a fresh presence output (``modeling.presence``), drawn from the global RNG."""
        self.presence = PresenceHead(self.config.model_channels)

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

    def segment(self, z: Tensor, context: Tensor, sd_features: Mapping[int, Tensor] | None = None,
                with_presence: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Mask logits [B, 1, 8h, 8w]; with ``with_presence`` also the presence logits [B]."""
        timesteps = torch.zeros(z.shape[0], device=z.device)
        feature = self.forward_features(z, timesteps, context, sd_features)
        logits = self.final(self.out(feature)).float()
        if not with_presence:
            return logits
        if self.presence is None:
            raise ValueError("this head has no presence output")
        return logits, self.presence(feature)

    def forward(self, z: Tensor, context: Tensor,  # type: ignore[override]
                with_presence: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        return self.segment(z, context, with_presence=with_presence)


def _checkpointed(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(*args) -> Tensor:
        if not torch.is_grad_enabled():
            return forward(*args)
        return checkpoint(forward, *args, use_reentrant=False)
    return run
