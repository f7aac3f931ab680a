"""FeatureTap on our UNet and on ldm's UNetModel (the module tree A1111 runs)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from torch import Tensor, nn

from conftest import TINY, tiny_inputs
from ldznet_ext.sd.unet import timestep_embedding
from ldznet_ext.backbones.base import LDZNET_BLOCKS, ldm_layout, spatial_transformers
from ldznet_ext.tap import FeatureTap, unet_lock

# Tiny z is 16 x 24: blocks 6 and 8-10 run at z / 4 (level 2), block 7 at z / 8 (the middle block);
# all five have model_channels * channel_mult[2] = 64 channels (1280 at SD v1 size).
EXPECTED_SHAPES = {6: (2, 64, 4, 6), 7: (2, 64, 2, 3), 8: (2, 64, 4, 6), 9: (2, 64, 4, 6), 10: (2, 64, 4, 6)}


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    return tiny_inputs(batch=2, h=16, w=24)


def _call(unet: nn.Module, inputs: tuple[Tensor, Tensor, Tensor]):
    return lambda: unet(*inputs)


def _blocks(unet: nn.Module) -> list[nn.Module]:
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


def _manual_forward(unet: nn.Module, x: Tensor, t: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The ldm forward written out layer by layer, recording every spatial-transformer output."""
    emb = unet.time_embed(timestep_embedding(t, TINY.model_channels))
    recorded, skips, h = [], [], x

    def run_block(block: nn.Module, h: Tensor) -> Tensor:
        for layer in block:
            if hasattr(layer, "emb_layers"):
                h = layer(h, emb)
            elif hasattr(layer, "transformer_blocks"):
                h = layer(h, context)
                recorded.append(h)
            else:
                h = layer(h)
        return h

    for block in unet.input_blocks:
        h = run_block(block, h)
        skips.append(h)
    h = run_block(unet.middle_block, h)
    for block in unet.output_blocks:
        h = run_block(block, torch.cat([h, skips.pop()], dim=1))
    return unet.out(h), recorded


def _hooked_modules(unet: nn.Module) -> list[str]:
    return [name for name, module in unet.named_modules() if module._forward_hooks]


def test_finds_the_16_blocks_in_execution_order(any_tiny_unet: nn.Module) -> None:
    unet = any_tiny_unet
    expected = ([unet.input_blocks[i][1] for i in (1, 2, 4, 5, 7, 8)] + [unet.middle_block[1]]
                + [unet.output_blocks[i][1] for i in range(3, 12)])
    found = spatial_transformers(unet)
    assert len(found) == 16
    assert all(a is b for a, b in zip(found, expected))


def test_features_equal_a_manual_forward(any_tiny_unet: nn.Module) -> None:
    unet, inputs = any_tiny_unet, _inputs()
    with torch.no_grad():
        with FeatureTap(ldm_layout(unet), LDZNET_BLOCKS, early_exit=False) as tap:
            features = tap.run(_call(unet, inputs))
        manual_out, recorded = _manual_forward(unet, *inputs)
    assert torch.equal(manual_out, tap.output)  # the manual forward is the real one
    assert {n: tuple(f.shape) for n, f in features.items()} == EXPECTED_SHAPES
    for number, feature in features.items():
        assert torch.equal(feature, recorded[number - 1]), number


def test_tap_without_early_exit_leaves_the_output_bit_identical(any_tiny_unet: nn.Module) -> None:
    unet, inputs = any_tiny_unet, _inputs()
    with torch.no_grad():
        plain = unet(*inputs)
        with FeatureTap(ldm_layout(unet), blocks=(1, 7, 16), early_exit=False) as tap:
            features = tap.run(_call(unet, inputs))
    assert sorted(features) == [1, 7, 16]
    assert torch.equal(tap.output, plain)


def test_early_exit_skips_the_decoder_tail_and_keeps_the_features(any_tiny_unet: nn.Module) -> None:
    unet, inputs = any_tiny_unet, _inputs()
    counts: Counter[str] = Counter()
    watched = {f"output_blocks.{i}": block for i, block in enumerate(unet.output_blocks)}
    watched |= {"upsample_after_block_10": unet.output_blocks[5][2], "out": unet.out,
                "middle_block": unet.middle_block}
    handles = [m.register_forward_hook(lambda *_, name=name: counts.update([name])) for name, m in watched.items()]
    try:
        with torch.no_grad():
            with FeatureTap(ldm_layout(unet), early_exit=False) as tap:
                full = tap.run(_call(unet, inputs))
            assert counts == Counter(list(watched))  # each watched module ran exactly once
            counts.clear()
            with FeatureTap(ldm_layout(unet), early_exit=True) as tap:
                early = tap.run(_call(unet, inputs))
    finally:
        for handle in handles:
            handle.remove()
    assert tap.output is None
    assert sorted(early) == list(LDZNET_BLOCKS)
    for number in LDZNET_BLOCKS:
        assert torch.equal(early[number], full[number]), number
    # output_blocks 0-4 finish; block 5 stops inside, after its transformer (block 10), before Upsample.
    assert counts == Counter(["middle_block"] + [f"output_blocks.{i}" for i in range(5)])


