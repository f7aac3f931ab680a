"""The SDXL (and SD 2.x) UNet in sgm's ldm layout against diffusers' UNet2DConditionModel, with the
weights converted by diffusers' own single-file conversion (convert_ldm_unet_checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import randomize_
from ldznet_ext.backbones.base import ldm_layout
from ldznet_ext.checkpoint_io import parse_config
from ldznet_ext.errors import CheckpointError
from ldznet_ext.sd.checkpoint import unet_config_from_state_dict
from ldznet_ext.sd.unet import UNetConfig, UNetModel, count_parameters, timestep_embedding, unet_config

diffusers = pytest.importorskip("diffusers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_SDXL = unet_config("tiny-sdxl")
TIME_DIM = 8  # diffusers' addition_time_embed_dim of the tiny twin (SDXL: 256)
POOLED = TINY_SDXL.adm_in_channels - 6 * TIME_DIM
SDXL_BASE_UNET_PARAMETERS = 2_567_463_684
SD2_UNET_PARAMETERS = 865_910_724  # Stability AI's SD 2.x UNet (512-base and 768-v alike)


def diffusers_config(config: UNetConfig, time_dim: int = 256) -> dict:
    """UNet2DConditionModel's configuration for ``config``, built here (never downloaded)."""
    levels = range(len(config.channel_mult))
    attention = [level in config.attention_levels for level in levels]
    widths = [config.model_channels * mult for mult in config.channel_mult]
    # diffusers' "attention_head_dim" of SD 2.x / SDXL configs is the head *count* per level.
    heads = [config.heads_at(width)[0] for width in widths]
    fields = dict(
        sample_size=32, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        block_out_channels=widths, layers_per_block=config.num_res_blocks, cross_attention_dim=config.context_dim,
        attention_head_dim=heads, use_linear_projection=config.linear_projection,
        transformer_layers_per_block=[config.depth_at(level) for level in levels],
    )  # fmt: skip
    if config.adm_in_channels:
        fields.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                      projection_class_embeddings_input_dim=config.adm_in_channels)
    return fields


def diffusers_twin(ours: UNetModel, time_dim: int) -> torch.nn.Module:
    """diffusers' UNet with ``ours``' weights, converted from the single-file layout by diffusers."""
    config = diffusers_config(ours.config, time_dim)
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = single_file.convert_ldm_unet_checkpoint(checkpoint, config)
    twin = diffusers.UNet2DConditionModel(**config)
    twin.load_state_dict(converted, strict=True)
    return twin.eval()


def _inputs(config: UNetConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 24, generator=g)
    t = torch.tensor([37, 781])
    context = torch.randn(2, 77, config.context_dim, generator=g)
    return g, x, t, context


def test_tiny_sdxl_matches_diffusers_with_size_conditioning() -> None:
    ours = randomize_(UNetModel(TINY_SDXL), seed=0)
    twin = diffusers_twin(ours, TIME_DIM)
    g, x, t, context = _inputs(TINY_SDXL)
    pooled = torch.randn(2, POOLED, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 640, 16, 32, 512, 512]])
    # sgm's vector: the pooled text, then each size number's sinusoidal embedding (cosines first).
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), TIME_DIM).view(2, -1)], dim=1)
    with torch.no_grad():
        out = ours(x, t, context, y)
        expected = twin(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        without_sizes = ours(x, t, context, torch.cat([pooled, torch.zeros(2, 6 * TIME_DIM)], dim=1))
    assert out.shape == (2, 4, 16, 24) and out.std() > 0.1
    assert (out - without_sizes).abs().max() > 1e-2  # the size conditioning reaches the output
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_tiny_sd2_shape_matches_diffusers() -> None:
    config = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1, 2), context_dim=48,
                        num_head_channels=16, linear_projection=True)
    ours = randomize_(UNetModel(config), seed=3)
    twin = diffusers_twin(ours, TIME_DIM)
    _, x, t, context = _inputs(config, seed=4)
    with torch.no_grad():
        out, expected = ours(x, t, context), twin(x, t, context).sample
    assert out.std() > 0.1
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_tiny_sdxl_layout_has_one_site_per_spatial_transformer() -> None:
    layout = ldm_layout(UNetModel(TINY_SDXL))
    # Levels 1 and 2 hold transformers (2 input + 3 output blocks each) and the middle block one.
    assert [s.name for s in layout.sites] == ["input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1",
                                              "input_blocks.8.1", "middle_block.1", "output_blocks.0.1",
                                              "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1",
                                              "output_blocks.4.1", "output_blocks.5.1"]
    assert [s.downscale for s in layout.sites] == [2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 2]
    assert [len(s.module.transformer_blocks) for s in layout.sites] == [1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1]


