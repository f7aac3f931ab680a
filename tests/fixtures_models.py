"""Tiny random SD v1-architecture models and an LD-ZNet head for the engine, CLI and batch tests.

The SD model is ``build_stable_diffusion("tiny")`` with a VAE that downsamples by 8 like SD's
(the "tiny" VAE downsamples by 2, which would make 64 px images 32x32 latents and the tests 16x
slower); the head is ``head_config("ldznet", "tiny", latent_size=8)``, made for 64 px images.
Zero-initialised layers (ldm's output convolutions) are perturbed, since a UNet that predicts
eps = 0 everywhere would make zero-shot maps constant and every seed alike.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ldznet_ext.heads import save_head
from ldznet_ext.modeling.build import HeadConfig, build_head, head_config
from ldznet_ext.sd.checkpoint import build_stable_diffusion, save_stable_diffusion
from ldznet_ext.sd.model import StableDiffusion
from ldznet_ext.sd.vae import AutoencoderKL, VAEConfig
from ldznet_ext.segmenter import Segmenter, SegmenterSettings

__all__ = ["every_term_found", "image_file", "one_thread", "perturb_", "random_image", "single_thread", "tiny_head", "tiny_model_files", "tiny_models64", "tiny_sd"]

TINY_VAE8 = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


@pytest.fixture
def image_file(tmp_path) -> Path:
    """A 64 x 64 PNG of :func:`random_image` (seed 3) for the command-line tests."""
    path = tmp_path / "in.png"
    Image.fromarray(random_image(64, 64, seed=3)).save(path)
    return path


def perturb_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Add N(0, std^2) to every parameter in place (keeps the init's scale, breaks its zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return module.eval().requires_grad_(False)


def random_image(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """uint8 [H, W, C] noise with smooth structure (a blurred grid), so masks are not pure noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), channels)).astype(np.float64)
    rows = np.linspace(0, coarse.shape[0] - 1, height).round().astype(int)
    cols = np.linspace(0, coarse.shape[1] - 1, width).round().astype(int)
    fine = rng.integers(-16, 17, (height, width, channels))
    return np.clip(coarse[rows][:, cols] + fine, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_sd() -> StableDiffusion:
    """The tiny SD model in memory (fp32, CPU), 64 px -> 8x8 latents."""
    with one_thread():
        model = build_stable_diffusion("tiny", seed=0)
        torch.manual_seed(1)
        model.vae = AutoencoderKL(TINY_VAE8)
        perturb_(model.unet, seed=2)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_head(tiny_sd) -> tuple[nn.Module, HeadConfig]:
    """A random LD-ZNet head for the tiny SD UNet (positional embeddings for 8x8 latents) whose
    probabilities span (0, 1) and visibly depend on the text and on the SD features."""
    config = head_config("ldznet", "tiny", latent_size=8)
    torch.manual_seed(3)
    head = perturb_(build_head(config), seed=4, std=0.3)
    # A random one-channel x8 decoder squashes its input to nearly constant logits (a spread of
    # ~0.01 in probability). Rescale its last conv so that a sample image's logits have mean 0 and
    # std 3: the conv is linear, logits = w * x + b, so (logits - b) * gain is w' * x.
    probe = Segmenter(tiny_sd, head, config, SegmenterSettings(resolution=64))
    with one_thread():
        probe.set_image(random_image(64, 64, seed=99))
        logits = torch.logit(probe.predict_terms(["calibration"])["calibration"].double())
    last = head.final[-1]
    gain = 3.0 / float(logits.std())
    with torch.no_grad():
        last.bias.copy_(-(logits.mean() - last.bias) * gain)
        last.weight.mul_(gain)
    return head, config


@pytest.fixture(scope="session")
def tiny_models64(tiny_sd, tiny_head) -> tuple[StableDiffusion, nn.Module, HeadConfig]:
    """float64 copies of the tiny SD model and head, for comparisons at 1e-5 that should not
    depend on float32 rounding (which the random head's last-layer gain amplifies)."""
    head, config = tiny_head
    return copy.deepcopy(tiny_sd).double(), copy.deepcopy(head).double(), config


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. Tiny models gain nothing from more, and on busy
    cores OpenMP's barriers made two threads 10-30x slower than one (measured: 35 ms vs 510 ms of
    CPU for one head prediction)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """:func:`one_thread` for all tests of a module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory: pytest.TempPathFactory, tiny_sd, tiny_head) -> tuple[Path, Path]:
    """(sd.safetensors, head.safetensors) of the tiny models, written once per session."""
    folder = tmp_path_factory.mktemp("tiny-models")
    save_stable_diffusion(tiny_sd, folder / "sd.safetensors")
    save_head(*tiny_head, folder / "head.safetensors")
    return folder / "sd.safetensors", folder / "head.safetensors"


@pytest.fixture
def every_term_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Presence finds every term with a map above 0 anywhere: tiny random models make weak maps that
    the calibrated rules reject, and tests of how options travel need masks that are not empty."""
    from ldznet_ext import segmenter
    from ldznet_ext.masks.presence import PresenceRule
    monkeypatch.setattr(segmenter, "HEAD_RULE", PresenceRule(0.0, 0.0))
    monkeypatch.setattr(segmenter, "ZERO_SHOT_RULE", PresenceRule(0.0, 0.0))
