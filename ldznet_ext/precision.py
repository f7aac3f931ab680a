"""Compute precision: the one table of dtype names, shared by the commands, the WebUI and training.

Names are the short ones every front end shows ("fp32", "fp16", "bf16"); the micro SD trainer's
``--dtype`` spells them as torch does ("float32", "bfloat16"), which :func:`dtype_named` reads too.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .errors import LdznetError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS: tuple[str, ...] = tuple(DTYPES)
_TORCH_SPELLINGS = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPES.values()}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a precision name ("fp32", "fp16", "bf16", or torch's "float32", ...);
    LdznetError for any other name."""
    dtype = DTYPES.get(name, _TORCH_SPELLINGS.get(name))
    if dtype is None:
        raise LdznetError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return dtype


def as_dtype(value: torch.dtype | str) -> torch.dtype:
    """A model loader's ``dtype``: one of the precisions' torch dtypes, or its name (:func:`dtype_named`);
    LdznetError for anything else."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise LdznetError(f"unsupported dtype {value}: expected one of {', '.join(DTYPES)}")
        return value
    if not isinstance(value, str):
        raise LdznetError(f"dtype must be a torch dtype or one of {', '.join(DTYPES)}, got {type(value).__name__}")
    return dtype_named(value)


def compute_dtype(dtype: torch.dtype, device: torch.device, warn: bool = False) -> torch.dtype:
    """``dtype``, except fp16 on the CPU, which becomes fp32 (with a warning when ``warn``): several
    PyTorch releases lack CPU kernels for half-precision convolutions and norms, and where they exist
    they are slower than fp32."""
    if dtype == torch.float16 and device.type == "cpu":
        if warn:
            warnings.warn("fp16 is not supported on the CPU; computing in fp32 (use bf16 for lower memory)",
                          stacklevel=3)
        return torch.float32
    return dtype


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype to compute in for the user's precision ``name`` (or its torch dtype) on
    ``device`` (fp16 on the CPU: fp32, with a warning)."""
    return compute_dtype(as_dtype(name), device, warn=True)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; None or float32: a context that changes nothing. Not
    torch's disabled autocast there: torch < 2.3 refuses float32 as the CPU's autocast dtype even when
    autocast is off (A1111 v1.10 installs torch 2.1)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a training precision name: None for fp32 (no autocast)."""
    dtype = dtype_named(name)
    return None if dtype == torch.float32 else dtype