def test_unet_refuses_a_missing_or_unexpected_vector() -> None:
    _, x, t, context = _inputs(TINY_SDXL)
    with pytest.raises(ValueError, match=r"this UNet takes a vector y \[B, 80\], got none"):
        UNetModel(TINY_SDXL)(x, t, context)
    plain = UNetModel(unet_config("tiny"))
    with pytest.raises(ValueError, match=r"this UNet takes no vector y, got \(2, 80\)"):
        plain(x, t, torch.zeros(2, 77, 64), torch.zeros(2, 80))


@pytest.mark.parametrize("size, parameters, keys, sites", [("sdxl", SDXL_BASE_UNET_PARAMETERS, 1680, 11),
                                                           ("sd2", SD2_UNET_PARAMETERS, 686, 16)])
def test_full_size_unets_on_meta_match_diffusers_and_are_recovered_from_their_shapes(size, parameters, keys,
                                                                                   sites) -> None:
    """A real SDXL or SD 2.x file carries no ldznet metadata: its configuration must come from the shapes
    alone (SD 2.x: the middle block's depth too; its level has no attention, and it was read as 0)."""
    config = unet_config(size)
    with torch.device("meta"):
        ours = UNetModel(config)
        reference = diffusers.UNet2DConditionModel(**diffusers_config(config))
    assert count_parameters(ours) == count_parameters(reference) == parameters
    # Every ldm key converts to exactly the keys diffusers' UNet has, each with its shape.
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = single_file.convert_ldm_unet_checkpoint(checkpoint, diffusers_config(config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert len(checkpoint) == keys
    assert len(ldm_layout(ours).sites) == sites
    assert unet_config_from_state_dict(ours.state_dict()) == config


def test_config_metadata_round_trips_and_sd_v1_reads_as_before() -> None:
    sdxl = unet_config("sdxl")
    stored = json.loads(json.dumps(sdxl.to_dict()))
    assert parse_config(UNetConfig, stored, "x.safetensors: field 'ldznet.unet'") == sdxl
    assert list(unet_config("sd-v1").to_dict()) == ["in_channels", "out_channels", "model_channels", "channel_mult",
                                                    "num_res_blocks", "attention_levels", "num_heads", "context_dim",
                                                    "transformer_depth"]
    with pytest.raises(CheckpointError, match="key 'linear_projection' is 1; expected true or false"):
        parse_config(UNetConfig, {**stored, "linear_projection": 1}, "x.safetensors: field 'ldznet.unet'")
    with pytest.raises(CheckpointError, match=r"level_depths \[1, 2\] needs one depth per level \(3 levels"):
        parse_config(UNetConfig, {**stored, "level_depths": [1, 2]}, "x.safetensors: field 'ldznet.unet'")


def test_the_sdxl_config_is_recovered_from_the_file_shapes() -> None:
    with torch.device("meta"):
        state = UNetModel(unet_config("sdxl")).state_dict()
    assert unet_config_from_state_dict(state) == unet_config("sdxl")
    # SD v1 keeps its plain config (heads are not in the weights: 8 assumed)
    assert unet_config_from_state_dict(UNetModel(unet_config("tiny")).state_dict()) == unet_config("tiny", num_heads=8)


def test_a_unet_whose_depth_varies_within_a_level_is_refused_by_name() -> None:
    """SSD-1B and Vega drop transformer blocks from some of a level's transformers."""
    with torch.device("meta"):
        state = UNetModel(unet_config("sdxl")).state_dict()
    thinned = {k: v for k, v in state.items() if not k.startswith("output_blocks.0.1.transformer_blocks.9.")}
    with pytest.raises(CheckpointError, match=r"^unsupported UNet: the transformers of output_blocks\.0 are 9 deep, the "
                                              r"first of its level 10 \(a distilled SDXL such as SSD-1B or Vega\?\)"):
        unet_config_from_state_dict(thinned)
