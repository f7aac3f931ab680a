"""The one seeded draw from a VAE's diagonal Gaussian posterior, shared by every backbone."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_posterior(mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``mean + std * noise`` [B, C, h, w], the noise drawn in float32 from ``generator`` on the
    generator's device, never from the global RNG (ldm's ``posterior.sample()`` uses it): a seeded
    CPU generator gives the same latent on any device and whatever else draws random numbers."""
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
    return mean + std * noise.to(mean)
