"""The SD v1 noise schedule: scaled-linear betas from 0.00085 to 0.012 over 1000 steps."""

from __future__ import annotations

import torch
from torch import Tensor

NUM_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012


def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS, start: float = LINEAR_START, end: float = LINEAR_END,
                   spacing: str = "scaled_linear") -> Tensor:
    """Cumulative products of 1 - beta [num_timesteps], float64, for betas from ``start`` to ``end``: linear in
    sqrt(beta) ("scaled_linear", SD's: ldm's ``make_beta_schedule("linear")``) or in beta ("linear")."""
    if spacing == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    elif spacing == "linear":
        betas = torch.linspace(start, end, num_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"spacing must be 'scaled_linear' or 'linear', got {spacing!r}")
    return torch.cumprod(1.0 - betas, dim=0)


# The last entry A1111 and Forge give a rescaled table: with exactly 0, 1 / sqrt(a_T) would be infinite.
ZERO_TERMINAL_ALPHA = 4.8973451890853435e-08


def rescale_zero_terminal_snr(table: Tensor) -> Tensor:
    """``table`` (alphas_cumprod) shifted and scaled in sqrt(a) so that the last timestep has zero SNR and
    the first keeps its value (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Algorithm 1), float64; the last entry is ZERO_TERMINAL_ALPHA, as the WebUIs make it."""
    root = table.to(torch.float64).sqrt()
    first, last = root[0], root[-1]
    rescaled = ((root - last) * first / (first - last)) ** 2
    rescaled[-1] = ZERO_TERMINAL_ALPHA
    return rescaled


class NoiseSchedule:
    """Forward diffusion q(z_t | z_0) for a given ``alphas_cumprod`` table (the host's or the SD v1 one)."""

    def __init__(self, table: Tensor | None = None):
        self.alphas_cumprod = (alphas_cumprod() if table is None else table).to(torch.float64).cpu()
        self._tables: dict[torch.device, Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alphas_at(self, t: Tensor) -> Tensor:
        """a_t = alphas_cumprod[t], float32 [B] on t's device for integer t [B]: looked up there, with no
        copy to the host, so that a captured CUDA graph can hold the lookup."""
        table = self._tables.get(t.device)
        if table is None:
            table = self._tables[t.device] = self.alphas_cumprod.to(t.device, torch.float32)
        return table[t.long()]

    def q_sample(self, z: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """z_t = sqrt(a_t) z + sqrt(1 - a_t) noise, [B, C, h, w] for z [B, C, h, w], integer t [B] and
        noise [B or 1, C, h, w] on any device (one noise for the whole batch; it is first put on z's
        device and dtype, so a half-precision model's noise is rounded as its latents are)."""
        a = self.alphas_at(t.to(z.device))[:, None, None, None]
        noise = noise.to(z.device, z.dtype)
        return (a.sqrt() * z.float() + (1 - a).sqrt() * noise.float()).to(z.dtype)


OFFICIAL_TIMESTEPS = (300, 500)
"""The official code draws the feature timestep uniformly from [300, 500)."""


def noise_draws(seed: int, count: int, shape: tuple[int, ...], timestep: int | None) -> list[tuple[int, Tensor]]:
    """``count`` (timestep, noise [shape]) pairs from one seeded CPU generator.

    ``timestep`` None draws each timestep from OFFICIAL_TIMESTEPS as the official code does. The
    pairs depend only on the arguments, so a result never depends on what was computed before, and
    an image gets the same noise alone or inside a batch (pass the per-image shape).
    """
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(count):
        t = timestep if timestep is not None else int(torch.randint(*OFFICIAL_TIMESTEPS, (1,), generator=generator))
        draws.append((t, torch.randn(shape, generator=generator)))
    return draws


PREDICTIONS = ("eps", "v")
"""What a denoiser predicts: the noise (SD 1.x, SDXL base) or v (SD 2.x 768-v, v-prediction fine-tunes)."""


def v_to_eps(v: Tensor, z_t: Tensor, schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """eps from a v-prediction: with z_t = sqrt(a) z_0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) z_0,
    eps = sqrt(a) v + sqrt(1 - a) z_t (a = alphas_cumprod[t])."""
    a = schedule.alphas_at(t.to(v.device))[:, None, None, None]
    return (a.sqrt() * v.float() + (1 - a).sqrt() * z_t.float()).to(v.dtype)
