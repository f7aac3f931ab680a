"""A model whose weights are NaN (or that overflows in fp16) is refused with a message naming it,
never turned into an empty mask with exit status 0 (issue #21.13)."""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures_models import random_image
from PIL import Image

from ldznet_ext.errors import LdznetError
from ldznet_ext.sd.checkpoint import save_stable_diffusion
from ldznet_ext.segmenter import Segmenter, SegmenterSettings

pytestmark = pytest.mark.usefixtures("single_thread")


def _nan_(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))
    return module


@pytest.mark.parametrize("part, what", [("unet", "probabilities"), ("vae", "latents")])
def test_nan_weights_are_refused_naming_the_model(tiny_sd, tiny_head, part, what):
    broken = copy.deepcopy(tiny_sd)
    _nan_(getattr(broken, part))
    head, config = tiny_head
    segmenter = Segmenter(broken, head, config, SegmenterSettings(resolution=64), name="broken.safetensors")
    message = (f"broken.safetensors: the model produced NaN/inf {what}; its weights may be corrupt, "
               "or it needs fp32")
    with pytest.raises(LdznetError, match=message):
        segmenter.set_image(random_image(64, 64, seed=1))
        segmenter.predict("cat")


def test_nan_weights_zero_shot(tiny_sd):
    broken = copy.deepcopy(tiny_sd)
    _nan_(broken.unet)
    segmenter = Segmenter(broken, settings=SegmenterSettings(resolution=64))
    segmenter.set_image(random_image(64, 64, seed=1))
    with pytest.raises(LdznetError, match="the SD model: the model produced NaN/inf probabilities"):
        segmenter.predict_terms(["cat"])


def test_cli_refuses_a_nan_model_with_status_2(ldznet, tmp_path, tiny_sd):
    broken = copy.deepcopy(tiny_sd)
    _nan_(broken.unet)
    save_stable_diffusion(broken, tmp_path / "nan.safetensors")
    Image.fromarray(random_image(64, 64, seed=2)).save(tmp_path / "photo.png")
    code, stdout, err = ldznet("mask", tmp_path / "photo.png", "cat", "-o", tmp_path / "m.png",
                               "--model", tmp_path / "nan.safetensors", "--zero-shot", "--resolution", 64,
                               "--draws", 1)
    assert (code, stdout) == (2, "")
    assert "ldznet mask: error: nan.safetensors: the model produced NaN/inf probabilities" in err
    assert not (tmp_path / "m.png").exists()
