"""A new model family plugs in as an adapter: a toy backbone over the tiny SD v1 whose conditioning
carries a pooled vector and a size input (as SDXL's does) that its UNet call consumes runs through
the Segmenter, with a head and zero-shot, with no change to segmenter.py, zeroshot.py or tap.py."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from fixtures_models import random_image
from torch import Tensor

from ldznet_ext.backbones.base import LDZNET_BLOCKS, Backbone, Conditioning, UNetLayout, is_backbone, ldm_layout
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.zeroshot import ZeroShotSettings

pytestmark = pytest.mark.usefixtures("single_thread")

HEAD = SegmenterSettings(resolution=64)
ZERO_SHOT = SegmenterSettings(resolution=64, zero_shot=ZeroShotSettings(draws=2, cross_attention=0.5))


class PooledBackbone:
    """The tiny SD v1 as a family whose UNet also takes a pooled text vector (added to every context
    token, times ``weight``) and an image size per row; every call checks that the rows of its
    conditioning stayed together through the segmenter's batching."""

    def __init__(self, sd, weight: float):
        self.sd, self.weight, self.calls = sd, weight, 0
        self.schedule = sd.schedule

    unet = property(lambda self: self.sd.unet)
    device = property(lambda self: self.sd.device)
    dtype = property(lambda self: self.sd.dtype)
    downsample_factor = property(lambda self: self.sd.downsample_factor)

    @property
    def layout(self) -> UNetLayout:
        return ldm_layout(self.sd.unet, tapped=LDZNET_BLOCKS)

    def encode_image(self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        return self.sd.encode_image(image, sample=sample, generator=generator)

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        context = self.sd.text_encoder.encode(prompts)
        size = torch.tensor([[len(p), 64] for p in prompts])
        return Conditioning(context, pooled=context.mean(1), extra={"size": size})

    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        assert len(conditioning) == z_t.shape[0] == conditioning.extra["size"].shape[0]
        assert torch.equal(conditioning.pooled, conditioning.context.mean(1))  # rows kept together
        self.calls += 1
        context = conditioning.context + self.weight * conditioning.pooled[:, None]
        return self.sd.unet(z_t, t.to(z_t.device), context)


def _maps(backbone, head, settings) -> list[dict[str, Tensor]]:
    images = [random_image(64, 64, seed=s) for s in (11, 12)]
    segmenter = Segmenter(backbone, *head, settings) if head else Segmenter(backbone, settings=settings)
    return [p.terms for p in segmenter.predict_images(images, "cat OR blue sky")]


@pytest.mark.parametrize("kind", ["head", "zero-shot"])
def test_an_adapter_with_pooled_conditioning_runs_through_the_segmenter(kind, tiny_sd, tiny_head):
    head, settings = (tiny_head, HEAD) if kind == "head" else (None, ZERO_SHOT)
    toy = PooledBackbone(tiny_sd, weight=0.0)
    assert is_backbone(toy)
    reference, silent = _maps(tiny_sd, head, settings), _maps(toy, head, settings)
    assert toy.calls == (1 if kind == "head" else 2)  # one batched call per draw, through the toy
    for expected, got in zip(reference, silent):  # a pooled vector of weight 0: our SD v1's maps exactly
        assert all(torch.equal(expected[term], got[term]) for term in expected)
    heard = _maps(PooledBackbone(tiny_sd, weight=0.5), head, settings)
    assert any(not torch.equal(a[term], b[term]) for a, b in zip(reference, heard) for term in a)


def test_conditioning_rows_follow_repeat_cat_and_to():
    c = Conditioning(torch.arange(12.0).view(3, 2, 2), torch.arange(6.0).view(3, 2), {"size": torch.arange(3)[:, None]})
    assert len(c) == 3
    twice = Conditioning.cat([c, c.repeat(2)]).repeat(2)
    assert len(twice) == 18 and twice.extra["size"].flatten().tolist() == [0, 1, 2] * 6
    assert torch.equal(twice.pooled, c.pooled.repeat(6, 1))
    half = c.to(dtype=torch.float16)
    assert half.context.dtype == half.pooled.dtype == torch.float16 and half.extra["size"].dtype == torch.long


def test_the_ldm_layout_names_each_transformer_and_its_resolution(tiny_sd):
    layout = tiny_sd.layout
    assert len(layout.sites) == 16 and layout.tapped == LDZNET_BLOCKS
    tapped = {n: (layout.sites[n - 1].name, layout.sites[n - 1].downscale) for n in LDZNET_BLOCKS}
    assert tapped == {6: ("input_blocks.8.1", 4), 7: ("middle_block.1", 8), 8: ("output_blocks.3.1", 4),
                      9: ("output_blocks.4.1", 4), 10: ("output_blocks.5.1", 4)}
    assert [s.downscale for s in layout.sites[:2]] + [layout.sites[-1].downscale] == [1, 1, 1]
    assert layout.sites[0].cross_attention is tiny_sd.unet.input_blocks[1][1].transformer_blocks[0].attn2
    with pytest.raises(TypeError, match="Linear is not an ldm-layout UNet"):
        ldm_layout(torch.nn.Linear(2, 2))


class _ModuleMembers:
    """Members found only by a dynamic lookup, as a torch module's submodules are (``nn.Module.__getattr__``)."""

    def __init__(self, absent: str = ""):
        self.absent = absent

    def __getattr__(self, name: str):
        if name in ("device", "downsample_factor", "dtype", "encode_image", "encode_text", "layout",
                    "predict_noise", "schedule", "unet") and name != self.absent:
            return None
        raise AttributeError(name)


def test_a_backbone_is_told_by_its_members_as_the_model_provides_them():
    """From Python 3.12 on, a runtime-checkable protocol's isinstance looks members up statically and
    misses a torch module's submodules: every model (its ``unet`` is a submodule) was refused there."""
    assert is_backbone(_ModuleMembers())
    assert not is_backbone(_ModuleMembers(absent="unet")) and not is_backbone(object())
    with pytest.raises(TypeError):  # the protocol is not runtime-checkable: the static check cannot come back
        isinstance(_ModuleMembers(), Backbone)
