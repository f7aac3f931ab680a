"""The Segmenter on tiny random models: batching equals one-by-one, zero-shot equals its formula,
seeds, the per-image term cache, and output sizes for every kind of input image."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_models import random_image
from PIL import Image

from ldznet_ext.errors import LdznetError
from ldznet_ext.images import to_model_input, working_size
from ldznet_ext.refine import RefineSettings
from ldznet_ext.sd.schedule import noise_draws
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.zeroshot import ZeroShotSettings

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = SegmenterSettings(resolution=64)
ZERO_SHOT = SegmenterSettings(resolution=64, zero_shot=ZeroShotSettings(draws=2))


@pytest.fixture
def with_head(tiny_sd, tiny_head) -> Segmenter:
    return Segmenter(tiny_sd, *tiny_head, SETTINGS)


@pytest.mark.parametrize("kind", ["head", "zero-shot"])
def test_batched_terms_equal_terms_one_by_one(kind, tiny_models64):
    sd, head, config = tiny_models64
    make = (lambda: Segmenter(sd, head, config, SETTINGS)) if kind == "head" else (
        lambda: Segmenter(sd, settings=ZERO_SHOT))
    image = random_image(64, 64, seed=1)
    terms = ["red cat", "dog", "a tree"]
    together = make()
    together.set_image(image)
    batched = together.predict_terms(terms)
    for term in terms:
        alone = make()
        alone.set_image(image)
        single = alone.predict_terms([term])[term]
        assert single.shape == (64, 64)
        assert (batched[term] - single).abs().max() <= 1e-5
    assert (batched["red cat"] - batched["dog"]).abs().max() > 1e-4  # the terms really differ


def test_same_size_images_batched_equal_each_alone(tiny_models64):
    segmenter = Segmenter(*tiny_models64, SETTINGS)
    images = [random_image(48, 80, seed=2), random_image(48, 80, seed=3)]
    batched = segmenter.predict_images(images, "cat OR dog")
    for image, together in zip(images, batched):
        alone = Segmenter(*tiny_models64, SETTINGS)
        alone.set_image(image)
        single = alone.predict("cat OR dog")
        assert together.probability.shape == (48, 80)
        assert (together.probability - single.probability).abs().max() <= 1e-5
        for term in ("cat", "dog"):
            assert (together.terms[term] - single.terms[term]).abs().max() <= 1e-5
    assert (batched[0].probability - batched[1].probability).abs().max() > 1e-4
    assert not segmenter.is_image_set  # predict_images sets no current image


def test_zero_shot_equals_the_formula(tiny_models64):
    """Per-pixel |eps(z_t, t, text) - eps(z_t, t, "")| averaged over draws, min-max normalised at z
    resolution, resized bilinearly to the image; written here without the segmenter's code."""
    tiny_sd = tiny_models64[0]
    seed, draws, height, width = 5, 3, 60, 130
    image = random_image(height, width, seed=4)
    zero_shot = ZeroShotSettings(timestep=None, draws=draws, score="difference")
    settings = SegmenterSettings(resolution=128, seed=seed, zero_shot=zero_shot, refine=RefineSettings(enabled=False))
    segmenter = Segmenter(tiny_sd, settings=settings)
    segmenter.set_image(image)
    maps = segmenter.predict_terms(["cat", "blue sky"])

    # 128^2 area for 130x60: scale 128/sqrt(7800) = 1.449 -> 188.4 x 86.9 -> multiples of 64: 192 x 64.
    z = tiny_sd.encode_image(to_model_input(image, (192, 64)).double())
    assert z.shape == (1, 4, 8, 24)
    unconditional = tiny_sd.encode_text([""]).context
    draws_list = noise_draws(seed, draws, (1, 4, 8, 24), None)
    assert len({t for t, _ in draws_list}) > 1  # timesteps drawn from 300..499, not one fixed step
    for term in ("cat", "blue sky"):
        conditional = tiny_sd.encode_text([term]).context
        total = torch.zeros(8, 24, dtype=torch.float64)
        for t, noise in draws_list:
            a = tiny_sd.schedule.alphas_cumprod[t]
            z_t = (a.sqrt() * z + (1 - a).sqrt() * noise.double()).float().double()  # the schedule computes in fp32
            timestep = torch.tensor([t])
            eps_text = tiny_sd.unet(z_t, timestep, conditional)
            eps_empty = tiny_sd.unet(z_t, timestep, unconditional)
            total += (eps_text - eps_empty)[0].pow(2).sum(0).sqrt()
        mean = total / draws
        normalised = (mean - mean.min()) / (mean.max() - mean.min())
        expected = F.interpolate(normalised[None, None], size=(height, width), mode="bilinear",
                                 align_corners=False)[0, 0].clamp(0, 1)
        assert maps[term].shape == (height, width)
        assert (maps[term] - expected.float()).abs().max() <= 1e-5
    assert float(maps["cat"].min()) < 0.05 and float(maps["cat"].max()) > 0.95


