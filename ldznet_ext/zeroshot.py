"""Zero-shot masks from the SD model alone, before any segmentation head is trained.

Each draw noises the image latent z to z_t and runs the UNet once on a batch of the terms. Three
per-pixel scores, summed over draws and min-max normalised to [0, 1] per map:

- ``"attention"`` (default; the DAAM / DiffSegmenter / iSeg family): how much each pixel's
  queries attend to the term's tokens in the text cross-attention, averaged over heads, in the
  blocks chosen by resolution (1/D of the latent's side, so one setting serves every layout), each
  block's map divided by its sum and the resolutions weighted; optionally carried k times
  through the self-attention of the finest blocks (map = A^k @ c, A averaged over heads, blocks
  and the image's rows; iSeg-style sharpening of A as an option). No unconditional row. The
  probabilities are recomputed from the attention inputs in forward hooks, since optimised
  attention never materialises them, only in the chosen blocks (the self-attention's [hw, hw] one
  head at a time).
- ``"agreement"``: the paper's Figure 1 turned signed. The batch also holds the empty prompt;
  eps_u - eps_c is, up to a positive factor sqrt(1 - a_t) / sqrt(a_t), x0_c - x0_u, the direction
  in which the text moves the predicted clean latent, and the score is <eps_u - eps_c, z - mean(z)>
  over the latent channels: positive where the text pulls the prediction toward what the pixel
  shows, negative where it pulls it away. The norm responds to any change, and any text changes
  the prediction at every object, so it would mark all objects for every term, and for a region
  like "sand" peak where the image is NOT sand.
- ``"difference"``: the paper's |eps_c - eps_u|.

For the last two, the cross-attention of the same call can be blended in. Which settings were
tried on the micro world and how they scored: docs/micro-world-experiments.md, "Zero-shot
variants" (``tools/zero_shot_sweep.py``). Cost: ``draws`` UNet calls on N x T latents (attention)
or N x (T + 1) (agreement, difference, which also encode the empty prompt once per call).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .backbones.base import Backbone, Conditioning, UNetLayout
from .errors import LdznetError
from .graphs import Runner, eager
from .limits import (ATTENTION_BLOCK, CROSS_ATTENTION, DOWNSCALE, DRAWS, PROPAGATION_STEPS, SCALE_WEIGHT, SHARPEN,
                     TIMESTEP, shown)
from .sd.schedule import noise_draws
from .sd.tokenizer import term_token_spans
from .tap import UNetHooks

SCORES = ("attention", "agreement", "difference")


ZERO_SHOT_RESOLUTION = 384
"""The working side of zero-shot masks on a model whose file records none (real SD files): the paper's 384 px."""


@dataclass(frozen=True)
class ZeroShotSettings:
    """timestep: SD timestep of the probe (None: drawn per draw from 300..499); draws: noise draws
    summed; score: "attention", "agreement" or "difference" (module docstring). The defaults are the
    attention score's; agreement was chosen at timestep=400, draws=4.

    For "agreement" and "difference": cross_attention: weight in [0, 1] of the cross-attention map
    blended with the score map (0 = off, no hooks); attention_blocks: spatial-transformer blocks of
    the backbone's layout (1-16 for SD v1) whose maps are averaged (None: all).

    For "attention": attention_scales: (downscale, weight) pairs, the cross-attention of every block
    running at 1/downscale of the latent's side, weighted (by resolution, so one setting serves
    every layout; scales a layout lacks are skipped; None: the layout's finest scale, latent/1 for
    SD v1 and latent/2 for SDXL, which has no transformer at full latent size); self_attention_scale:
    the downscale of the blocks whose self-attention propagates the map (None: the layout's finest);
    propagation_steps: how many times (0: cross-attention alone, DAAM-style); sharpen: exponent
    >= 1 applied to the self-attention before its rows are renormalised (lower entropy)."""

    timestep: int | None = 100
    draws: int = 2
    score: str = "attention"
    cross_attention: float = 0.0
    attention_blocks: tuple[int, ...] | None = None
    attention_scales: tuple[tuple[int, float], ...] | None = None
    self_attention_scale: int | None = None
    propagation_steps: int = 0
    sharpen: float = 1.0

    def __post_init__(self):
        DRAWS.check(self.draws, "draws")
        if self.timestep is not None:
            TIMESTEP.check(self.timestep, "timestep")
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise LdznetError(f"score must be one of {', '.join(SCORES)}, got {shown(self.score)}")
        CROSS_ATTENTION.check(self.cross_attention, "cross_attention")
        if self.attention_blocks is not None:
            if not isinstance(self.attention_blocks, (tuple, list)) or not self.attention_blocks:
                raise LdznetError(f"attention_blocks must be None or a tuple of block numbers, "
                                  f"got {shown(self.attention_blocks)}")
            for block in self.attention_blocks:
                ATTENTION_BLOCK.check(block, "attention block")
            object.__setattr__(self, "attention_blocks", tuple(self.attention_blocks))  # a list, as a script passes
        if self.attention_scales is not None:
            scales = self.attention_scales
            pairs = isinstance(scales, (tuple, list)) and all(
                isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in scales)
            for downscale, weight in scales if pairs else ():
                DOWNSCALE.check(downscale, "attention scale downscale")
                SCALE_WEIGHT.check(weight, "attention scale weight")
            if not pairs or sum(weight for _, weight in scales) <= 0:
                raise LdznetError(f"attention_scales must hold (downscale, weight) pairs with a positive weight, "
                                  f"got {shown(scales)}")
            object.__setattr__(self, "attention_scales", tuple(tuple(pair) for pair in scales))
        if self.self_attention_scale is not None:
            DOWNSCALE.check(self.self_attention_scale, "self_attention_scale")
        PROPAGATION_STEPS.check(self.propagation_steps, "propagation_steps")
        SHARPEN.check(self.sharpen, "sharpen")


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each map [..., h, w] to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def token_spans(backbone: Backbone, prompts: Sequence[str]) -> list[tuple[int, int]]:
    """The content-token spans of ``prompts`` in ``backbone``'s context: its own ``token_spans`` where it
    tokenises otherwise than SD's CLIP tokenizer does (textual inversions: a host's, a pipeline's), else
    ``sd.tokenizer.term_token_spans``."""
    return getattr(backbone, "token_spans", term_token_spans)(prompts)


def head_mean_attention(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) averaged over heads: [n, m] for one batch row's queries q [H, n, d]
    and keys k [H, m, d], in fp32, one head's [n, m] at a time (never all heads' at once)."""
    scale = q.shape[-1] ** -0.5
    total = torch.zeros(q.shape[1], k.shape[1], device=q.device, dtype=torch.float32)
    for head_q, head_k in zip(q.float(), k.float()):
        total += torch.softmax(head_q @ head_k.T * scale, dim=-1)
    return total / q.shape[0]


def _queries_keys(module: nn.Module, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
    """An attention module's queries of x and keys of context, per head: [B, H, n, d], [B, H, m, d]."""
    heads = module.heads
    q, k = module.to_q(x), module.to_k(context)
    return (q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2),
            k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2))


def blocks_at(layout: UNetLayout, downscales: Sequence[int]) -> tuple[int, ...]:
    """The block numbers (from 1) of the layout's spatial transformers at 1/downscale of the latent's side."""
    return tuple(number for number, site in enumerate(layout.sites, 1) if site.downscale in downscales)


class CrossAttentionRecorder(UNetHooks):
    """Record, during one UNet call, the text cross-attention mass of chosen spatial transformers
    of a layout (``blocks``, numbered from 1; None: all) on given token spans: ``maps`` [B, h, w]
    per block in block order, averaged over heads and summed over the span. With
    ``self_attention_blocks``, also the self-attention of those blocks, averaged over heads, blocks
    and the ``rows_per_image`` consecutive batch rows of each image: ``affinity`` [N / rows, hw, hw]
    (row i: where pixel i attends), its side ``affinity_size``.

    Probabilities are recomputed from each module's inputs (``to_q``, ``to_k``, ``heads``, see
    ``backbones.base.TransformerSite``), since optimised attention never materialises them.
    Thread-safe as every :class:`tap.UNetHooks`: it holds the UNet's lock and records only its own
    thread's calls.
    """

    def __init__(self, layout: UNetLayout, spans: Sequence[tuple[int, int] | None],
                 blocks: Sequence[int] | None = None, self_attention_blocks: Sequence[int] = (),
                 rows_per_image: int = 1):
        self.sites = [layout.sites[b - 1] for b in layout.pick(blocks, "attention blocks")]
        self.self_sites = [layout.sites[b - 1] for b in layout.pick(self_attention_blocks, "attention blocks")]
        unexposed = [site.name for site in self.self_sites if site.self_attention is None]
        if unexposed:
            raise ValueError(f"the layout does not expose the self-attention of {', '.join(unexposed)}")
        super().__init__(layout.unet)
        self.spans = list(spans)
        self.rows_per_image = rows_per_image
        self.maps: list[Tensor] = []
        self.affinity: Tensor | None = None
        self.affinity_size: tuple[int, int] | None = None

    def _install(self) -> Iterator[RemovableHandle]:
        self.maps, self.affinity, self._affinity_count = [], None, 0
        for site in {id(s): s for s in self.sites + self.self_sites}.values():
            sizes: dict = {}
            yield site.module.register_forward_pre_hook(self._size_hook(sizes))
            if site in self.sites:
                yield site.cross_attention.register_forward_hook(self._hook(sizes), with_kwargs=True)
            if site in self.self_sites:
                yield site.self_attention.register_forward_hook(self._self_hook(sizes))

    def _finish(self) -> None:
        if self.affinity is not None:
            self.affinity /= self._affinity_count

    def _size_hook(self, sizes: dict):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.owns_call():
                sizes.update(hw=tuple(args[0].shape[-2:]))

        return hook

    def _hook(self, sizes: dict):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if not self.owns_call():
                return
            x = args[0]
            # ldm passes the text as context=, diffusers as encoder_hidden_states=, older code positionally.
            context = kwargs.get("context", kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None))
            q, k = _queries_keys(module, x, context)
            probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(1)
            masses = torch.zeros(x.shape[0], x.shape[1], device=x.device)
            for i, span in enumerate(self.spans):
                if span is not None:
                    masses[i] = probs[i, :, span[0]:span[1]].sum(-1)
            self.maps.append(masses.view(x.shape[0], *sizes["hw"]))

        return hook

    def _self_hook(self, sizes: dict):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self.owns_call():
                return
            x = args[0]
            q, k = _queries_keys(module, x, x)
            if self.affinity is None:
                n = x.shape[0] // self.rows_per_image
                self.affinity = torch.zeros(n, x.shape[1], x.shape[1], device=x.device)
                self.affinity_size = sizes["hw"]
            for row in range(x.shape[0]):
                self.affinity[row // self.rows_per_image] += head_mean_attention(q[row], k[row])
            self._affinity_count += self.rows_per_image

        return hook

    def mean_map(self, size: tuple[int, int]) -> Tensor:
        """All recorded block maps resized to ``size`` (h, w) and averaged: [B, h, w]."""
        resized = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in self.maps]
        return torch.stack(resized).mean(0)


