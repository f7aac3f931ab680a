"""Device choices: the user's device name (or a torch.device) -> the torch device to compute on.

Shared by the segmenter loader and the lower-level model loaders, so a name that every front end
refuses (``meta``, ``gpu``) is refused the same way wherever it is passed.
"""

from __future__ import annotations

import torch

from .errors import LdznetError
from .limits import check_device_name


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """A torch device from a name ("cpu", "cuda", "cuda:1", "mps"); None or "auto" picks CUDA, then
    MPS, then the CPU. Other names (``meta``, ``xla``, ...) are refused: LdznetError. A torch.device
    is the caller's choice of backend and passes as it is, but ``meta`` (it computes nothing) and a CUDA
    or MPS device that this machine lacks are refused as for names."""
    if isinstance(name, torch.device):
        if name.type == "meta":
            raise LdznetError("the meta device computes nothing a mask can be made of; use cpu, cuda or mps")
        device = name
    else:
        if name is not None:
            check_device_name(name)
        if name in (None, "auto"):
            if torch.cuda.is_available():
                return torch.device("cuda")
            mps = getattr(torch.backends, "mps", None)
            return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LdznetError(f"device {str(device)!r} was asked for but CUDA is not available; use the CPU "
                          "(--device cpu, device='cpu')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LdznetError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LdznetError(f"device {str(device)!r} was asked for but MPS is not available; use the CPU "
                          "(--device cpu, device='cpu')")
    return device
