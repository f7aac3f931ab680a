"""The exponential moving average of a head's weights: what a run saves as its head."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.build import HeadConfig, build_head


class EMA:
    """Exponential moving average of a module's float tensors, with ldm's warm-up:
    decay_n = min(decay, (1 + n) / (10 + n)) at update n."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = module.state_dict()
        torch._foreach_lerp_(list(self.shadow.values()), [state[k].float() for k in self.shadow], 1.0 - decay)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def module(self, config: HeadConfig) -> nn.Module:
        """A new head holding a copy of the averaged weights (float32, eval mode, no gradients)."""
        with torch.device("meta"):
            head = build_head(config)
        head.load_state_dict({k: v.clone() for k, v in self.shadow.items()}, assign=True)
        return head.eval().requires_grad_(False)
