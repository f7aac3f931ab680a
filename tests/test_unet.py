"""The SD UNet and noise schedule against the reference ldm code that A1111 runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, ldm_unet, tiny_inputs, tiny_unet
from ldznet_ext.sd.schedule import ZERO_TERMINAL_ALPHA, NoiseSchedule, alphas_cumprod, rescale_zero_terminal_snr
from ldznet_ext.sd.unet import UNetConfig, UNetModel, count_parameters, timestep_embedding, unet_config

ldm_util = pytest.importorskip("ldm.modules.diffusionmodules.util")

SD_V1_PARAMETERS = 859_520_964


def _layout(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def test_tiny_state_dict_equals_ldm() -> None:
    ours = _layout(UNetModel(TINY))
    assert ours == _layout(ldm_unet(TINY))
    assert len(ours) == 684


def test_sd_v1_state_dict_and_parameter_count_equal_ldm() -> None:
    config = unet_config("sd-v1")
    with torch.device("meta"):
        ours, ref = UNetModel(config), ldm_unet(config)
    assert _layout(ours) == _layout(ref)
    assert len(_layout(ours)) == 686
    assert count_parameters(ours) == count_parameters(ref) == SD_V1_PARAMETERS


def test_output_matches_ldm_with_random_weights() -> None:
    ours, ref = tiny_unet("ours"), tiny_unet("ldm")
    x, t, context = tiny_inputs(batch=2, h=24, w=40)
    assert t[0] != t[1]
    with torch.no_grad():
        out, expected = ours(x, t, context), ref(x, t, context)
    assert out.shape == (2, 4, 24, 40)
    assert out.std() > 0.1  # the random weights really reach the output
    assert (out[0] - out[1]).abs().max() > 0.1
    # fp32 round-off (SDPA vs ldm's einsum softmax) accumulates over ~40 layers to ~2e-6 of the
    # output scale (|out| up to ~5 here); a wrong op or weight mapping shows up as O(1).
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_low_precision_weights_run_without_autocast() -> None:
    ours = tiny_unet("ours")
    x, t, context = tiny_inputs(batch=1, h=8, w=16)
    with torch.no_grad():
        reference = ours(x, t, context)
        out = ours.to(torch.bfloat16)(x, t, context)
    assert out.dtype == torch.float32 and out.shape == (1, 4, 8, 16)
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("dim", [64, 33])
def test_timestep_embedding_equals_ldm(dim: int) -> None:
    t = torch.tensor([0.0, 1.5, 400.0, 999.0])
    ours = timestep_embedding(t, dim)
    assert ours.shape == (4, dim)
    assert torch.equal(ours, ldm_util.timestep_embedding(t, dim))


def test_alphas_cumprod_equals_ldm_exactly() -> None:
    betas = ldm_util.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    expected = torch.from_numpy(np.cumprod(1.0 - betas, axis=0))
    ours = alphas_cumprod()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert torch.equal(ours, expected)
    assert torch.equal(NoiseSchedule().alphas_cumprod, expected)


def test_zero_terminal_snr_rescale_equals_diffusers() -> None:
    ddim = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    table = alphas_cumprod()
    betas = 1 - table / torch.cat([torch.ones(1, dtype=table.dtype), table[:-1]])
    expected = torch.cumprod(1 - ddim.rescale_zero_terminal_snr(betas), dim=0)
    ours = rescale_zero_terminal_snr(table)
    assert ours.dtype == torch.float64 and ours[0] == table[0] and expected[-1] == 0
    torch.testing.assert_close(ours[:-1], expected[:-1], rtol=1e-9, atol=1e-15)
    assert ours[-1] == ZERO_TERMINAL_ALPHA and (ours[:-1] - table[:-1] < 0).sum() == 998  # less signal everywhere


def test_q_sample_formula_on_hand_values() -> None:
    schedule = NoiseSchedule(torch.tensor([1.0, 0.64, 0.36, 0.0]))
    assert schedule.num_timesteps == 4
    z = torch.full((3, 1, 1, 2), 1.0)
    noise = torch.tensor([2.0, -1.0]).view(1, 1, 1, 2).expand(3, 1, 1, 2)
    z_t = schedule.q_sample(z, torch.tensor([1, 2, 3]), noise)
    # sqrt(a) z + sqrt(1 - a) noise with (sqrt(a), sqrt(1 - a)) = (0.8, 0.6), (0.6, 0.8), (0, 1)
    expected = torch.tensor([[0.8 + 1.2, 0.8 - 0.6], [0.6 + 1.6, 0.6 - 0.8], [2.0, -1.0]]).view(3, 1, 1, 2)
    torch.testing.assert_close(z_t, expected, rtol=0, atol=1e-6)
    half = schedule.q_sample(z.half(), torch.tensor([1, 2, 3]), noise.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, rtol=0, atol=2e-3)
    # one noise [1, ...] for the batch, in another dtype and on another device: put on z's and broadcast
    assert torch.equal(schedule.q_sample(z, torch.tensor([1, 2, 3]), noise[:1].double()), z_t)
    on_meta = schedule.q_sample(z.to("meta"), torch.tensor([1, 2, 3]), noise[:1])
    assert (on_meta.device.type, on_meta.shape, on_meta.dtype) == ("meta", z.shape, torch.float32)


def test_unet_config_by_name() -> None:
    assert unet_config("tiny", out_channels=1) == UNetConfig(
        out_channels=1, model_channels=32, channel_mult=(1, 1, 2, 2), num_heads=2, context_dim=64)
    assert UNetConfig.from_dict(TINY.to_dict() | {"channel_mult": [1, 1, 2, 2]}) == TINY
    with pytest.raises(ValueError, match="unknown UNet size 'sd-v3'; known sizes: sd-v1, tiny"):
        unet_config("sd-v3")


def test_block_numbers_follow_execution_order() -> None:
    unet = UNetModel(TINY)
    numbers = [layer.block_number for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
               for layer in block if hasattr(layer, "block_number")]
    assert numbers == list(range(1, 17))
