"""modules.devices on a CPU run with --no-half: float32 everywhere, autocast a no-op."""
import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
unet_needs_upcast = False


def autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass
