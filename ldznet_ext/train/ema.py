"""The exponential moving average of a model's weights: what a head run saves as its head, and
what the micro SD stage saves as its UNet."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.build import HeadConfig, build_head


class EMA:
    """Exponential moving average of a module's float tensors, with ldm's warm-up: the k-th update
    uses min(decay, (1 + k) / (10 + k)), k counted from ``count_from`` (ldm counts from 1; the
    micro SD stage, whose shipped model was trained so, from 0)."""

    def __init__(self, module: nn.Module, decay: float, count_from: int = 1):
        self.decay = decay
        self.count_from = count_from
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        count = self.updates + self.count_from
        self.updates += 1
        decay = min(self.decay, (1 + count) / (10 + count))
        state = module.state_dict()
        torch._foreach_lerp_(list(self.shadow.values()), [state[k].float() for k in self.shadow], 1.0 - decay)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def copy_to(self, module: nn.Module) -> nn.Module:
        """``module`` (the one averaged, or one like it) with the averaged weights loaded in place."""
        module.load_state_dict(self.shadow)
        return module

    def module(self, config: HeadConfig) -> nn.Module:
        """A new head holding a copy of the averaged weights (float32, eval mode, no gradients)."""
        with torch.device("meta"):
            head = build_head(config)
        head.load_state_dict({k: v.clone() for k, v in self.shadow.items()}, assign=True)
        return head.eval().requires_grad_(False)
