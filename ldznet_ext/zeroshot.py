"""Zero-shot masks from the SD model alone, before any segmentation head is trained.

The paper's Figure 1: where the text changes the noise prediction, the text's object is. Each
draw noises the image latent z to z_t, and the UNet predicts eps for every term and for the
empty prompt in one batch. eps_u - eps_c is, up to a positive factor sqrt(1 - a_t) / sqrt(a_t),
x0_c - x0_u: the direction in which the text moves the predicted clean latent. Two per-pixel
scores, summed over draws and min-max normalised to [0, 1] per map:

- ``"agreement"`` (default): <eps_u - eps_c, z - mean(z)> over the latent channels, positive
  where the text pulls the prediction toward what the pixel shows (its deviation from the
  image's mean latent), negative where it pulls it away;
- ``"difference"``: the paper's |eps_c - eps_u|.

Why agreement: the norm responds to any change, and any text changes the prediction at every
object, so it marks all objects for every term, and for a region like "sand" it peaks where the
image is NOT sand (the text pushes those pixels toward sand). On the micro world (771 present
phrases of world:test:100) the pixel AUC of telling the named object from the other objects
rises from 0.60 to 0.65 and that of stuff regions from 0.52 to 0.57 (that of objects against
the background falls from 0.90 to 0.75); maps of large regions come out broad and those of
objects peaked, so one threshold fits both: mIoU 20.3 -> 26.5 (the variants tried:
docs/micro-world-experiments.md).

Optionally the text cross-attention of the same call is recorded (recomputed from the attention
inputs in forward hooks, since optimised attention never materialises the probabilities) and
blended in. Cost: ``draws`` UNet calls (4 by default) on a batch of N x (T + 1) latents (48 x 48
for a 384 px image), the same as the plain eps difference, and no other model calls.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones.base import Backbone, Conditioning, UNetLayout
from .limits import DRAWS, TIMESTEP
from .sd.schedule import noise_draws
from .sd.tokenizer import BOS_ID, EOS_ID, tokenize
from .tap import unet_lock

SCORES = ("agreement", "difference")


@dataclass(frozen=True)
class ZeroShotSettings:
    """timestep: SD timestep of the probe (None: drawn per draw from 300..499); draws: noise draws
    summed; score: "agreement" or "difference" (module docstring); cross_attention: weight in
    [0, 1] of the cross-attention map blended with the score map (0 = off, no hooks);
    attention_blocks: spatial-transformer blocks of the backbone's layout (1-16 for SD v1) whose
    maps are averaged (None: all)."""

    timestep: int | None = 400
    draws: int = 4
    score: str = "agreement"
    cross_attention: float = 0.0
    attention_blocks: tuple[int, ...] | None = None

    def __post_init__(self):
        DRAWS.check(self.draws, "draws")
        if self.timestep is not None:
            TIMESTEP.check(self.timestep, "timestep")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if not 0.0 <= self.cross_attention <= 1.0:
            raise ValueError(f"cross_attention weight must be in [0, 1], got {self.cross_attention}")
        if self.attention_blocks is not None and (not self.attention_blocks or min(self.attention_blocks) < 1):
            raise ValueError(f"attention_blocks must be None or block numbers >= 1, got {self.attention_blocks}")


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each map [..., h, w] to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def term_token_spans(prompts: Sequence[str]) -> list[tuple[int, int]]:
    """For each prompt, the [start, stop) positions of its content tokens in a CLIP-tokenised context."""
    spans = []
    for ids in tokenize(prompts).tolist():
        stop = ids.index(EOS_ID) if EOS_ID in ids else len(ids)
        spans.append((1 if ids[0] == BOS_ID else 0, stop))
    return spans


class CrossAttentionRecorder:
    """Record, during one UNet call, the text cross-attention mass of chosen spatial transformers
    of a layout (``blocks``, numbered from 1; None: all) on given token spans: ``maps`` [B, h, w]
    per block, averaged over heads and summed over the span.

    Reads each site's ``cross_attention`` (``to_q``, ``to_k`` and ``heads``, see
    ``backbones.base.TransformerSite``). Thread-safe as :class:`tap.FeatureTap`: it holds the
    UNet's lock and records only its own thread's calls.
    """

    def __init__(self, layout: UNetLayout, spans: Sequence[tuple[int, int] | None],
                 blocks: Sequence[int] | None = None):
        self.sites = [layout.sites[b - 1] for b in layout.pick(blocks, "attention blocks")]
        self._lock = unet_lock(layout.unet)
        self._thread: int | None = None
        self.spans = list(spans)
        self.maps: list[Tensor] = []
        self._handles: list = []

    def __enter__(self) -> CrossAttentionRecorder:
        self._lock.acquire()
        self._thread = threading.get_ident()
        for site in self.sites:
            sizes: dict = {}
            self._handles.append(site.module.register_forward_pre_hook(self._size_hook(sizes)))
            self._handles.append(site.cross_attention.register_forward_hook(self._hook(sizes), with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._thread = None
        self._lock.release()

    def _size_hook(self, sizes: dict):
        def hook(module: nn.Module, args: tuple) -> None:
            if threading.get_ident() == self._thread:
                sizes.update(hw=tuple(args[0].shape[-2:]))

        return hook

    def _hook(self, sizes: dict):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if threading.get_ident() != self._thread:  # another thread's call of a shared UNet
                return
            x = args[0]
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            heads = module.heads
            q, k = module.to_q(x), module.to_k(context)
            b, n, inner = q.shape
            q = q.view(b, n, heads, -1).transpose(1, 2).float()
            k = k.view(b, k.shape[1], heads, -1).transpose(1, 2).float()
            probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(1)  # [B, n, T]
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
def zero_shot_maps(backbone: Backbone, z: Tensor, terms: Sequence[str], conditioning: Conditioning,
                   settings: ZeroShotSettings, seed: int = 0) -> Tensor:
    """Zero-shot probability maps [N, T, h, w] in [0, 1] at z resolution for latents z [N, C, h, w]
    and the terms' conditioning (T rows)."""
    n, t_count = z.shape[0], len(terms)
    uncond = backbone.encode_text([""])
    contexts = Conditioning.cat([conditioning, uncond]).repeat(n)  # per image: T conditional + 1 unconditional
    spans = [*term_token_spans(terms), None] * n
    dtype = torch.promote_types(z.dtype, torch.float32)  # fp16/bf16 models: score in fp32
    centred = (z.to(dtype) - z.to(dtype).mean((-2, -1), keepdim=True))[:, None]  # [N, 1, C, h, w]
    score = torch.zeros(n, t_count, *z.shape[-2:], device=z.device, dtype=dtype)
    attention = torch.zeros_like(score)
    for timestep, noise in noise_draws(seed, settings.draws, (1, *z.shape[1:]), settings.timestep):
        z_t = backbone.schedule.q_sample(z, torch.full((n,), timestep), noise.to(z.device, z.dtype).expand_as(z))
        z_t = z_t.repeat_interleave(t_count + 1, dim=0)
        t = torch.full((z_t.shape[0],), timestep, device=z.device, dtype=torch.long)
        if settings.cross_attention > 0:
            with CrossAttentionRecorder(backbone.layout, spans, settings.attention_blocks) as recorder:
                eps = backbone.predict_noise(z_t, t, contexts)
            attention += recorder.mean_map(tuple(z.shape[-2:])).view(n, t_count + 1, *z.shape[-2:])[:, :t_count]
        else:
            eps = backbone.predict_noise(z_t, t, contexts)
        eps = eps.to(dtype).view(n, t_count + 1, *eps.shape[1:])
        change = eps[:, t_count:] - eps[:, :t_count]  # eps_u - eps_c, the direction of x0_c - x0_u
        score += (change * centred).sum(2) if settings.score == "agreement" else change.norm(dim=2)
    maps = normalize_maps(score)
    if settings.cross_attention > 0:
        w = settings.cross_attention
        maps = (1 - w) * maps + w * normalize_maps(attention)
    return maps
