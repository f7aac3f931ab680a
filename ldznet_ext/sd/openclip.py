"""open_clip's text tower with its key names: SDXL's second text encoder (bigG) and SD 2.x's (ViT-H).

Module names follow the single file's ``conditioner.embedders.1.model.*`` (SDXL) and
``cond_stage_model.model.*`` (SD 2.x) with the prefix removed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import LdznetError
from .tokenizer import EOS_ID

# open_clip keys that are no part of the text tower's forward pass (CLIP's contrastive temperature).
_UNUSED_OPENCLIP_KEYS = ("logit_scale",)
# open_clip's registered text towers (its model_configs/*.json), which ldm and sgm configs build by name:
# (width, layers, MLP width, embedding width). SDXL's is ViT-bigG-14, SD 2.x's ViT-H-14; the small ones
# serve tests on the real WebUIs.
OPENCLIP_TEXT_TOWERS = {"ViT-bigG-14": (1280, 32, 5120, 1280), "ViT-H-14": (1024, 24, 4096, 1024),
                        "ViT-L-14": (768, 12, 3072, 768), "ViT-B-32": (512, 12, 2048, 512),
                        "ViT-S-32-alt": (256, 10, 1024, 256)}


class ResidualAttentionBlock(nn.Module):
    """open_clip's text-transformer layer: pre-norm causal self-attention and a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x: Tensor, causal_mask: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=causal_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextEncoder(nn.Module):
    """open_clip's text tower (SDXL's bigG, SD 2.x's ViT-H) with its key names; returns the
    penultimate layer's tokens and the pooled, projected EOS token."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, embed_dim: int | None,
                 vocab_size: int = 49408, context_length: int = 77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_width)
                                                   for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        # None: a tower without its projection (SD 2.x's, as diffusers' conversion writes it), which only the
        # pooled output reads
        self.text_projection = None if embed_dim is None else nn.Parameter(torch.zeros(width, embed_dim))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> OpenCLIPTextEncoder:
        """An encoder shaped as the weights ``state`` (prefix removed) say (build it on the meta device
        and fill it with :meth:`load_text_state_dict`); its heads as :func:`tower_heads` says."""
        width = state["token_embedding.weight"].shape[1]
        projection = state.get("text_projection")
        return cls(width, tower_layers(state), tower_heads(width),
                   state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                   None if projection is None else projection.shape[1], state["token_embedding.weight"].shape[0],
                   state["positional_embedding"].shape[0])

    def load_text_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Strictly load open_clip text weights (the single file's prefix removed)."""
        self.load_state_dict({k: v for k, v in state.items() if k not in _UNUSED_OPENCLIP_KEYS},
                             strict=True, assign=True)

    def hidden_state(self, input_ids: Tensor, blocks: int) -> Tensor:
        """Token ids [B, T] -> the tokens after the first ``blocks`` layers [B, T, width]."""
        x = self.token_embedding(input_ids) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        for block in self.transformer.resblocks[:blocks]:
            x = block(x, _causal_mask(x))
        return x

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids [B, T] (EOS, the largest id, ends each prompt) -> (penultimate hidden state
        [B, T, width], pooled [B, embed_dim])."""
        if self.text_projection is None:
            raise LdznetError("this OpenCLIP text tower has no text_projection, which its pooled output needs")
        penultimate = self.hidden_state(input_ids, len(self.transformer.resblocks) - 1)
        x = self.transformer.resblocks[-1](penultimate, _causal_mask(penultimate))
        eos = input_ids.argmax(dim=-1)
        pooled = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), eos] @ self.text_projection
        return penultimate, pooled


def _causal_mask(x: Tensor) -> Tensor:
    """The attention mask [T, T] of tokens ``x`` [B, T, width]: True where a token may not look (later ones)."""
    length = x.shape[1]
    return torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)


def registered_layers(width: int, mlp_width: int) -> int | None:
    """The layers of the registered open_clip text tower of this width and MLP width (None: none is)."""
    return next((layers for tower_width, layers, tower_mlp, _ in OPENCLIP_TEXT_TOWERS.values()
                 if (tower_width, tower_mlp) == (width, mlp_width)), None)


def tower_heads(width: int) -> int:
    """The attention heads of an open_clip text tower ``width`` wide: heads of 64 channels, as in every
    tower SD uses."""
    return max(1, width // 64)


def tower_fields(state: Mapping[str, Tensor]) -> dict[str, int]:
    """The ``CLIPTextConfig`` fields the weights of an open_clip text tower (prefix removed) show, but its
    depth (``tower_layers``: a file may hold the tower without its last layer); KeyError / ValueError for
    weights of another layout."""
    vocab, width = state["token_embedding.weight"].shape
    return {"hidden_size": width, "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_attention_heads": tower_heads(width), "vocab_size": vocab,
            "max_position_embeddings": state["positional_embedding"].shape[0]}


def tower_layers(state: Mapping[str, Tensor]) -> int:
    """How many layers (``transformer.resblocks.N``) an open_clip text tower's weights hold."""
    return len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})


def openclip_ids(ids: Tensor) -> Tensor:
    """CLIP token ids padded as open_clip pads them: zeros after the first EOS (ViT-L pads with EOS)."""
    after_end = (ids == EOS_ID).int().cumsum(dim=1) - (ids == EOS_ID).int() > 0
    return ids.masked_fill(after_end, 0)
