"""Zero-shot maps on the tiny random SD model: the agreement score equals its formula, images in
one batch keep their own statistics, the cross-attention recorder's block choice, and settings
validation. (The paper's eps-difference score is checked in test_segmenter.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures_models import random_image

from ldznet_ext.errors import LdznetError
from ldznet_ext.images import to_model_input
from ldznet_ext.refine import RefineSettings
from ldznet_ext.sd.schedule import noise_draws
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.zeroshot import (
    CrossAttentionRecorder,
    ZeroShotSettings,
    blocks_at,
    head_mean_attention,
    normalize_maps,
    propagate,
    term_token_spans,
    zero_shot_maps,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_agreement_equals_the_formula(tiny_models64):
    """Per pixel, sum over draws of <eps(z_t, t, "") - eps(z_t, t, text), z - mean(z)> over the
    latent channels, min-max normalised at z resolution, resized bilinearly to the image; written
    here without the module's code."""
    tiny_sd = tiny_models64[0]
    seed, draws, height, width = 7, 2, 70, 50
    image = random_image(height, width, seed=8)
    settings = SegmenterSettings(resolution=64, seed=seed,
                                 zero_shot=ZeroShotSettings(timestep=250, draws=draws, score="agreement"),
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
    """Each image is centred on its own mean latent (agreement) and keeps its own self-attention
    (attention): batching two must not mix them."""
    tiny_sd = tiny_models64[0]
    g = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0.0, 2.0], dtype=torch.float64)[:, None, None, None]  # different image means
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) + offsets
    terms = ["cat", "dog"]
    context = tiny_sd.encode_text(terms)
    for settings in (ZeroShotSettings(draws=2, score="agreement"), ZeroShotSettings(propagation_steps=2)):
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
        "agreement": ZeroShotSettings(draws=1, score="agreement"),
        "difference": ZeroShotSettings(draws=1, score="difference"),
        "attention": ZeroShotSettings(draws=1, score="agreement", cross_attention=1.0, attention_blocks=(2,)),
        "half": ZeroShotSettings(draws=1, score="agreement", cross_attention=0.5, attention_blocks=(2,)),
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


@pytest.mark.parametrize("kwargs, message", [
    ({"score": "norm"}, "score must be one of attention, agreement, difference, got 'norm'"),
    ({"score": ["attention"]}, "score must be one of attention, agreement, difference, got ['attention']"),
    ({"cross_attention": "0.5"}, "cross_attention must be a number in [0, 1], got '0.5'"),
    ({"cross_attention": True}, "cross_attention must be a number in [0, 1], got True"),
    ({"cross_attention": 1.5}, "cross_attention must be a number in [0, 1], got 1.5"),
    ({"attention_blocks": (0,)}, "attention block must be an integer in [1, 64], got 0"),
    ({"attention_blocks": ()}, "attention_blocks must be None or a tuple of block numbers, got ()"),
    ({"attention_blocks": 3}, "attention_blocks must be None or a tuple of block numbers, got 3"),
    ({"attention_blocks": ("1",)}, "attention block must be an integer in [1, 64], got '1'"),
    ({"draws": 0}, "draws must be an integer in [1, 64], got 0"),
    ({"propagation_steps": -1}, "propagation_steps must be an integer in [0, 64], got -1"),
    ({"sharpen": 0.5}, "sharpen must be a number in [1, 64], got 0.5"),
    ({"attention_scales": ((0, 1.0),)}, "attention scale downscale must be an integer in [1, 64], got 0"),
    ({"attention_scales": ((2, 0.0),)},
     "attention_scales must hold (downscale, weight) pairs with a positive weight, got ((2, 0.0),)"),
    ({"attention_scales": (2, 1.0)},
     "attention_scales must hold (downscale, weight) pairs with a positive weight, got (2, 1.0)"),
    ({"attention_scales": ((2, "1"),)}, "attention scale weight must be a number in [0, 1000], got '1'"),
])
def test_bad_settings_are_one_ldznet_error(kwargs, message):
    """A TypeError or a plain ValueError escaped a front end that catches LdznetError, as every other
    settings object raises."""
    with pytest.raises(LdznetError) as error:
        ZeroShotSettings(**kwargs)
    assert str(error.value) == message


def test_lists_are_taken_as_tuples():
    settings = ZeroShotSettings(attention_blocks=[3, 1], attention_scales=[[2, 0.5], (1, 1.0)])
    assert (settings.attention_blocks, settings.attention_scales) == ((3, 1), ((2, 0.5), (1, 1.0)))
    assert settings == ZeroShotSettings(attention_blocks=(3, 1), attention_scales=((2, 0.5), (1, 1.0)))


def test_bad_blocks(tiny_sd):
    count = len(CrossAttentionRecorder(tiny_sd.layout, []).sites)
    message = rf"attention blocks \[{count + 1}\] do not exist: this UNet has spatial-transformer blocks 1-{count}"
    with pytest.raises(LdznetError, match=message):
        CrossAttentionRecorder(tiny_sd.layout, [], blocks=[1, count + 1])
    with pytest.raises(LdznetError, match=r"no spatial transformer at attention scales \[16\]"):
        zero_shot_maps(tiny_sd, torch.zeros(1, 4, 8, 8), ["cat"], tiny_sd.encode_text(["cat"]),
                       ZeroShotSettings(score="attention", draws=1, attention_scales=((16, 1.0),)))


