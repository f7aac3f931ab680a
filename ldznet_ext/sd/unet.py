"""The SD UNet in the ldm layout (`openaimodel.UNetModel`; sgm's for SD 2.x and SDXL), state-dict
compatible with it.

Module names equal ldm's so that the ``model.diffusion_model.*`` part of an SD checkpoint loads
strictly, and so that code written against ldm's module tree (the feature tap, the WebUI's hooks)
sees the same structure: ``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``,
``out``; spatial transformers sit at index [1] of their block.

The 16 spatial-transformer blocks carry a 1-based ``block_number`` in execution order (the paper's
numbering). SD 2.x and SDXL differ only in options of :class:`UNetConfig` (heads of a fixed width,
linear projections in the transformers, a transformer depth per level, SDXL's ``label_emb`` for the
pooled-text and size vector ``y``). Segmentation networks built on this class pass extra per-block
inputs (``sd_features``) to the blocks that take them; the plain SD UNet takes none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# Bounds on the UNet's module tree (SDXL: 3 levels, 2 res blocks, 70 transformer blocks).
MAX_LEVELS = 8
MAX_RES_BLOCKS = 8
MAX_TRANSFORMER_BLOCKS = 256


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of an ldm-layout UNet (defaults: SD v1.x).

    The last four fields are SD 2.x / SDXL options (sgm's names in brackets): ``level_depths``
    [transformer_depth as a list], the transformer depth at each level, the middle block taking the
    last (empty: ``transformer_depth`` everywhere); ``num_head_channels`` > 0, heads of that width
    instead of ``num_heads`` heads; ``linear_projection`` [use_linear_in_transformer], linear
    proj_in/proj_out; ``adm_in_channels`` > 0, the width of the vector ``y`` that ``label_emb`` adds
    to the timestep embedding.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int = 8
    context_dim: int = 768
    transformer_depth: int = 1
    level_depths: tuple[int, ...] = ()
    num_head_channels: int = 0
    linear_projection: bool = False
    adm_in_channels: int = 0

    def __post_init__(self):
        if self.level_depths and len(self.level_depths) != len(self.channel_mult):
            raise ValueError(f"level_depths {list(self.level_depths)} needs one depth per level "
                             f"({len(self.channel_mult)} levels in channel_mult)")
        # Configurations come from files too: one crafted count would build millions of modules, which
        # takes minutes and gigabytes even on the meta device. SD v1, SD 2.x and SDXL stay far below.
        if len(self.channel_mult) > MAX_LEVELS:
            raise ValueError(f"channel_mult has {len(self.channel_mult)} levels; expected at most {MAX_LEVELS}")
        if self.num_res_blocks > MAX_RES_BLOCKS:
            raise ValueError(f"num_res_blocks is {self.num_res_blocks}; expected at most {MAX_RES_BLOCKS}")
        blocks = self.transformer_blocks()
        if blocks > MAX_TRANSFORMER_BLOCKS:
            raise ValueError(f"the UNet would hold {blocks} transformer blocks; expected at most "
                             f"{MAX_TRANSFORMER_BLOCKS}")

    def transformer_blocks(self) -> int:
        """Transformer blocks in all spatial transformers: per attention level, one per res block on the
        way down and one more on the way up, plus the middle block's."""
        levels = len(self.channel_mult)
        per_level = sum(self.depth_at(level) for level in set(self.attention_levels) if 0 <= level < levels)
        return per_level * (2 * self.num_res_blocks + 1) + (self.depth_at(levels - 1) if levels else 0)

    def to_dict(self) -> dict:
        """The fields as JSON-ready values; the SD 2.x / SDXL options only where they are set, so that
        an SD v1 configuration reads as it always did (and older readers accept it)."""
        data = asdict(self)
        return {k: v for k, v in data.items() if k not in _SGM_DEFAULTS or v != _SGM_DEFAULTS[k]}

    def depth_at(self, level: int) -> int:
        """Transformer blocks per spatial transformer at ``level`` (the middle block: the last level)."""
        return self.level_depths[level] if self.level_depths else self.transformer_depth

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head width) of the attention layers of a transformer over ``channels``."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    @classmethod
    def from_dict(cls, data: Mapping) -> UNetConfig:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


_SGM_DEFAULTS = {"level_depths": (), "num_head_channels": 0, "linear_projection": False, "adm_in_channels": 0}

UNET_CONFIGS: dict[str, UNetConfig] = {
    "sd-v1": UNetConfig(),
    # Smallest shape with the full SD v1 topology (4 levels, 16 transformer blocks); GroupNorm(32)
    # needs channel counts that are multiples of 32.
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_heads=2, context_dim=64),
    # sgm's configs/inference/sd_xl_base.yaml (SDXL base 1.0 and its fine-tunes: Pony, Illustrious, ...).
    "sdxl": UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), context_dim=2048, level_depths=(0, 2, 10),
                       num_head_channels=64, linear_projection=True, adm_in_channels=2816),
    # sgm's configs/inference/v2-inference.yaml (SD 2.0 / 2.1, 512-base and 768-v): no attention at the
    # last level, whose depth is the middle block's.
    "sd2": UNetConfig(context_dim=1024, level_depths=(1, 1, 1, 1), num_head_channels=64, linear_projection=True),
    # SDXL's topology at test widths: no transformer at level 0, depths 1 / 2, heads of 16 channels.
    "tiny-sdxl": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(1, 2), context_dim=96,
                            level_depths=(0, 1, 2), num_head_channels=16, linear_projection=True,
                            adm_in_channels=80),
}


