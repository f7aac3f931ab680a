"""What a caller of the Segmenter can rely on: returned maps are its own (never the segmenter's cache),
a failed set_image leaves no image set, and every argument is checked with one clear LdznetError."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from fixtures_models import random_image

from ldznet_ext.errors import ExpressionError, ImageError, LdznetError
from ldznet_ext.factory import ModelSettings, build_segmenter
from ldznet_ext.job import MaskJob
from ldznet_ext.masks.expression import MAX_TERMS, parse
from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.masks.tree import Modified, Modifier, Not, Or, Term
from ldznet_ext.refine import RefineSettings
from ldznet_ext.segmenter import MAX_CACHED_TERMS, Prediction, Segmenter, SegmenterSettings

pytestmark = pytest.mark.usefixtures("single_thread")

PLAIN = SegmenterSettings(resolution=64, refine=RefineSettings(enabled=False))


@pytest.fixture
def segmenter(tiny_sd, tiny_head) -> Segmenter:
    """Refinement off and a 64 x 64 image at resolution 64: the head's maps already have the image's
    size, so nothing resizes them on the way out."""
    segmenter = Segmenter(tiny_sd, *tiny_head, PLAIN)
    segmenter.set_image(random_image(64, 64, seed=1))
    return segmenter


def test_a_returned_term_map_is_not_the_cache(segmenter):
    first = segmenter.predict("cat", MaskOptions(presence=False))
    kept = first.probability.clone()
    first.terms["cat"].fill_(1.0)
    segmenter.predict_terms("cat")["cat"].mul_(0.0)
    again = segmenter.predict("cat", MaskOptions(presence=False))
    assert torch.equal(again.probability, kept)
    assert 0.0 < float(kept.mean()) < 1.0


def test_a_failed_set_image_leaves_no_image(segmenter, tmp_path):
    with pytest.raises(ImageError, match="missing.png: file not found"):
        segmenter.set_image(tmp_path / "missing.png")
    assert not segmenter.is_image_set
    with pytest.raises(LdznetError, match=re.escape("An image must be set with .set_image(...)")):
        segmenter.predict("cat")


def test_options_must_be_mask_options(segmenter):
    with pytest.raises(LdznetError) as error:
        segmenter.predict("cat", MaskJob("cat", grow=20))
    assert str(error.value) == ("options must be MaskOptions, got ldznet_ext.job.MaskJob; a MaskJob gives "
                                "job.tree() and job.mask_options()")
    with pytest.raises(LdznetError, match="^options must be MaskOptions, got dict$"):
        segmenter.predict("cat", {"threshold": 0.4})


@pytest.mark.parametrize("terms, message", [
    (None, "terms must be a string or a list of strings, got None"),
    ([], "terms must be one or more strings, got []"),
    (["cat", 5], "terms must be one or more strings, got ['cat', 5]"),
    ([["cat"]], "terms must be one or more strings, got [['cat']]"),  # was "unhashable type: 'list'"
    ("", "invalid expression tree: a term must be non-empty text with single spaces between words, got ''"),
    ("a\x00b", "control character U+0000 in the expression; remove it at position 1"),
    ([f"t{i}" for i in range(MAX_TERMS + 1)],
     f"more than {MAX_TERMS} different terms; split the expression into several masks at position 102"),
])
def test_predict_terms_holds_terms_to_the_rules_of_an_expression(segmenter, terms, message):
    with pytest.raises(LdznetError) as error:
        segmenter.predict_terms(terms)
    assert str(error.value) == message


def test_predict_terms_takes_what_an_expression_would_quote(segmenter):
    maps = segmenter.predict_terms(["rock & roll", "cat AND dog"])
    assert list(maps) == ["rock & roll", "cat AND dog"]


def test_a_tree_built_in_code_meets_the_bounds_of_text(segmenter):
    deep = Term("cat")
    for _ in range(3000):
        deep = Not(deep)
    with pytest.raises(ExpressionError, match="^expression nested too deeply: at most 64 levels"):
        segmenter.predict(deep)
    wide = Or(tuple(Term(f"t{i}") for i in range(MAX_TERMS + 1)))
    with pytest.raises(ExpressionError, match=f"^more than {MAX_TERMS} different terms"):
        segmenter.predict(wide)
    grown = Modified(Term("cat"), (Modifier("+", 2048.0), Modifier("+", 1.0)))
    with pytest.raises(ExpressionError, match="grow and shrink by at most 2048 pixels in all"):
        segmenter.predict(grown)
    repeats = Or(tuple(Term("cat") for _ in range(100_000)))  # one map, 100,000 maxima over the image
    with pytest.raises(ExpressionError, match="^expression is 699996 characters long written out; the limit is 8000"):
        segmenter.predict(repeats)
    tree = Or((Term("cat"), Not(Term("dog"))))
    assert segmenter.predict(tree).expression == tree == parse("cat OR NOT dog")


def test_text_is_held_to_the_length_a_job_allows(segmenter):
    with pytest.raises(ExpressionError, match="^expression is 2001 characters long; the limit is 2000$"):
        segmenter.predict("cat " * 500 + "a")


@pytest.mark.parametrize("changes, message", [
    ({"refine": False}, "refine must be RefineSettings, got bool"),
    ({"zero_shot": None}, "zero_shot must be ZeroShotSettings, got None"),
    ({"sample_latent": "no"}, "sample_latent must be True or False, got 'no'"),
    ({"cuda_graphs": 1}, "cuda_graphs must be True or False, got 1"),
    ({"prompt_template": "a {} {}"}, "prompt_template must be text with one '{}' where the term goes, got 'a {} {}'"),
    ({"prompt_template": "{x} {}"}, "prompt_template must be text with one '{}' where the term goes, got '{x} {}'"),
    ({"prompt_template": 5}, "prompt_template must be text with one '{}' where the term goes, got 5"),
    ({"prompt_template": "x"}, "prompt_template must be text with one '{}' where the term goes, got 'x'"),
    ({"prompt_template": "a photo of {{}}"},  # an escaped '{}' holds no term: every term was the same prompt
     "prompt_template must be text with one '{}' where the term goes, got 'a photo of {{}}'"),
    ({"prompt_template": "{0} {0}"}, "prompt_template must be text with one '{}' where the term goes, got '{0} {0}'"),
    ({"resolutoin": 128}, "unknown settings ['resolutoin']; expected some of ['resolution', 'timestep', 'draws', "
                          "'seed', 'sample_latent', 'prompt_template', 'zero_shot', 'refine', 'cuda_graphs']"),
])
def test_bad_settings_are_refused_when_made(segmenter, changes, message):
    with pytest.raises(LdznetError) as error:
        segmenter.with_settings(**changes)
    assert str(error.value) == message


def test_a_prompt_template_with_braces_escaped_is_taken(segmenter):
    for template in ("{{a}} {}", "{{}} {}", "{} {{}}"):
        assert segmenter.with_settings(prompt_template=template).settings.prompt_template == template


def test_a_predictions_images_round_to_the_nearest_level():
    half = torch.full((1, 2), 0.5)
    prediction = Prediction(parse("cat"), half, half, {})
    assert prediction.mask_image().tolist() == [[128, 128]]
    assert prediction.probability_image().tolist() == [[32768, 32768]]


def test_zero_draws_are_refused_with_a_head_too(tiny_sd, tiny_head):
    with pytest.raises(LdznetError, match=r"^draws must be an integer in \[1, 64\], got 0$"):
        build_segmenter(tiny_sd, *tiny_head, ModelSettings(draws=0))


@pytest.mark.parametrize("backbone, settings, message", [
    ("micro-sd-v1.safetensors", ModelSettings(),
     "backbone must be a loaded model (a Backbone, e.g. load_stable_diffusion's), got str"),
    (None, ModelSettings(), "backbone must be a loaded model (a Backbone, e.g. load_stable_diffusion's), got None"),
    ("tiny", {"draws": 2}, "settings must be ModelSettings, got dict"),
])
def test_build_segmenter_checks_its_arguments(tiny_sd, backbone, settings, message):
    with pytest.raises(LdznetError) as error:
        build_segmenter(tiny_sd if backbone == "tiny" else backbone, settings=settings)
    assert str(error.value) == message


def test_a_refine_flag_in_model_settings_is_refused_before_any_mask(tiny_sd):
    with pytest.raises(LdznetError, match="^refine must be RefineSettings, got bool$"):
        build_segmenter(tiny_sd, settings=ModelSettings(refine=False))



def test_decide_presence_checks_its_maps(segmenter):
    maps = segmenter.predict_terms("cat")
    assert set(segmenter.decide_presence(maps)) == {"cat"}
    for bad, found in ((torch.full((64, 64), float("nan")), "torch.float32 tensor of shape (64, 64)"),
                       (torch.zeros(3), "torch.float32 tensor of shape (3,)"),
                       (torch.zeros(64, 64, dtype=torch.int64), "torch.int64 tensor of shape (64, 64)"),
                       ([0.5], "list")):
        with pytest.raises(LdznetError) as error:
            segmenter.decide_presence({"cat": bad})
        assert str(error.value) == f"the map of 'cat' must be a finite float tensor of the image's size (64, 64), " \
                                   f"got {found}"
    with pytest.raises(LdznetError, match="^maps must be a mapping of term -> map, as predict_terms gives, got list$"):
        segmenter.decide_presence([maps["cat"]])


def test_an_empty_batch_checks_its_expression_and_options(segmenter):
    with pytest.raises(LdznetError, match="^expected a mask expression as text"):
        segmenter.predict_images([], 123)
    with pytest.raises(ExpressionError):
        segmenter.predict_images([], "sky OR (((")
    with pytest.raises(LdznetError, match="^options must be MaskOptions, got str$"):
        segmenter.predict_images([], "sky", "junk")
    assert segmenter.predict_images([], "sky") == []


def test_an_image_keeps_its_recently_used_term_maps_only(segmenter):
    """A long-lived image that saw term after term kept every map (1 MB each at 512 px)."""
    state = segmenter._image
    for round_ in range(6):
        segmenter.predict(" OR ".join(f"w{round_}x{i}" for i in range(MAX_TERMS)))
    assert len(state.cache) == MAX_CACHED_TERMS == 4 * MAX_TERMS
    assert list(state.cache)[-MAX_TERMS:] == [f"w5x{i}" for i in range(MAX_TERMS)]  # the newest stay
    segmenter.predict("w2x0")  # a cached term used again is not the next to go
    segmenter.predict(" OR ".join(f"new{i}" for i in range(MAX_TERMS)))
    assert "w2x0" in state.cache and "w2x1" not in state.cache


def test_one_segmenter_shared_by_threads_gives_masks_of_one_image_or_says_no_image_is_set(tiny_sd, tiny_head):
    """Two threads predict while a third swaps the image: every call reads the current image once, so
    a mask is one image's or the call says no image is set (a KeyError or AttributeError escaped)."""
    import threading

    segmenter = Segmenter(tiny_sd, *tiny_head, PLAIN)
    images = [random_image(64, 64, seed=1), random_image(64, 64, seed=2)]
    expected = []
    for image in images:
        segmenter.set_image(image)
        expected.append(segmenter.predict("sky OR grass", MaskOptions(presence=False)).probability)
    failures, masks = [], []

    def predicting():
        for _ in range(20):
            try:
                masks.append(segmenter.predict("sky OR grass", MaskOptions(presence=False)).probability)
                segmenter.predict_terms(["sky", "water"])
            except LdznetError as error:
                if "An image must be set" not in str(error):
                    failures.append(error)
            except Exception as error:  # noqa: BLE001 - any other is the failure under test
                failures.append(error)

    def swapping():
        for k in range(20):
            segmenter.set_image(images[k % 2])

    threads = [threading.Thread(target=predicting), threading.Thread(target=predicting),
               threading.Thread(target=swapping)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert all(any(torch.equal(mask, e) for e in expected) for mask in masks)


def test_results_and_options_compare_and_store_plain_numbers(tiny_sd, tiny_head):
    """A Prediction's or an Instance's == asked its tensors for their truth (RuntimeError); a Fraction or numpy
    number passed the options' bounds and reached torch as itself (TypeError there)."""
    import copy
    from fractions import Fraction

    head, config = tiny_head
    segmenter = Segmenter(tiny_sd, head, config, SegmenterSettings(resolution=64))
    segmenter.set_image(random_image(64, 64, seed=3))
    options = MaskOptions(threshold=Fraction(1, 2), feather=np.float32(2), min_area=np.int64(0))
    assert (options.threshold, options.feather, options.min_area) == (0.5, 2.0, 0)
    assert [type(v) for v in (options.threshold, options.feather, options.min_area)] == [float, float, int]
    assert type(RefineSettings(strength=Fraction(1, 2)).strength) is float
    prediction = segmenter.predict("cat", options)
    assert prediction == prediction and prediction != copy.deepcopy(prediction)
    instances = segmenter.predict("cat", MaskOptions(threshold=0, presence=False)).instances()
    assert instances and all(i == i and i != copy.deepcopy(i) for i in instances)


def test_predict_images_takes_at_most_a_batch_of_images(tiny_sd, tiny_head):
    """All images and terms go through the model at once: a gallery in one call would end out of memory, not in
    masks; the bound is the CLI's --batch-size."""
    from ldznet_ext.limits import BATCH_SIZE

    head, config = tiny_head
    segmenter = Segmenter(tiny_sd, head, config, SegmenterSettings(resolution=64))
    image = random_image(64, 64, seed=3)
    assert len(segmenter.predict_images([image] * 2, "cat")) == 2
    with pytest.raises(LdznetError, match=rf"^predict_images takes at most {BATCH_SIZE.high} images at once, got "
                                          rf"{BATCH_SIZE.high + 1}; call it once per part of the list$"):
        segmenter.predict_images([image] * (BATCH_SIZE.high + 1), "cat")
