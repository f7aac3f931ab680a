"""Segmentation-head checkpoints: our .safetensors files and the official LD-ZNet release.

Our heads are ``.safetensors`` holding the head's state dict (official key names) and metadata
``ldznet.head`` (a HeadConfig: architecture, UNet configuration, tapped blocks, z size of the
positional embeddings, SD timestep) plus free-form ``ldznet.training`` details.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .backbones.base import spatial_transformers
from .backbones.family import LABELS, checkpoint_part
from .checkpoint_io import path_argument, read_metadata, read_state_dict, read_tensor_shapes, write_safetensors
from .devices import resolve_device
from .errors import CheckpointError, LdznetError
from .modeling.build import HeadConfig, build_head, head_config
from .outputs import same_file, writable_path
from .precision import as_dtype
from .sd.checkpoint import classify

OFFICIAL_EMA_PREFIX = "model_ema."
OFFICIAL_MODEL_PREFIX = "model.diffusion_model."
OFFICIAL_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
OFFICIAL_RELEASE = "the official LD-ZNet release (LDZNet_txt2mask.ckpt)"
OFFICIAL_TRAINING = {"source": "official LD-ZNet release (PhraseCut)", "resolution": 384,
                     "timesteps": [300, 499]}


def _check_keys(found: Mapping[str, Tensor], expected: Mapping[str, Tensor], name: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if found[k].shape != expected[k].shape)
    # integer ("quantized") tensors would fail inside torch's load_state_dict with a traceback
    integer = sorted(k for k in set(found) & set(expected)
                     if expected[k].is_floating_point() and not found[k].is_floating_point())
    if missing or unexpected or wrong or integer:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
        parts = [f"missing {len(missing)}: {show(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {show(unexpected)}" if unexpected else "",
                 "wrong shape: " + show([f"{k} {tuple(found[k].shape)} != {tuple(expected[k].shape)}" for k in wrong])
                 if wrong else "",
                 "not floating point: " + show([f"{k} ({str(found[k].dtype).removeprefix('torch.')})" for k in integer])
                 if integer else ""]
        raise CheckpointError(f"{name}: the weights do not match the head architecture; "
                              + "; ".join(p for p in parts if p))


def save_head(head: nn.Module, config: HeadConfig, path: str | os.PathLike, training: Mapping[str, Any] | None = None,
              dtype: torch.dtype | None = None) -> None:
    """Write a head as .safetensors with its configuration (and optional training details) as metadata."""
    state = head.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    write_safetensors(path, state, {"head": config.to_dict(), "training": dict(training or {})})


def read_head_config(path: str | os.PathLike) -> HeadConfig:
    """The HeadConfig stored in a head file; CheckpointError when the file is not one of our heads."""
    metadata = read_metadata(path)
    if "head" not in metadata:
        shapes = read_tensor_shapes(path)
        family = classify(shapes, metadata).family if shapes else "unknown"
        if family not in ("unknown", "ldznet-official"):  # an SD model or a VAE given in the head's place
            role = "VAE" if family == "vae" else "model"
            raise CheckpointError(f"{Path(path).name}: {LABELS.get(family, family)}, not an ldznet head (no "
                                  f"'ldznet.head' metadata); use it as the {role}")
        raise CheckpointError(f"{Path(path).name}: not an ldznet head (no 'ldznet.head' metadata); "
                              "an official LD-ZNet .ckpt must first be imported with `ldznet convert`")
    return HeadConfig.from_dict(metadata["head"], f"{Path(path).name}: field 'ldznet.head'")


def _build_described_head(config: HeadConfig, name: str) -> nn.Module:
    """The head ``config`` describes, on the meta device; CheckpointError for a crafted config that
    names no buildable head or taps SD blocks the UNet lacks."""
    try:
        with torch.device("meta"):
            head = build_head(config)
    except (ValueError, ZeroDivisionError, TypeError, RuntimeError, OverflowError) as error:
        # a crafted size (latent_size 10**12) reaches torch as a shape it cannot make, even on meta
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{name}: field 'ldznet.head' describes no head that can be built ({reason})") from error
    count = len(spatial_transformers(head))
    if config.uses_sd_features and (not config.sd_blocks or not all(1 <= b <= count for b in config.sd_blocks)):
        raise CheckpointError(f"{name}: field 'ldznet.head', key 'sd_blocks' is {list(config.sd_blocks)}; "
                              f"expected block numbers from 1 to {count}")
    return head


def load_head(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype | str = torch.float32) -> tuple[nn.Module, HeadConfig]:
    """Load a head file; its tensors must match the architecture its metadata describes exactly.
    ``dtype``: a torch dtype or its name ("fp16"); ``device`` as :func:`devices.resolve_device` takes it."""
    path, device, dtype = path_argument(path, "head file"), resolve_device(device), as_dtype(dtype)
    config = read_head_config(path)
    state = read_state_dict(path)
    head = _build_described_head(config, Path(path).name)
    _check_keys(state, head.state_dict(), Path(path).name)
    head.load_state_dict(state, strict=True, assign=True)
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False), config


def official_ema_name(key: str) -> str:
    """The name the official checkpoint gives the EMA copy of head tensor ``key``."""
    return OFFICIAL_EMA_PREFIX + ("diffusion_model." + key).replace(".", "")


def official_head_state(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], use_ema: bool = True,
                        name: str = "checkpoint") -> dict[str, Tensor]:
    """Pick the head's tensors out of the official Lightning state dict, under our (official) names.

    The EMA weights (used by the official inference) have every '.' removed from their names; they
    are mapped back through the known layout, which is checked to be unambiguous. Everything else
    (VAE, CLIP, the frozen SD copy, schedule buffers) is dropped.
    """
    if use_ema:
        by_ema_name: dict[str, str] = {}
        for key in expected:
            other = by_ema_name.setdefault(official_ema_name(key), key)
            if other != key:
                raise CheckpointError(f"ambiguous EMA names: {key!r} and {other!r} both become "
                                      f"{official_ema_name(key)!r}")
        found = {k: v for k, v in state.items()
                 if k.startswith(OFFICIAL_EMA_PREFIX) and k not in OFFICIAL_EMA_BOOKKEEPING}
        if not found:
            raise CheckpointError(f"{name}: no EMA weights ('{OFFICIAL_EMA_PREFIX}*'); "
                                  "convert the training weights instead (--no-ema)")
        head_state = {by_ema_name.get(k, k): v for k, v in found.items()}
    else:
        head_state = checkpoint_part(state, OFFICIAL_MODEL_PREFIX)
        if not head_state:
            raise CheckpointError(f"{name}: no '{OFFICIAL_MODEL_PREFIX}*' weights found")
    _check_keys(head_state, expected, name)
    return head_state


def _check_head_output(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """LdznetError unless ``target`` is a new, writable .safetensors name (so neither ``source`` nor a user's
    model)."""
    if Path(target).suffix.lower() != ".safetensors":
        raise LdznetError(f"{target}: a head is written as .safetensors; give a name ending in .safetensors")
    if same_file(source, target):
        raise LdznetError(f"{target}: the same file as the checkpoint {source}; give the head another name")
    if os.path.lexists(target):
        raise LdznetError(f"{target}: the file exists; convert writes a new head file, so give a new name "
                          "(or remove the old file first)")
    writable_path(target)


def _read_official(source: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of the official release; CheckpointError saying what ``source`` is otherwise."""
    metadata, state = read_metadata(source), read_state_dict(source)
    official = (OFFICIAL_EMA_PREFIX, OFFICIAL_MODEL_PREFIX + "final.", "sd_features_stage_model.")
    if "head" in metadata or not any(k.startswith(official) for k in state):
        family = classify(state, metadata).family
        known = family in LABELS and family != "unknown"
        what = LABELS[family] if known else "not a model checkpoint this tool recognises"
        raise CheckpointError(f"{Path(source).name}: {what}, not {OFFICIAL_RELEASE}")
    return state


def convert_official(source: str | os.PathLike, target: str | os.PathLike, use_ema: bool = True,
                     config: HeadConfig | None = None, dtype: torch.dtype | None = None) -> HeadConfig:
    """Import the official ``LDZNet_txt2mask.ckpt`` (or a tiny file in its layout, given ``config``)."""
    _check_head_output(source, target)  # before reading a multi-GB file
    config = config or head_config("ldznet")
    with torch.device("meta"):
        expected = build_head(config).state_dict()
    state = official_head_state(_read_official(source), expected, use_ema, Path(source).name)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    write_safetensors(target, state, {"head": config.to_dict(),
                                      "training": {**OFFICIAL_TRAINING, "weights": "ema" if use_ema else "model",
                                                   "converted_from": Path(source).name}})
    return config
