"""Zero-shot masks from the SD model alone, before any segmentation head is trained.

The paper's Figure 1: where the text changes the noise prediction, the text's object is. For
each term, the per-pixel norm of eps(z_t, t, text) - eps(z_t, t, "") is averaged over a few noise
draws and normalised to [0, 1]. Conditional and unconditional predictions go through the UNet as
one batch. Optionally the text cross-attention of the same call is recorded (recomputed from the
attention inputs in forward hooks, since optimised attention never materialises the
probabilities) and blended in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sd.model import Backbone
from .sd.schedule import noise_draws
from .sd.tokenizer import BOS_ID, EOS_ID, tokenize
from .tap import spatial_transformers


@dataclass(frozen=True)
class ZeroShotSettings:
    """timestep: SD timestep of the probe (None: drawn per draw from 300..499); draws: noise draws
    averaged; cross_attention: weight in [0, 1] of the cross-attention map blended with the
    eps-difference map (0 = off, no hooks)."""

    timestep: int | None = 400
    draws: int = 4
    cross_attention: float = 0.0

    def __post_init__(self):
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.timestep is not None and not 0 <= self.timestep < 1000:
            raise ValueError(f"timestep must be in [0, 1000), got {self.timestep}")
        if not 0.0 <= self.cross_attention <= 1.0:
            raise ValueError(f"cross_attention weight must be in [0, 1], got {self.cross_attention}")


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each map [..., h, w] to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def term_token_spans(prompts: Sequence[str]) -> list[tuple[int, int]]:
    """For each prompt, the [start, stop) positions of its content tokens in the 77-token context."""
    spans = []
    for ids in tokenize(prompts).tolist():
        stop = ids.index(EOS_ID) if EOS_ID in ids else len(ids)
        spans.append((1 if ids[0] == BOS_ID else 0, stop))
    return spans


class CrossAttentionRecorder:
    """Record, during one UNet call, each spatial transformer's text cross-attention mass on given
    token spans: ``maps`` [B, h, w] per block, averaged over heads and summed over the span.

    Works on ldm-layout UNets whose ``attn2`` has ``to_q``, ``to_k`` and ``heads``.
    """

    def __init__(self, unet: nn.Module, spans: Sequence[tuple[int, int] | None]):
        self.transformers = spatial_transformers(unet)
        self.spans = list(spans)
        self.maps: list[Tensor] = []
        self._handles: list = []

    def __enter__(self) -> CrossAttentionRecorder:
        for transformer in self.transformers:
            sizes: dict = {}
            self._handles.append(transformer.register_forward_pre_hook(
                lambda module, args, sizes=sizes: sizes.update(hw=tuple(args[0].shape[-2:]))))
            attention = transformer.transformer_blocks[0].attn2
            self._handles.append(attention.register_forward_hook(self._hook(sizes), with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, sizes: dict):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            x = args[0]
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            heads = module.heads
            q, k = module.to_q(x), module.to_k(context)
            b, n, inner = q.shape
            q = q.view(b, n, heads, -1).transpose(1, 2).float()
            k = k.view(b, k.shape[1], heads, -1).transpose(1, 2).float()
            probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(1)  # [B, n, 77]
            masses = torch.zeros(b, n, device=x.device)
            for i, span in enumerate(self.spans):
                if span is not None:
                    masses[i] = probs[i, :, span[0]:span[1]].sum(-1)
            self.maps.append(masses.view(b, *sizes["hw"]))

        return hook

    def mean_map(self, size: tuple[int, int]) -> Tensor:
        """All recorded block maps resized to ``size`` (h, w) and averaged: [B, h, w]."""
        resized = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in self.maps]
        return torch.stack(resized).mean(0)


@torch.no_grad()
def zero_shot_maps(backbone: Backbone, z: Tensor, terms: Sequence[str], context: Tensor, settings: ZeroShotSettings,
                   seed: int = 0) -> Tensor:
    """Zero-shot probability maps [N, T, h, w] in [0, 1] at z resolution for latents z [N, 4, h, w]
    and the terms' text context [T, 77, D]."""
    n, t_count = z.shape[0], len(terms)
    uncond = backbone.encode_text([""])
    contexts = torch.cat([context, uncond]).repeat(n, 1, 1)  # per image: T conditional + 1 unconditional
    spans = [*term_token_spans(terms), None] * n
    difference = torch.zeros(n, t_count, *z.shape[-2:], device=z.device)
    attention = torch.zeros_like(difference)
    for timestep, noise in noise_draws(seed, settings.draws, (1, *z.shape[1:]), settings.timestep):
        z_t = backbone.schedule.q_sample(z, torch.full((n,), timestep), noise.to(z.device, z.dtype).expand_as(z))
        z_t = z_t.repeat_interleave(t_count + 1, dim=0)
        t = torch.full((z_t.shape[0],), timestep, device=z.device, dtype=torch.long)
        if settings.cross_attention > 0:
            with CrossAttentionRecorder(backbone.unet, spans) as recorder:
                eps = backbone.predict_noise(z_t, t, contexts)
            attention += recorder.mean_map(tuple(z.shape[-2:])).view(n, t_count + 1, *z.shape[-2:])[:, :t_count]
        else:
            eps = backbone.predict_noise(z_t, t, contexts)
        eps = eps.float().view(n, t_count + 1, *eps.shape[1:])
        difference += (eps[:, :t_count] - eps[:, t_count:]).norm(dim=2)
    maps = normalize_maps(difference)
    if settings.cross_attention > 0:
        w = settings.cross_attention
        maps = (1 - w) * maps + w * normalize_maps(attention)
    return maps
