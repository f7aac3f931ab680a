"""CLIP text encoder of SD v1 (ViT-L/14 text tower) through transformers' ``CLIPTextModel``.

The wrapper's attribute is named ``transformer``, as in SD's ``cond_stage_model.transformer``. Below
that, ``CLIPTextModel``'s own keys depend on the installed transformers (``text_model.*`` on 4.x as
in SD files, no ``text_model.`` level on 5.x), so SD weights go in through
:meth:`TextEncoder.load_text_state_dict` and out through :meth:`TextEncoder.text_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import transformers
from torch import nn

from ..errors import CheckpointError, LdznetError
from .tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, tokenize

_SIZES: dict[str, dict[str, int]] = {
    "sd-v1": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
}
_MODERN_PREFIX = "text_model."
# The text tower's top-level modules; some SD v1 files store them without the "text_model." level.
_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_POSITION_IDS = "embeddings.position_ids"


def text_config(size: str) -> transformers.CLIPTextConfig:
    """Config of a CLIP text tower: ``"sd-v1"`` (ViT-L/14, 123M parameters) or ``"tiny"`` (tests).

    Both share CLIP's vocabulary (49,408), 77 positions, quick_gelu and layer_norm_eps 1e-5.
    """
    if size not in _SIZES:
        raise ValueError(f"unknown text encoder size {size!r}; expected one of {sorted(_SIZES)}")
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=1,
        **_SIZES[size],
    )


def check_transformers_torch() -> None:
    """LdznetError when the installed transformers will not run on the installed torch: transformers 5
    needs torch 2.6 and hides its torch models from an older one (a fresh ``pip install`` beside torch
    2.1-2.5, A1111's torch, picks it)."""
    if not transformers.utils.is_torch_available():
        raise LdznetError(f"transformers {transformers.__version__} does not run on torch {torch.__version__} (it "
                          "turns its torch models off; transformers 5 needs torch >= 2.6): install "
                          "'transformers>=4.30,<5' or a newer torch")


class TextEncoder(nn.Module):
    """SD v1's conditioning: prompts -> CLIP ``last_hidden_state`` (after the final layer norm)."""

    def __init__(self, transformer: transformers.CLIPTextModel):
        super().__init__()
        self.transformer = transformer

    @classmethod
    def from_config(cls, config: transformers.CLIPTextConfig) -> TextEncoder:
        """A randomly initialised encoder; load SD weights with :meth:`load_text_state_dict`."""
        check_transformers_torch()
        return cls(transformers.CLIPTextModel(config))

    def load_text_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strictly load an SD checkpoint's text-encoder weights (``cond_stage_model.transformer.``
        removed, either key layout) into the installed transformers' ``CLIPTextModel``."""
        expected = self.transformer.state_dict().keys()
        # transformers 5 dropped CLIPTextModel's "text_model." level; 4.30 still saves position_ids.
        prefix = _MODERN_PREFIX if any(key.startswith(_MODERN_PREFIX) for key in expected) else ""
        installed = {prefix + key[len(_MODERN_PREFIX) :]: v for key, v in normalize_text_state_dict(state).items()}
        if prefix + _POSITION_IDS in expected:
            positions = self.transformer.config.max_position_embeddings
            installed[prefix + _POSITION_IDS] = torch.arange(positions).unsqueeze(0)
        self.transformer.load_state_dict(installed, strict=True)

    def text_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in SD's layout (``text_model.*``, no ``position_ids``) on any transformers version;
        an SD file stores them under ``cond_stage_model.transformer.``."""
        return normalize_text_state_dict(self.transformer.state_dict())

    @property
    def context_dim(self) -> int:
        """Width of each context token (768 for SD v1), the UNet cross-attention's context dim."""
        return int(self.transformer.config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, 77]`` -> context ``[B, 77, context_dim]`` in the module's dtype.

        No attention mask, as SD v1 runs it: the causal mask already keeps content tokens from
        seeing the EOS padding.
        """
        return self.transformer(input_ids=input_ids).last_hidden_state

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> context ``[B, 77, context_dim]`` on the module's device and dtype.

        Gradients follow the caller's mode; wrap in ``torch.no_grad()`` for a frozen encoder.
        """
        device = self.transformer.get_input_embeddings().weight.device
        return self(tokenize(prompts).to(device))


def normalize_text_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD checkpoint's text-encoder weights (``cond_stage_model.transformer.`` removed) in one layout:
    ``text_model.*`` keys, as SD files and transformers 4.x's ``CLIPTextModel`` name them.

    Accepts that layout and the old one without ``text_model.``. Drops ``position_ids``: old
    transformers saved it, new ones do not, some merged SD files carry damaged copies, and it is
    never a learned weight. Use :meth:`TextEncoder.load_text_state_dict` to load the result.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        root = key[len(_MODERN_PREFIX) :] if key.startswith(_MODERN_PREFIX) else key
        if not root.startswith(_ROOTS):
            raise CheckpointError(
                f"unexpected text-encoder key {key!r}; expected keys under "
                f"{', '.join(repr(r) for r in _ROOTS)}, optionally prefixed with {_MODERN_PREFIX!r}"
            )
        if root == _POSITION_IDS:
            continue
        if _MODERN_PREFIX + root in out:
            raise CheckpointError(f"text-encoder weight {root!r} appears both with and without {_MODERN_PREFIX!r}")
        out[_MODERN_PREFIX + root] = value
    return out
