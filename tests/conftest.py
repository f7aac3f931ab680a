"""Shared fixtures: tiny UNets with random weights and ldm's twin (UNet, tap and head tests), and the
in-process CLI runner (command tests), the PID of an ended process (temporary files left by a crash)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from ldznet_ext import cli
from ldznet_ext.sd.unet import UNetConfig, UNetModel, unet_config

# The test models are tiny: intra-op threads buy nothing, and on a 2-core machine that also runs
# other work two OpenMP threads spin-wait on each other (measured: 450 s instead of 38 s for the
# UNet, tap and head tests at load 10). An explicit OMP_NUM_THREADS still wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

TINY = unet_config("tiny")


def randomize_(module: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Overwrite every parameter with N(0, std^2), norm scales with 1 + N(0, std^2), in place.

    Fresh modules hide bugs: zero-initialised output convs make whole branches vanish and
    identity norms make affine mix-ups invisible.
    """
    g = torch.Generator().manual_seed(seed)
    scales = {id(m.weight) for m in module.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1 if id(p) in scales else noise)
    return module.eval()


def ldm_unet(config: UNetConfig, use_checkpoint: bool = False) -> nn.Module:
    """ldm's ``openaimodel.UNetModel`` (what A1111 runs) with the hyper-parameters of ``config``."""
    openaimodel = pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    return openaimodel.UNetModel(
        image_size=32, in_channels=config.in_channels, out_channels=config.out_channels,
        model_channels=config.model_channels, num_res_blocks=config.num_res_blocks,
        attention_resolutions=[2 ** level for level in config.attention_levels],
        channel_mult=list(config.channel_mult), num_heads=config.num_heads, use_spatial_transformer=True,
        transformer_depth=config.transformer_depth, context_dim=config.context_dim,
        use_checkpoint=use_checkpoint, legacy=False,
    )  # fmt: skip


def tiny_unet(kind: str, seed: int = 0) -> nn.Module:
    """A tiny SD-topology UNet with random weights: "ours", "ldm" or "ldm-checkpoint" (A1111's
    v1-inference.yaml sets use_checkpoint). Equal seeds give equal weights whatever the kind."""
    ours = randomize_(UNetModel(TINY), seed)
    if kind == "ours":
        return ours
    ref = ldm_unet(TINY, use_checkpoint=kind == "ldm-checkpoint")
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.eval()


def tiny_inputs(batch: int = 2, h: int = 24, w: int = 40, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Latents [B, 4, h, w], two different timesteps [B], text context [B, 77, 64]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY.in_channels, h, w, generator=g)
    t = torch.tensor([37, 781] * batch)[:batch]
    context = torch.randn(batch, 77, TINY.context_dim, generator=g)
    return x, t, context


@pytest.fixture(params=["ours", "ldm", "ldm-checkpoint"])
def any_tiny_unet(request: pytest.FixtureRequest) -> nn.Module:
    """Each ldm-layout UNet implementation the tap must work on, tiny and random."""
    return tiny_unet(request.param)


@pytest.fixture
def ldznet(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    def run(*args: object) -> tuple[int, str, str]:
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    return finished.pid



from fixtures_models import *  # noqa: E402,F401,F403  (tiny SD model and head fixtures)
