"""What the segmenter runs on: the Backbone protocol, the text conditioning it passes around and the
layout of its denoiser's spatial transformers.

The segmenter, the zero-shot probe and the feature tap know a backbone only through these three.
A new model family (an SDXL-family UNet with two text encoders, a pooled vector and size
conditioning, or another layout) plugs in as an adapter: its ``encode_text`` puts whatever its
denoiser needs into a :class:`Conditioning`, its ``predict_noise`` unpacks it, and its ``layout``
says which modules are the spatial transformers and which of them a head taps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ..errors import LdznetError
from ..sd.schedule import NoiseSchedule
from ..sd.tokenizer import CHUNK_TOKENS, term_token_spans

LDZNET_BLOCKS: tuple[int, ...] = (6, 7, 8, 9, 10)
"""The blocks LD-ZNet taps in an SD v1 UNet: input_blocks[8][1], middle_block[1], output_blocks[3..5][1]."""


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning of a batch: ``context`` [B, T, D] (what cross-attention and the heads
    read), an optional ``pooled`` vector [B, P] and ``extra`` UNet inputs [B, ...] by name (size
    conditioning, ...) for families that need them. Every tensor's first axis is the batch."""

    context: Tensor
    pooled: Tensor | None = None
    extra: Mapping[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.context.shape[0]

    def _map(self, change) -> Conditioning:
        return Conditioning(change(self.context), None if self.pooled is None else change(self.pooled),
                            {name: change(value) for name, value in self.extra.items()})

    def repeat(self, n: int) -> Conditioning:
        """The whole batch ``n`` times over ([c0, c1, c0, c1, ...] for n = 2), like ``Tensor.repeat``."""
        return self._map(lambda x: x.repeat(n, *([1] * (x.ndim - 1))))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Every tensor on ``device`` and, if floating point, in ``dtype``."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor: context, pooled (if any), then the extras in order (``with_tensors`` inverts it)."""
        return (self.context, *(() if self.pooled is None else (self.pooled,)), *self.extra.values())

    def with_tensors(self, tensors: Sequence[Tensor]) -> Conditioning:
        """A conditioning shaped like this one holding ``tensors``, in the order ``tensors()`` gives."""
        context, *rest = tensors
        pooled = None if self.pooled is None else rest.pop(0)
        return Conditioning(context, pooled, dict(zip(self.extra, rest)))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The batches of ``parts`` one after the other (they carry the same kinds of tensor)."""
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        extra = {name: torch.cat([p.extra[name] for p in parts]) for name in parts[0].extra}
        return Conditioning(torch.cat([p.context for p in parts]), pooled, extra)


class CaptureModules(NamedTuple):
    """The modules a backbone's calls run, for captured CUDA graphs (``graphs.py``), which are keyed
    by where their weights live: ``image_encoder`` runs in ``encode_image``, ``denoiser`` in
    ``predict_noise``."""

    image_encoder: nn.Module
    denoiser: nn.Module


@dataclass(frozen=True)
class TransformerSite:
    """One spatial transformer of a denoiser: ``module``'s output [B, C, h, w] (or a tuple or diffusers
    output object holding it first) is the feature, ``cross_attention`` is its text attention (``to_q``,
    ``to_k``, ``heads``; called with the context as second argument, ``context=`` or diffusers'
    ``encoder_hidden_states=``), ``self_attention`` that of its first block over its
    own pixels (same attributes; None where a layout does not expose it), and it runs at
    1 / ``downscale`` of the latent's side."""

    name: str
    module: nn.Module
    cross_attention: nn.Module
    downscale: int
    self_attention: nn.Module | None = None


@dataclass(frozen=True)
class UNetLayout:
    """A denoiser's spatial transformers in execution order (block numbers count from 1) and the
    blocks a head taps by default. ``unet`` is the module whose hooked calls are serialised."""

    unet: nn.Module
    sites: tuple[TransformerSite, ...]
    tapped: tuple[int, ...]

    def pick(self, blocks: Iterable[int] | None, what: str = "blocks") -> tuple[int, ...]:
        """``blocks`` sorted without repeats (None: all); LdznetError naming ``what`` for a number
        this layout lacks."""
        numbers = tuple(range(1, len(self.sites) + 1)) if blocks is None else tuple(sorted(set(blocks)))
        bad = [b for b in numbers if not 1 <= b <= len(self.sites)]
        if bad:
            raise LdznetError(f"{what} {bad} do not exist: this UNet has spatial-transformer blocks "
                              f"1-{len(self.sites)}")
        return numbers