def test_early_exit_is_not_swallowed_by_except_exception(any_tiny_unet: nn.Module) -> None:
    unet, inputs = any_tiny_unet, _inputs()

    def guarded_call():  # what host code and other extensions do around model calls
        try:
            return unet(*inputs)
        except Exception:
            return "fallback"

    with torch.no_grad(), FeatureTap(ldm_layout(unet), blocks=(6,)) as tap:
        features = tap.run(guarded_call)
    assert tap.output is None and list(features) == [6]


def test_hooks_exist_only_inside_the_with_block(any_tiny_unet: nn.Module) -> None:
    unet, inputs = any_tiny_unet, _inputs()
    with torch.no_grad(), FeatureTap(ldm_layout(unet)) as tap:
        assert _hooked_modules(unet) == ["input_blocks.8.1", "middle_block.1"] + [
            f"output_blocks.{i}.1" for i in (3, 4, 5)]
        tap.run(_call(unet, inputs))
    assert _hooked_modules(unet) == []


def test_hooks_are_removed_when_the_unet_raises(any_tiny_unet: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    unet, inputs = any_tiny_unet, _inputs()

    def broken(*args, **kwargs):
        raise ValueError("broken ResBlock")

    # The second ResBlock of the middle block runs after blocks 6 and 7 and before 8-10.
    monkeypatch.setattr(unet.middle_block[2], "forward", broken)
    with torch.no_grad(), pytest.raises(ValueError, match="broken ResBlock"):
        with FeatureTap(ldm_layout(unet)) as tap:
            tap.run(_call(unet, inputs))
    assert sorted(tap.features) == [6, 7]
    assert _hooked_modules(unet) == []


def test_a_failed_install_removes_the_hooks_made_and_frees_the_unet(
        any_tiny_unet: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    unet = any_tiny_unet
    layout = ldm_layout(unet)
    # Block 8 refuses its hook after block 6's and 7's are in place.
    monkeypatch.setattr(layout.sites[7].module, "register_forward_hook", lambda hook: (_ for _ in ()).throw(
        RuntimeError("no hooks here")))
    with pytest.raises(RuntimeError, match="no hooks here"):
        with FeatureTap(layout):
            pass
    assert _hooked_modules(unet) == []
    taken = []
    thread = threading.Thread(target=lambda: taken.append(unet_lock(unet).acquire(blocking=False)))
    thread.start()
    thread.join()
    assert taken == [True]


def test_unet_is_unchanged_after_an_early_exit(any_tiny_unet: nn.Module) -> None:
    unet, inputs = any_tiny_unet, _inputs()
    with torch.no_grad():
        before = unet(*inputs)
        with FeatureTap(ldm_layout(unet), early_exit=True) as tap:
            tap.run(_call(unet, inputs))
        after = unet(*inputs)
    assert torch.equal(before, after)


@pytest.mark.parametrize("blocks", [(0,), (6, 17), ()])
def test_bad_block_numbers(any_tiny_unet: nn.Module, blocks: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="block"):
        FeatureTap(ldm_layout(any_tiny_unet), blocks)


def test_bypassed_unet_call_raises(any_tiny_unet: nn.Module) -> None:
    unet = any_tiny_unet
    tap = FeatureTap(ldm_layout(unet))
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        tap.run(lambda: None)
    with FeatureTap(ldm_layout(unet)) as tap, pytest.raises(RuntimeError, match=r"blocks \[6, 7, 8, 9, 10\].*TensorRT"):
        tap.run(lambda: torch.zeros(1, 4, 16, 24))  # what a TensorRT UNet looks like from here


def test_rejects_modules_without_the_ldm_layout() -> None:
    with pytest.raises(TypeError, match="Linear is not an ldm-layout UNet"):
        spatial_transformers(nn.Linear(2, 2))
