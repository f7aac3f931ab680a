"""Data-parallel training through torch.distributed (launched by torchrun; one process per GPU).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_from_env`` joins
the process group (NCCL on CUDA, gloo on the CPU) and picks this process's GPU. The trainer wraps
its head in DistributedDataParallel, which all-reduces (averages) the gradients; everything else
here is the few collectives the trainer needs besides (loss means, gathering RNG states).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LdznetError


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group torchrun describes in the environment, if any: (the device this
    process trains on, whether this call joined). On CUDA the device is ``cuda:LOCAL_RANK``. A
    single process (no WORLD_SIZE, or 1) or one already in a group joins nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, False
    if not dist.is_available():
        raise LdznetError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise LdznetError(f"multi-process training runs on CUDA (NCCL) or the CPU (gloo), not {device.type}")
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The element-wise mean of ``values`` over all processes (the values themselves when alone)."""
    if world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / world()[1]).tolist()


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every process, by rank (picklable objects; [value] when alone)."""
    if world()[1] == 1:
        return [value]
    gathered: list[Any] = [None] * world()[1]
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every process (no-op when alone)."""
    if world()[1] > 1:
        dist.barrier()