def test_same_seed_same_output_other_seed_differs(tiny_sd, tiny_head):
    image = random_image(64, 64, seed=6)
    results = []
    for seed in (0, 0, 1):
        segmenter = Segmenter(tiny_sd, *tiny_head, SegmenterSettings(resolution=64, seed=seed))
        segmenter.set_image(image)
        results.append(segmenter.predict("cat").probability)
    assert torch.equal(results[0], results[1])
    assert (results[0] - results[2]).abs().max() > 1e-5


class _CallCounter:
    """Records the batch size of every forward call of a module."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(lambda _, args: self.batches.append(args[0].shape[0]))

    def take(self) -> list[int]:
        batches, self.batches = self.batches, []
        return batches


def test_cache_runs_the_unet_only_for_new_terms(with_head, tiny_sd):
    unet = _CallCounter(tiny_sd.unet)
    head = _CallCounter(with_head.head)
    try:
        with_head.set_image(random_image(64, 64, seed=7))
        first = with_head.predict("cat OR dog")
        assert unet.take() == [2] and head.take() == [2]  # both terms in one batch
        again = with_head.predict("dog AND NOT cat {+2}")
        assert unet.take() == [] and head.take() == []  # known terms: nothing recomputed
        assert torch.equal(again.terms["cat"], first.terms["cat"])
        with_head.predict("cat OR bird")
        assert unet.take() == [1] and head.take() == [1]  # only "bird" is new
        with_head.set_image(random_image(64, 64, seed=8))  # a new image starts a new cache
        with_head.predict("cat")
        assert unet.take() == [1]
    finally:
        unet.handle.remove()
        head.handle.remove()


@pytest.mark.parametrize("height, width", [(77, 101), (2000, 40), (40, 2000)])
def test_mask_has_the_image_size(with_head, height, width):
    with_head.set_image(random_image(height, width, seed=9))
    prediction = with_head.predict("cat OR dog")
    assert prediction.probability.shape == prediction.mask.shape == (height, width)
    assert prediction.terms["cat"].shape == (height, width)
    assert prediction.mask_image().shape == (height, width) and prediction.mask_image().dtype == np.uint8
    assert prediction.probability_image().shape == (height, width)
    assert prediction.probability_image().dtype == np.uint16


def test_exif_rotated_jpeg_gives_the_upright_size(with_head, tmp_path):
    stored = random_image(40, 64, seed=10)  # stored 64 wide, 40 high; orientation 6: shown rotated 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    with_head.set_image(path)
    from_file = with_head.predict("cat")
    assert from_file.mask.shape == (64, 40)
    decoded = np.asarray(Image.open(path).convert("RGB"))  # the stored pixels, orientation not applied
    with_head.set_image(np.rot90(decoded, k=-1).copy())
    assert torch.equal(from_file.probability, with_head.predict("cat").probability)
    # A PIL image a pipeline decoded is masked as its pixels are: it inpaints those (the mask was rotated)
    with_head.set_image(Image.open(path))
    pixels = with_head.predict("cat")
    with_head.set_image(decoded)
    assert pixels.mask.shape == (40, 64) and torch.equal(pixels.probability, with_head.predict("cat").probability)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_image_mode_equals_its_rgb_equivalent(with_head):
    rgb = random_image(64, 64, seed=11)
    grey = random_image(64, 64, seed=12, channels=1)[..., 0]
    opaque = np.zeros((64, 64), np.uint8)
    opaque[:, :32] = 255  # left half opaque, right half fully transparent (composited over grey 128)
    hidden_rgb = np.where(opaque[..., None] > 0, rgb, 128).astype(np.uint8)
    hidden_grey = np.where(opaque > 0, grey, 128).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    cases = {
        "RGBA": (Image.fromarray(np.dstack([rgb, opaque])), hidden_rgb),
        "LA": (Image.merge("LA", [Image.fromarray(grey), Image.fromarray(opaque)]), np.dstack([hidden_grey] * 3)),
        "P": (palette, np.asarray(palette.convert("RGB"))),
        "I;16": (Image.fromarray(grey.astype(np.uint16) * 257), np.dstack([grey] * 3)),
        "L": (Image.fromarray(grey), np.dstack([grey] * 3)),
    }
    assert [image.mode for image, _ in cases.values()] == list(cases)
    # Both in one batch of the same composition, so equal pixels must give bit-equal maps.
    given = with_head.predict_images([_png(image) for image, _ in cases.values()], "cat")  # as PNG files
    expected = with_head.predict_images([equivalent for _, equivalent in cases.values()], "cat")
    for mode, result, reference in zip(cases, given, expected):
        assert torch.equal(result.probability, reference.probability), mode


@pytest.mark.parametrize("width, height, resolution, expected", [
    (512, 512, 384, (384, 384)),
    (640, 480, 384, (448, 320)),    # scale 384/554.3 = 0.6928: 443.4 -> 448, 332.6 -> 320
    (1920, 1080, 512, (704, 384)),  # scale 512/1440 = 0.3556: 682.7 -> 704, 384 -> 384
    (101, 77, 64, (64, 64)),        # 73.3 x 55.9: both round to one multiple of 64
    (2000, 40, 64, (192, 64)),      # 50:1 taken as 8:1: 181.0 -> 192; 22.6 rounds to 0, raised to 64
    (40, 2000, 384, (128, 1088)),   # 1:50 taken as 1:8: 135.8 -> 128; 1086.1 -> 1088
    (1, 1, 384, (384, 384)),
])
def test_working_size_by_hand(width, height, resolution, expected):
    assert working_size(width, height, resolution) == expected


def test_predict_before_set_image_says_what_to_do(with_head):
    message = re.escape("An image must be set with .set_image(...) before mask prediction.")
    # LdznetError, as every refusal of the API: a script catching it around set_image is not surprised here
    with pytest.raises(LdznetError, match=message):
        with_head.predict("cat")
    with pytest.raises(LdznetError, match=message):
        with_head.predict_terms(["cat"])


@pytest.mark.parametrize("expression, name", [(None, "None"), (5, "int"), (["cat"], "list")])
def test_an_expression_that_is_not_text_is_one_clear_error(with_head, expression, name):
    with_head.set_image(random_image(32, 32))
    with pytest.raises(LdznetError) as error:
        with_head.predict(expression)
    assert str(error.value) == f"expected a mask expression as text, such as 'cat OR dog', got {name}"


def test_a_heads_maps_over_several_draws_are_their_mean(tiny_models64, monkeypatch):
    """draws > 1 averages the head's probabilities over the noise draws: the threshold reads a probability,
    never a sum that reaches ``draws``."""
    image, draws = random_image(64, 64, seed=4), noise_draws(7, 2, (1, 4, 8, 8), 300)
    settings = SegmenterSettings(resolution=64, draws=2, timestep=300, seed=7, refine=RefineSettings(enabled=False))

    def maps(chosen):
        monkeypatch.setattr("ldznet_ext.segmenter.noise_draws", lambda *args: chosen)
        segmenter = Segmenter(*tiny_models64, settings)
        segmenter.set_image(image)
        return segmenter.predict_terms(["cat", "dog"])

    both, first, second = maps(draws), maps(draws[:1]), maps(draws[1:])
    for term in ("cat", "dog"):
        assert torch.allclose(both[term], (first[term] + second[term]) / 2, atol=1e-6)
        assert (first[term] - second[term]).abs().max() > 1e-4  # the draws really differ
