"""factory.build_segmenter: one builder for every front end (head check, defaults, precision)."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from fixtures_models import tiny_head, tiny_sd  # noqa: F401  (pytest fixtures)
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.factory import ModelSettings, backbone_unet_config, build_segmenter, check_head_fits, head_dtype
from ldznet_ext.modeling.build import head_config
from ldznet_ext.refine import RefineSettings


def _host_like(sd):
    """A backbone whose UNet has no ``config`` (as A1111's ldm UNet): only weights to read."""
    unet = types.SimpleNamespace(state_dict=sd.unet.state_dict)
    return types.SimpleNamespace(unet=unet, device=torch.device("cpu"), dtype=torch.float16)


def _wide_config(config):
    return dataclasses.replace(config, unet=dataclasses.replace(config.unet, model_channels=64))


def test_head_defaults_and_zero_shot_defaults(tiny_sd, tiny_head):
    head, config = tiny_head
    with_head = build_segmenter(tiny_sd, head, config, ModelSettings(resolution=64, seed=3))
    assert (with_head.settings.timestep, with_head.settings.draws, with_head.settings.seed) == (config.timestep, 1, 3)
    zero_shot = build_segmenter(tiny_sd, settings=ModelSettings(draws=2, refine=RefineSettings(enabled=False)))
    assert zero_shot.zero_shot and zero_shot.settings.zero_shot.draws == 2
    assert zero_shot.settings.zero_shot.timestep == 100 and not zero_shot.settings.refine.enabled
    chosen = build_segmenter(tiny_sd, head, config, ModelSettings(timestep=123))
    assert chosen.settings.timestep == 123


def test_refuses_a_head_made_for_another_model(tiny_sd, tiny_head):
    head, config = tiny_head
    wide = _wide_config(config)
    with pytest.raises(CheckpointError, match=r"^w\.safetensors: this ldznet head was made for a different SD model "
                                              r"\(head vs model: model_channels 64 vs 32\); use a head trained on "
                                              r"this model, or mode 'zero-shot'$"):
        build_segmenter(tiny_sd, head, wide, head_name="w.safetensors", zero_shot="mode 'zero-shot'")
    # a host's UNet has no config: the check reads its weight shapes (no stand-in object needed)
    read = backbone_unet_config(_host_like(tiny_sd))
    assert read == dataclasses.replace(tiny_sd.unet.config, num_heads=8)  # heads are not in the weights
    check_head_fits(_host_like(tiny_sd), config)
    with pytest.raises(CheckpointError, match="model_channels 64 vs 32"):
        check_head_fits(_host_like(tiny_sd), wide)


def test_bad_numbers_and_halves():
    with pytest.raises(LdznetError, match="draws"):
        ModelSettings(draws=0).segmenter_settings(None)
    with pytest.raises(LdznetError, match="timestep"):
        ModelSettings(timestep=1000).segmenter_settings(head_config("ldznet", "tiny", latent_size=8))
    with pytest.raises(ValueError, match="pass both head and head_config"):
        build_segmenter(types.SimpleNamespace(), head=torch.nn.Identity())


def test_head_dtype_follows_the_backbone(tiny_sd):
    host = _host_like(tiny_sd)  # fp16 on the CPU
    assert head_dtype("auto", host) is torch.float32  # half-precision CPU kernels are missing or slow
    assert head_dtype("bf16", host) is torch.bfloat16
    assert head_dtype("auto", tiny_sd) is torch.float32
    with pytest.raises(LdznetError, match="unknown dtype 'fp64'"):
        head_dtype("fp64", host)
