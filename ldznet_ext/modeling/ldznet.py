"""LD-ZNet: ZNet whose blocks 6-10 also cross-attend to the SD UNet's own features.

In each of those blocks an attention pool turns the SD feature map (same channels and size as the
ZNet block) into hw+1 tokens, and an extra cross-attention ``attn3`` (after the text
cross-attention, with its own LayerNorm ``norm_sd``) lets ZNet's tokens read them.

The paper's ablation (Table 4, ``fusion="concat"``) instead concatenates the SD feature with the
ZNet feature right before the block's spatial transformer; a 1x1 conv ``sd_concat`` brings the
2C channels back to C (the transformer and the rest of the UNet keep their SD shapes and weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import LDZNET_BLOCKS
from ..sd.unet import BasicTransformerBlock, CrossAttention, SpatialTransformer, UNetConfig
from .znet import ZNet


class AttentionPool2d(nn.Module):
    """CLIP's attention pool, returning all tokens: [B, C, h, w] -> [B, C, hw + 1].

    A mean token is prepended; the learned positional embedding [C, s*s + 1] is resized
    bicubically when the feature is not s x s.
    """

    def __init__(self, size: int, channels: int, head_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, size * size + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, channels, 1)
        self.num_heads = channels // head_channels

    def resized_embedding(self, h: int, w: int) -> Tensor:
        """Positional embedding [C, hw + 1] for an h x w feature."""
        pe = self.positional_embedding
        c, n = pe.shape
        s = math.isqrt(n - 1)
        # Compare sides, not token counts: an s*s-token feature of another aspect (8 x 18 for s = 12)
        # needs resizing too (the official code compares counts and scrambles positions there).
        if h == w == s:
            return pe
        grid = F.interpolate(pe[None, :, 1:].reshape(1, c, s, s), (h, w), mode="bicubic", align_corners=False)
        return torch.cat([pe[:, :1], grid.reshape(c, h * w)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.resized_embedding(h, w)[None].to(x.dtype)
        q, k, v = self.qkv_proj(x).chunk(3, dim=1)
        heads = self.num_heads
        q, k, v = (t.reshape(b, heads, c // heads, -1).transpose(2, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, C/heads]
        return self.c_proj(out.transpose(2, 3).reshape(b, c, -1))


class SDAttentionTransformerBlock(BasicTransformerBlock):
    """Self-attention, text cross-attention, SD-feature cross-attention (``attn3``), feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__(dim, heads, dim_head, context_dim)
        self.attn3 = CrossAttention(dim, heads, dim_head, dim)
        self.norm_sd = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, sd_tokens: Tensor) -> Tensor:  # type: ignore[override]
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        x = self.attn3(self.norm_sd(x), sd_tokens) + x
        return self.ff(self.norm3(x)) + x


class SDAttentionSpatialTransformer(SpatialTransformer):
    """A spatial transformer that also attends to the pooled SD feature of the same block."""

    block_class = SDAttentionTransformerBlock

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int, block_number: int,
                 pool_size: int):
        super().__init__(channels, heads, dim_head, context_dim, depth, block_number)
        self.attentionpool2D = AttentionPool2d(pool_size, channels, dim_head)

    def forward(self, x: Tensor, context: Tensor, sd_feature: Tensor) -> Tensor:  # type: ignore[override]
        if sd_feature.shape[1:] != x.shape[1:]:
            raise ValueError(f"block {self.block_number}: SD feature {tuple(sd_feature.shape[1:])} does not match "
                             f"the LD-ZNet feature {tuple(x.shape[1:])}; the head and the SD model differ in size")
        sd_tokens = self.attentionpool2D(sd_feature.to(x.dtype)).transpose(1, 2)
        tokens = self.to_tokens(x)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, sd_tokens)
        return self.from_tokens(tokens, x)


class SDConcatSpatialTransformer(SpatialTransformer):
    """A spatial transformer whose input is ``sd_concat([x, SD feature])``: [B, 2C, h, w] -> [B, C, h, w].

    ``sd_concat`` starts as [identity | 0], so an untrained head is ZNet and the SD half is learned
    from there (a random 2C -> C mix would scramble the SD-initialised features it passes on).
    """

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int, block_number: int):
        super().__init__(channels, heads, dim_head, context_dim, depth, block_number)
        self.sd_concat = nn.Conv2d(2 * channels, channels, 1)
        with torch.no_grad():
            self.sd_concat.weight.zero_()
            self.sd_concat.weight[:, :channels, 0, 0] = torch.eye(channels)
            self.sd_concat.bias.zero_()

    def forward(self, x: Tensor, context: Tensor, sd_feature: Tensor) -> Tensor:  # type: ignore[override]
        if sd_feature.shape[1:] != x.shape[1:]:
            raise ValueError(f"block {self.block_number}: SD feature {tuple(sd_feature.shape[1:])} does not match "
                             f"the LD-ZNet feature {tuple(x.shape[1:])}; the head and the SD model differ in size")
        return super().forward(self.sd_concat(torch.cat([x, sd_feature.to(x.dtype)], dim=1)), context)


FUSIONS = ("attention", "concat")
"""How LD-ZNet takes in the SD features: cross-attention through attention pools (the paper's
model) or concatenation (its Table 4 ablation)."""


class LDZNet(ZNet):
    """``forward(z, context, sd_features={6: f6, ..., 10: f10}) -> logits [B, 1, 8h, 8w]``
    (``with_presence``: as ZNet's).

    ``latent_size`` is the z side the positional embeddings are made for (48 = 384 px); ``fusion``
    is one of ``FUSIONS``.
    """

    def __init__(self, config: UNetConfig, sd_blocks: tuple[int, ...] = LDZNET_BLOCKS, latent_size: int = 48,
                 fusion: str = "attention"):
        if fusion not in FUSIONS:
            raise ValueError(f"unknown SD feature fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        self.sd_blocks = tuple(sd_blocks)
        self.latent_size = latent_size
        self.fusion = fusion
        super().__init__(config)

    def make_spatial_transformer(self, channels: int, heads: int, dim_head: int, block_number: int,
                                 level: int) -> SpatialTransformer:
        if block_number not in self.sd_blocks:
            return super().make_spatial_transformer(channels, heads, dim_head, block_number, level)
        c = self.config
        if self.fusion == "concat":
            return SDConcatSpatialTransformer(channels, heads, dim_head, c.context_dim, c.transformer_depth,
                                              block_number)
        return SDAttentionSpatialTransformer(channels, heads, dim_head, c.context_dim, c.transformer_depth,
                                             block_number, pool_size=self.latent_size >> level)

    def forward(self, z: Tensor, context: Tensor, sd_features: Mapping[int, Tensor],  # type: ignore[override]
                with_presence: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        missing = [b for b in self.sd_blocks if b not in sd_features]
        if missing:
            raise ValueError(f"LD-ZNet needs SD features of blocks {list(self.sd_blocks)}; missing {missing}")
        return self.segment(z, context, sd_features, with_presence)