def unet_config(size: str, **overrides) -> UNetConfig:
    """The named configuration (one of :data:`UNET_CONFIGS`), with fields optionally overridden."""
    if size not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet size {size!r}; known sizes: {', '.join(UNET_CONFIGS)}")
    return UNetConfig(**{**UNET_CONFIGS[size].to_dict(), **overrides})


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B], cosines first as ldm."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype, as ldm does for fp16 stability.

    The affine parameters are upcast too: a half/bfloat16 model run without autocast would
    otherwise hand group_norm an fp32 input with low-precision weights, which it rejects.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (ldm ``ResBlock``, no scale-shift)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself when None); ldm's key names."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, text cross-attention, feed-forward; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on text (1x1 conv projections as SD v1,
    or ``linear`` ones as SD 2.x and SDXL)."""

    block_class: type[BasicTransformerBlock] = BasicTransformerBlock

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int, block_number: int,
                 linear: bool = False):
        super().__init__()
        self.block_number = block_number
        self.linear = linear
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            self.block_class(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1))

    def to_tokens(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, HW, inner]: normalised, projected tokens."""
        if self.linear:
            return self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        return self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)

    def from_tokens(self, tokens: Tensor, x: Tensor) -> Tensor:
        """Project tokens back to a residual on ``x``."""
        b, c, h, w = x.shape
        if self.linear:
            return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)
        # x first: the sum takes its (contiguous) layout. The projected tokens are a channels-last
        # view, and with B > 1 a sum led by them would stay channels-last through the rest of the
        # UNet, where every 3x3 conv would then copy its weights to that layout on each call.
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        tokens = self.to_tokens(x)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.from_tokens(tokens, x)


class TimestepEmbedSequential(nn.Sequential):
    """A block: each layer gets what it needs (timestep embedding, text context, SD feature)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor,
                sd_features: Mapping[int, Tensor] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                feature = sd_features.get(layer.block_number) if sd_features else None
                x = layer(x, context) if feature is None else layer(x, context, feature)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ldm-layout UNet: ``forward(x, timesteps, context[, y]) -> eps`` ([B, out_channels, h, w])."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        emb_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.adm_in_channels:
            # Nested as sgm's (num_classes="sequential") so that its keys read label_emb.0.0 / label_emb.0.2.
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
        self._block_count = 0

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))])
        skip_channels = [c.model_channels]
        ch = c.model_channels
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * c.model_channels)]
                ch = mult * c.model_channels
                if level in c.attention_levels:
                    layers.append(self._new_transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim), self._new_transformer(ch, len(c.channel_mult) - 1), ResBlock(ch, emb_dim))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * c.model_channels)]
                ch = mult * c.model_channels
                if level in c.attention_levels:
                    layers.append(self._new_transformer(ch, level))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, c.out_channels, 3, padding=1)))

    def _new_transformer(self, channels: int, level: int) -> SpatialTransformer:
        self._block_count += 1
        heads, dim_head = self.config.heads_at(channels)
        return self.make_spatial_transformer(channels, heads, dim_head, self._block_count, level)

    def make_spatial_transformer(self, channels: int, heads: int, dim_head: int, block_number: int,
                                 level: int) -> SpatialTransformer:
        """Build spatial-transformer block ``block_number`` (1-based) working at resolution level
        ``level`` (feature side = z side / 2**level); subclasses swap in variants."""
        c = self.config
        return SpatialTransformer(channels, heads, dim_head, c.context_dim, c.depth_at(level), block_number,
                                  c.linear_projection)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward_features(self, x: Tensor, timesteps: Tensor, context: Tensor,
                         sd_features: Mapping[int, Tensor] | None = None, y: Tensor | None = None) -> Tensor:
        """Everything but ``out``: the last decoder feature map [B, model_channels, h, w]. ``y``
        [B, adm_in_channels] is required exactly when the configuration has ``adm_in_channels``."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(self.dtype))
        width = self.config.adm_in_channels
        if (y is None) != (width == 0):
            raise ValueError(f"this UNet takes {f'a vector y [B, {width}]' if width else 'no vector y'}, "
                             f"got {'none' if y is None else tuple(y.shape)}")
        if y is not None:
            emb = emb + self.label_emb(y.type(self.dtype))
        h = x.type(self.dtype)
        context = context.type(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, sd_features)
            skips.append(h)
        h = self.middle_block(h, emb, context, sd_features)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, sd_features)
        return h

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """Noise prediction [B, out_channels, h, w] for latents ``x`` [B, in_channels, h, w] at ``timesteps`` [B]
        (and SDXL's vector ``y`` [B, adm_in_channels])."""
        return self.out(self.forward_features(x, timesteps, context, y=y)).type(x.dtype)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
