"""A head's learned presence output: one logit per sample saying whether the phrase is in the image.

It reads the decoder feature the mask is decided from (``forward_features``, [B, C, h, w], before
``out``), pooled two ways so that both a large faint region (mean) and a small sharp one (max)
count: [B, 2C] -> Linear -> SiLU -> Linear -> [B]. Trained with BCE against "the mask is not
empty", the absent phrases being the trainer's negatives (CLIPSeg's sampling).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PRESENCE_HIDDEN = 64
"""Width of the hidden layer."""


class PresenceHead(nn.Module):
    """``forward(feature [B, C, h, w]) -> logit [B]`` (float32)."""

    def __init__(self, channels: int, hidden: int = PRESENCE_HIDDEN):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, feature: Tensor) -> Tensor:
        pooled = torch.cat([feature.mean(dim=(2, 3)), feature.amax(dim=(2, 3))], dim=1)
        return self.mlp(pooled.to(self.mlp[0].weight.dtype))[:, 0].float()