def propagate(cross: Tensor, affinity: Tensor, steps: int, sharpen: float = 1.0) -> Tensor:
    """Maps cross [n, T, P] on P pixels carried ``steps`` times through the self-attention affinity
    [n, P, P] (row-stochastic: row i is where pixel i attends): A^steps @ c per map, A's entries
    first raised to ``sharpen`` and its rows renormalised."""
    if sharpen != 1.0:  # A ** p with rows renormalised, as a softmax of p log A so that no row underflows
        affinity = torch.softmax(sharpen * affinity.clamp_min(1e-30).log(), dim=-1)
    maps = cross.transpose(1, 2)
    for _ in range(steps):
        maps = affinity @ maps
    return maps.transpose(1, 2)


def _noised(backbone: Backbone, z: Tensor, timestep: int, noise: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """z noised to ``timestep`` with one noise shared by every image, each image repeated ``rows``
    times, and the timesteps [N * rows]."""
    n = z.shape[0]
    z_t = backbone.schedule.q_sample(z, torch.full((n,), timestep), noise)
    z_t = z_t.repeat_interleave(rows, dim=0)
    return z_t, torch.full((z_t.shape[0],), timestep, device=z.device, dtype=torch.long)


def _weighted_cross(recorder: CrossAttentionRecorder, weights: Sequence[float], size: tuple[int, int]) -> Tensor:
    """The recorded block maps, each divided by its spatial sum (so every block counts alike), resized
    to ``size`` and summed with ``weights``: [B, h, w]."""
    total = 0
    for block_map, weight in zip(recorder.maps, weights):
        block_map = block_map / block_map.sum((-2, -1), keepdim=True).clamp_min(1e-30)
        resized = F.interpolate(block_map[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        total = total + weight * resized
    return total


def attention_maps(backbone: Backbone, z: Tensor, terms: Sequence[str], conditioning: Conditioning,
                   settings: ZeroShotSettings, seed: int = 0, run: Runner = eager) -> Tensor:
    """The "attention" score: [N, T, h, w] in [0, 1] at z resolution, one UNet call per draw on the
    N x T batch of terms (no unconditional row); ``run`` makes each draw's call (``graphs.eager``, or
    ``Segmenter.run_graphed``)."""
    layout = backbone.layout
    finest = min(site.downscale for site in layout.sites)
    weight_of = dict(settings.attention_scales or ((finest, 1.0),))
    blocks = blocks_at(layout, tuple(weight_of))
    if not blocks:
        raise LdznetError(f"no spatial transformer at attention scales {sorted(weight_of)}; this UNet's run at "
                          f"{sorted({s.downscale for s in layout.sites})}")
    per_scale = Counter(layout.sites[b - 1].downscale for b in blocks)
    weights = [weight_of[s] / per_scale[s] for s in (layout.sites[b - 1].downscale for b in blocks)]
    self_scale = settings.self_attention_scale or finest
    self_blocks = blocks_at(layout, (self_scale,)) if settings.propagation_steps else ()
    if settings.propagation_steps and not self_blocks:
        raise LdznetError(f"no spatial transformer at self_attention_scale {self_scale}")
    n, t_count = z.shape[0], len(terms)
    contexts = conditioning.repeat(n)
    spans = token_spans(backbone, terms) * n

    def attention(z_t: Tensor, t: Tensor, *tensors: Tensor) -> tuple[Tensor]:
        with CrossAttentionRecorder(layout, spans, blocks, self_blocks, rows_per_image=t_count) as recorder:
            backbone.predict_noise(z_t, t, contexts.with_tensors(tensors))
        size = recorder.affinity_size or max((m.shape[-2:] for m in recorder.maps), key=lambda hw: hw[0] * hw[1])
        cross = _weighted_cross(recorder, weights, tuple(size)).view(n, t_count, -1)
        if self_blocks:
            cross = propagate(cross, recorder.affinity, settings.propagation_steps, settings.sharpen)
        return F.interpolate(cross.view(n, t_count, *size), size=z.shape[-2:], mode="bilinear", align_corners=False),

    total = torch.zeros(n, t_count, *z.shape[-2:], device=z.device)
    for timestep, noise in noise_draws(seed, settings.draws, (1, *z.shape[1:]), settings.timestep):
        z_t, t = _noised(backbone, z, timestep, noise, t_count)
        total += run("zero-shot attention", attention, (z_t, t, *contexts.tensors()), tuple(spans))[0]
    return normalize_maps(total)


@torch.no_grad()
def zero_shot_maps(backbone: Backbone, z: Tensor, terms: Sequence[str], conditioning: Conditioning,
                   settings: ZeroShotSettings, seed: int = 0, run: Runner = eager) -> Tensor:
    """Zero-shot probability maps [N, T, h, w] in [0, 1] at z resolution for latents z [N, C, h, w]
    and the terms' conditioning (T rows); ``run`` makes each draw's UNet call (``graphs.eager``, or
    ``Segmenter.run_graphed``)."""
    if settings.score == "attention":
        return attention_maps(backbone, z, terms, conditioning, settings, seed, run)
    n, t_count = z.shape[0], len(terms)
    uncond = backbone.encode_text([""])
    contexts = Conditioning.cat([conditioning, uncond]).repeat(n)  # per image: T conditional + 1 unconditional
    spans = [*token_spans(backbone, terms), None] * n
    dtype = torch.promote_types(z.dtype, torch.float32)  # fp16/bf16 models: score in fp32
    centred = (z.to(dtype) - z.to(dtype).mean((-2, -1), keepdim=True))[:, None]  # [N, 1, C, h, w]

    def denoise(z_t: Tensor, t: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        """eps, and with cross-attention the recorded attention maps [N * (T + 1), h, w]."""
        rows = contexts.with_tensors(tensors)
        if settings.cross_attention <= 0:
            return backbone.predict_noise(z_t, t, rows),
        with CrossAttentionRecorder(backbone.layout, spans, settings.attention_blocks) as recorder:
            eps = backbone.predict_noise(z_t, t, rows)
        return eps, recorder.mean_map(tuple(z.shape[-2:]))

    score = torch.zeros(n, t_count, *z.shape[-2:], device=z.device, dtype=dtype)
    attention = torch.zeros_like(score)
    for timestep, noise in noise_draws(seed, settings.draws, (1, *z.shape[1:]), settings.timestep):
        z_t, t = _noised(backbone, z, timestep, noise, t_count + 1)
        eps, *recorded = run("zero-shot", denoise, (z_t, t, *contexts.tensors()), tuple(spans))
        if recorded:
            attention += recorded[0].view(n, t_count + 1, *z.shape[-2:])[:, :t_count]
        eps = eps.to(dtype).view(n, t_count + 1, *eps.shape[1:])
        change = eps[:, t_count:] - eps[:, :t_count]  # eps_u - eps_c, the direction of x0_c - x0_u
        score += (change * centred).sum(2) if settings.score == "agreement" else change.norm(dim=2)
    maps = normalize_maps(score)
    if settings.cross_attention > 0:
        w = settings.cross_attention
        maps = (1 - w) * maps + w * normalize_maps(attention)
    return maps