# How an ldm UNet's resampling layers change the level (the latent's side is halved per level).
_LEVEL_STEP = {"Downsample": 1, "Upsample": -1}


def spatial_transformers(unet: nn.Module) -> list[nn.Module]:
    """The spatial-transformer modules of an ldm-layout UNet in execution order (16 for SD v1)."""
    return [site.module for site in ldm_layout(unet).sites]


def ldm_layout(unet: nn.Module, tapped: tuple[int, ...] = LDZNET_BLOCKS) -> UNetLayout:
    """The layout of an ldm-layout UNet (ours, ldm's inside A1111, Forge's): its spatial transformers
    found by structure in execution order; TypeError for a module of another layout."""
    try:
        parts = [("input_blocks", unet.input_blocks), ("middle_block", [unet.middle_block]),
                 ("output_blocks", unet.output_blocks)]
    except AttributeError as error:
        raise TypeError(f"{type(unet).__name__} is not an ldm-layout UNet (no input/middle/output blocks)") from error
    sites, level = [], 0
    for part, blocks in parts:
        for index, block in enumerate(blocks):
            name = part if part == "middle_block" else f"{part}.{index}"
            for position, layer in enumerate(block):
                if hasattr(layer, "transformer_blocks"):
                    first = layer.transformer_blocks[0]
                    sites.append(TransformerSite(f"{name}.{position}", layer, first.attn2, 2 ** level, first.attn1))
                # A level change takes effect for the layers after it.
                level += _LEVEL_STEP.get(type(layer).__name__, 0)
    return UNetLayout(unet, tuple(sites), tapped)


def wrapper_token_spans(wrapper: object, prompts: Sequence[str]) -> list[tuple[int, int]]:
    """Each prompt's content-token span in the context of a WebUI host's CLIP wrapper (A1111's, Forge's text
    engine): positions 1 to 1 + the count its ``tokenize_line`` gives (a textual-inversion embedding takes as
    many positions as it has vectors, emphasis brackets none), within the first chunk of 75; SD's CLIP
    tokenizer's spans for a wrapper without ``tokenize_line``."""
    tokenize_line = getattr(wrapper, "tokenize_line", None)
    if tokenize_line is None:
        return term_token_spans(prompts)
    return [(1, 1 + min(int(tokenize_line(prompt)[1]), CHUNK_TOKENS)) for prompt in prompts]


class Backbone(Protocol):
    """What the segmenter needs from a diffusion model (ours or a host's); :func:`is_backbone` tells
    whether an object has it all.

    Optional: ``capture_modules`` (:class:`CaptureModules`), for a backbone whose calls a CUDA graph
    may capture (``graphs.py``): pure torch, nothing host-side that must run on every call. A
    backbone without it always runs eagerly. ``unet_config`` (a ``sd.unet.UNetConfig``), for a
    denoiser that is neither ours nor of ldm's layout (the head-fits-model check reads it).
    ``token_spans(prompts)``, for a backbone whose tokenizer may differ from SD's CLIP tokenizer
    (``zeroshot.token_spans``).
    """

    schedule: NoiseSchedule

    @property
    def unet(self) -> nn.Module:
        """The denoiser (for the head-fits-model check)."""

    @property
    def layout(self) -> UNetLayout:
        """The denoiser's spatial transformers: what the feature tap and the zero-shot probe hook."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def downsample_factor(self) -> int: ...

    def encode_image(self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """image [B, 3, H, W] in [-1, 1] -> z [B, C, H/f, W/f], scaled by the model's scale factor."""

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """prompts -> their conditioning (context [B, T, D] and what else the denoiser needs)."""

    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """One denoiser call: eps [B, C, h, w] for z_t [B, C, h, w] at integer timesteps t [B]."""


_BACKBONE_MEMBERS = tuple(sorted({*Backbone.__annotations__,
                                   *(name for name in vars(Backbone) if not name.startswith("_"))}))


def is_backbone(candidate: object) -> bool:
    """Whether ``candidate`` has every member of :class:`Backbone`. Not a runtime-checkable protocol's
    isinstance: from Python 3.12 on, that looks members up statically, and so misses every torch
    module's submodules (``unet``), refusing each model."""
    return all(hasattr(candidate, name) for name in _BACKBONE_MEMBERS)