def test_head_mean_attention_is_the_mean_of_each_heads_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 5, 4, generator=g), torch.randn(3, 7, 4, generator=g)
    expected = sum(torch.exp(q[h] @ k[h].T / 2) / torch.exp(q[h] @ k[h].T / 2).sum(-1, keepdim=True)
                   for h in range(3)) / 3
    assert (head_mean_attention(q, k) - expected).abs().max() <= 1e-6


def test_normalize_maps_spans_each_map_and_makes_a_constant_one_zero():
    """Without a floor on the spread a constant map divided 0 by 0: NaN, not the documented 0."""
    maps = torch.stack([torch.ones(2, 2), torch.tensor([[1.0, 3.0], [2.0, 5.0]])])
    assert normalize_maps(maps).tolist() == [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.5], [0.25, 1.0]]]


def test_propagate_is_a_power_of_the_affinity():
    """A^k @ c per map; sharpen p: A's entries to the power p, rows renormalised, then the same."""
    g = torch.Generator().manual_seed(1)
    affinity = torch.softmax(torch.randn(2, 6, 6, generator=g, dtype=torch.float64), -1)
    cross = torch.rand(2, 3, 6, generator=g, dtype=torch.float64)
    assert torch.equal(propagate(cross, affinity, 0), cross)
    for i in range(2):
        expected = torch.linalg.matrix_power(affinity[i], 3) @ cross[i].T
        assert (propagate(cross, affinity, 3)[i] - expected.T).abs().max() <= 1e-12
        sharp = affinity[i] ** 4 / (affinity[i] ** 4).sum(-1, keepdim=True)
        expected = torch.linalg.matrix_power(sharp, 2) @ cross[i].T
        assert (propagate(cross, affinity, 2, sharpen=4.0)[i] - expected.T).abs().max() <= 1e-12


def test_blocks_by_resolution(tiny_sd):
    """The tiny UNet has SD v1's topology: latent/1 blocks 1, 2, 14-16; latent/8 the middle block."""
    layout = tiny_sd.layout
    assert blocks_at(layout, (1,)) == (1, 2, 14, 15, 16)
    assert blocks_at(layout, (4, 2)) == (3, 4, 5, 6, 8, 9, 10, 11, 12, 13)
    assert blocks_at(layout, (8,)) == (7,) and blocks_at(layout, (16,)) == ()


def test_capture_equals_the_explicit_attention_of_the_unet(tiny_sd):
    """The recorded self-attention (mean over heads, blocks and an image's rows) and cross-attention
    mass equal softmax(q k^T / sqrt(d)) computed here from the modules' inputs with all heads at once."""
    z_t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([300] * 4)
    terms = ["red cat", "sky"]
    context = tiny_sd.encode_text(terms * 2)
    explicit: dict = {}

    def record(name):
        def hook(module, args, kwargs, output):
            x = args[0]
            source = kwargs.get("context", args[1] if len(args) > 1 else None)
            source = x if source is None else source
            b, h = x.shape[0], module.heads
            q = module.to_q(x).view(b, x.shape[1], h, -1).transpose(1, 2)
            k = module.to_k(source).view(b, source.shape[1], h, -1).transpose(1, 2)
            explicit.setdefault(name, []).append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1))
        return hook

    sites = [tiny_sd.layout.sites[b - 1] for b in (1, 14)]
    handles = [module.register_forward_hook(record(name), with_kwargs=True) for site in sites
               for name, module in (("self", site.self_attention), ("cross", site.cross_attention))]
    try:
        with CrossAttentionRecorder(tiny_sd.layout, term_token_spans(terms) * 2, blocks=(1, 14),
                                    self_attention_blocks=(1, 14), rows_per_image=2) as recorder:
            tiny_sd.predict_noise(z_t, t, context)
    finally:
        for handle in handles:
            handle.remove()
    self_attention = torch.stack(explicit["self"]).mean((0, 2))  # blocks, heads -> [4, 64, 64]
    expected = self_attention.view(2, 2, 64, 64).mean(1)  # an image's two rows
    assert recorder.affinity.shape == (2, 64, 64) and recorder.affinity_size == (8, 8)
    assert (recorder.affinity - expected).abs().max() <= 1e-6
    assert (recorder.affinity.sum(-1) - 1).abs().max() <= 1e-5
    for block_map, probs in zip(recorder.maps, explicit["cross"]):
        mass = probs.mean(1)
        expected = torch.stack([mass[0, :, 1:3].sum(-1), mass[1, :, 1:2].sum(-1),
                                mass[2, :, 1:3].sum(-1), mass[3, :, 1:2].sum(-1)]).view(4, 8, 8)
        assert (block_map - expected).abs().max() <= 1e-6


def test_attention_score_is_one_call_per_draw_without_the_empty_prompt(tiny_sd, monkeypatch):
    """N images x T terms rows per call, ``draws`` calls, no unconditional row; maps in [0, 1]."""
    calls = []
    predict = tiny_sd.predict_noise
    monkeypatch.setattr(tiny_sd, "predict_noise", lambda z_t, t, c: calls.append(len(c)) or predict(z_t, t, c))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    terms = ["red cat", "sky", "grass"]
    settings = ZeroShotSettings(score="attention", draws=2, timestep=100, propagation_steps=2, sharpen=2.0)
    maps = zero_shot_maps(tiny_sd, z, terms, tiny_sd.encode_text(terms), settings)
    assert calls == [6, 6] and maps.shape == (2, 3, 8, 8)
    assert maps.amin((-2, -1)).max() == 0 and maps.amax((-2, -1)).min() == 1
