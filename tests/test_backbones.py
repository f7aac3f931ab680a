"""backbones/: the seeded posterior sampler every backbone shares and the model-family classifier."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch

from ldznet_ext.backbones.family import LABELS, host_family
from ldznet_ext.backbones.sampling import sample_posterior
from ldznet_ext.sd.vae import AutoencoderKL, VAEConfig

PACKAGE = Path(__file__).resolve().parents[1] / "ldznet_ext"


def test_sample_posterior_is_seeded_and_leaves_the_global_rng_alone():
    mean, std = torch.arange(8.0).view(1, 2, 2, 2), torch.full((1, 2, 2, 2), 0.5)
    state = torch.get_rng_state()
    draw = sample_posterior(mean, std, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    expected = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(7)).to(mean)
    assert draw.dtype == mean.dtype and torch.equal(draw, expected)


def test_our_vae_samples_through_it():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1)).eval()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode_moments(image)
        z = vae.encode(image, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, sample_posterior(mean, torch.exp(0.5 * logvar), torch.Generator().manual_seed(3)))


def test_the_posterior_is_sampled_in_one_place():
    """Inference code (our VAE, the WebUI adapters) draws posterior noise only through sampling.py;
    training (train/, world/) draws its own noise in its own order."""
    draw = re.compile(r"torch\.randn\([^)]*generator")
    inference = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("train", "world")]
    holders = sorted(str(p.relative_to(PACKAGE)) for p in inference
                     if draw.search(p.read_text()) and "posterior" in p.read_text())
    assert holders == ["backbones/sampling.py"]


def test_host_family_from_flags_and_channels():
    def model(**flags):
        return types.SimpleNamespace(**flags)

    assert host_family(model(is_sd1=True)) == "sd-v1"
    assert host_family(model(is_sd1=False, is_sdxl=True)) == "sdxl"
    assert host_family(model(is_sd1=False, is_ssd=True, is_sdxl=True)) == "sdxl"  # most specific first
    assert host_family(model(is_sd1=False)) == "unknown"
    assert host_family(model()) == "sd-v1" and host_family(model(), sd1_unless_told=False) == "unknown"
    assert host_family(model(is_sd1=True, is_inpaint=True)) == "sd-v1-inpainting"
    assert host_family(model(), in_channels=9) == "sd-v1-inpainting"
    assert host_family(model(), in_channels=8) == "unknown"
    assert LABELS["sd2"] == "SD 2.x" and LABELS["ssd"] == "SSD-1B"


def test_host_flags_are_read_in_one_place():
    holders = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if '"is_sdxl"' in p.read_text())
    assert holders == ["backbones/family.py"]
