"""Zero-shot maps on the tiny random SD model: the agreement score equals its formula, images in
one batch keep their own statistics, the cross-attention recorder's block choice, and settings
validation. (The paper's eps-difference score is checked in test_segmenter.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures_models import random_image

from ldznet_ext.images import to_model_input
from ldznet_ext.refine import RefineSettings
from ldznet_ext.sd.schedule import noise_draws
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.zeroshot import CrossAttentionRecorder, ZeroShotSettings, term_token_spans, zero_shot_maps

pytestmark = pytest.mark.usefixtures("single_thread")


def test_agreement_equals_the_formula(tiny_models64):
    """Per pixel, sum over draws of <eps(z_t, t, "") - eps(z_t, t, text), z - mean(z)> over the
    latent channels, min-max normalised at z resolution, resized bilinearly to the image; written
    here without the module's code."""
    tiny_sd = tiny_models64[0]
    seed, draws, height, width = 7, 2, 70, 50
    image = random_image(height, width, seed=8)
    settings = SegmenterSettings(resolution=64, seed=seed, zero_shot=ZeroShotSettings(timestep=250, draws=draws),
                                 refine=RefineSettings(enabled=False))
    segmenter = Segmenter(tiny_sd, settings=settings)
    segmenter.set_image(image)
    maps = segmenter.predict_terms(["cat", "blue sky"])

    # 64^2 area for 50x70: scale 64/sqrt(3500) = 1.082 -> 54.1 x 75.7 -> multiples of 64: 64 x 64.
    z = tiny_sd.encode_image(to_model_input(image, (64, 64)).double())
    assert z.shape == (1, 4, 8, 8)
    centred = z[0] - z[0].mean((1, 2), keepdim=True)
    terms = ["cat", "blue sky"]
    # One UNet call per draw with the terms and "" (as the module batches them): this tiny random
    # UNet's text effect is so small that float32 attention rounding across batch shapes would show.
    contexts = torch.cat([tiny_sd.encode_text(terms).context, tiny_sd.encode_text([""]).context])
    a = tiny_sd.schedule.alphas_cumprod[250].float()
    totals = torch.zeros(2, 8, 8, dtype=torch.float64)
    for _, noise in noise_draws(seed, draws, (1, 4, 8, 8), 250):
        z_t = (a.sqrt() * z.float() + (1 - a).sqrt() * noise).double()  # the schedule computes in fp32
        eps = tiny_sd.unet(z_t.expand(3, -1, -1, -1), torch.tensor([250] * 3), contexts)
        totals += ((eps[2:] - eps[:2]) * centred).sum(1)
    for term, total in zip(terms, totals):
        normalised = (total - total.min()) / (total.max() - total.min())
        expected = F.interpolate(normalised[None, None], size=(height, width), mode="bilinear",
                                 align_corners=False)[0, 0].clamp(0, 1)
        assert maps[term].shape == (height, width)
        assert (maps[term] - expected.float()).abs().max() <= 1e-5
    assert (maps["cat"] - maps["blue sky"]).abs().max() > 1e-3


def test_images_in_one_batch_equal_each_alone(tiny_models64):
    """Each image is centred on its own mean latent: batching two must not mix their statistics."""
    tiny_sd = tiny_models64[0]
    g = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0.0, 2.0], dtype=torch.float64)[:, None, None, None]  # different image means
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) + offsets
    terms = ["cat", "dog"]
    context = tiny_sd.encode_text(terms)
    settings = ZeroShotSettings(draws=2)
    together = zero_shot_maps(tiny_sd, z, terms, context, settings, seed=1)
    assert together.shape == (2, 2, 8, 8)
    for i in range(2):
        alone = zero_shot_maps(tiny_sd, z[i:i + 1], terms, context, settings, seed=1)
        assert (together[i] - alone[0]).abs().max() <= 1e-5
    assert together.amin((-2, -1)).max() == 0 and together.amax((-2, -1)).min() == 1


def test_scores_differ_and_cross_attention_blends(tiny_models64):
    tiny_sd = tiny_models64[0]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    terms = ["red cat"]
    context = tiny_sd.encode_text(terms)
    maps = {name: zero_shot_maps(tiny_sd, z, terms, context, settings) for name, settings in {
        "agreement": ZeroShotSettings(draws=1),
        "difference": ZeroShotSettings(draws=1, score="difference"),
        "attention": ZeroShotSettings(draws=1, cross_attention=1.0, attention_blocks=(2,)),
        "half": ZeroShotSettings(draws=1, cross_attention=0.5, attention_blocks=(2,)),
    }.items()}
    assert (maps["agreement"] - maps["difference"]).abs().max() > 1e-2
    assert (maps["attention"] - maps["agreement"]).abs().max() > 1e-2
    assert (maps["half"] - (maps["agreement"] + maps["attention"]) / 2).abs().max() <= 1e-6


def test_recorder_blocks_and_token_mass(tiny_sd):
    """One chosen block records one map, equal to that block's map when all are recorded; the mass
    over all 77 tokens is 1 (a softmax), over the content span of "red cat" strictly between."""
    z_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([400, 400])
    context = tiny_sd.encode_text(["red cat", "red cat"])
    assert term_token_spans(["red cat", ""]) == [(1, 3), (1, 1)]
    spans = [term_token_spans(["red cat"])[0], (0, 77)]
    with CrossAttentionRecorder(tiny_sd.layout, spans) as every:
        tiny_sd.predict_noise(z_t, t, context)
    with CrossAttentionRecorder(tiny_sd.layout, spans, blocks=[3]) as third:
        tiny_sd.predict_noise(z_t, t, context)
    assert len(every.maps) == len(every.sites) > 3 and len(third.maps) == 1
    assert torch.equal(third.maps[0], every.maps[2])
    for block_map in every.maps:
        assert (block_map[1] - 1).abs().max() <= 1e-5
        assert 0 < block_map[0].min() and block_map[0].max() < 1
    assert not third._handles  # hooks removed on exit


def test_bad_settings_and_blocks(tiny_sd):
    with pytest.raises(ValueError, match="score must be one of agreement, difference, got 'norm'"):
        ZeroShotSettings(score="norm")
    with pytest.raises(ValueError, match=r"attention_blocks must be None or block numbers >= 1, got \(0,\)"):
        ZeroShotSettings(attention_blocks=(0,))
    with pytest.raises(ValueError, match=r"draws must be an integer in \[1, 64\], got 0"):
        ZeroShotSettings(draws=0)
    count = len(CrossAttentionRecorder(tiny_sd.layout, []).sites)
    message = rf"attention blocks \[{count + 1}\] do not exist: this UNet has spatial-transformer blocks 1-{count}"
    with pytest.raises(ValueError, match=message):
        CrossAttentionRecorder(tiny_sd.layout, [], blocks=[1, count + 1])
