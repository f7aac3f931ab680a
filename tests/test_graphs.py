"""Captured-graph decisions (``graphs.py``) on the CPU, with a fake capture that behaves as a CUDA
graph does: it records static input and output buffers, and a replay recomputes the outputs from
whatever the static inputs hold. So a run through the cache equals an eager run only if every input
is copied in, the outputs are copied out, and every call is keyed by all it bakes in."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from fixtures_models import random_image
from torch import nn

from ldznet_ext import graphs
from ldznet_ext.backbones.base import Conditioning
from ldznet_ext.graphs import RECAPTURE_LIMIT, CapturedCall, GraphCache, graph_cache, inspect_modules
from ldznet_ext.modeling.build import build_head, head_config
from ldznet_ext.sd.schedule import NoiseSchedule
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.zeroshot import ZeroShotSettings

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = SegmenterSettings(resolution=64)
TERMS = (["red cat"], ["dog"], ["a tree", "sky"], ["sky", "dog"])


class FakeCapture:
    """A capture on the CPU with a CUDA graph's semantics; ``captured`` counts its captures. ``offset``
    makes replays disagree with the eager call; ``error`` makes capturing fail."""

    def __init__(self, offset: float = 0.0, error: Exception | None = None):
        self.captured = 0
        self.offset = offset
        self.error = error

    def __call__(self, call, inputs) -> CapturedCall:
        if self.error is not None:
            raise self.error
        self.captured += 1
        static = tuple(x.clone() for x in inputs)
        outputs = tuple(call(*static))

        def replay() -> None:
            for buffer, value in zip(outputs, call(*static)):
                buffer.copy_(value + self.offset if value.is_floating_point() else value)

        return CapturedCall(static, outputs, replay, memory_bytes=1000)


def fake_cache(capture: FakeCapture, limit: int = 8) -> GraphCache:
    return GraphCache(capture, device_type="cpu", limit=limit)


def masks(segmenter: Segmenter, image, term_lists=TERMS) -> list[dict[str, torch.Tensor]]:
    """Each term list's maps on ``image``, each list on a fresh set_image (so nothing comes from the term cache)."""
    results = []
    for terms in term_lists:
        segmenter.set_image(image)
        results.append(segmenter.predict_terms(terms))
    return results


def assert_same(got: list[dict], expected: list[dict]) -> None:
    for mine, theirs in zip(got, expected, strict=True):
        assert list(mine) == list(theirs)
        for term in mine:
            assert torch.equal(mine[term], theirs[term]), term


@pytest.mark.parametrize("mode", ["head", "zero-shot", "zero-shot attention"])
def test_replayed_masks_equal_eager_masks(mode, tiny_sd, tiny_head):
    settings = {"head": SETTINGS, "zero-shot": SegmenterSettings(resolution=64, zero_shot=ZeroShotSettings(draws=2)),
                "zero-shot attention": SegmenterSettings(resolution=64, zero_shot=ZeroShotSettings(
                    score="attention", propagation_steps=2, draws=2))}[mode]
    head, config = tiny_head if mode == "head" else (None, None)
    capture = FakeCapture()
    graphed = Segmenter(tiny_sd, head, config, settings, graphs=fake_cache(capture))
    eager = graphed.with_settings(cuda_graphs=False)
    image = random_image(64, 64, seed=5)
    assert_same(masks(graphed, image), masks(eager, image))
    # encode + one call per term count (1, 2), and zero-shot per term list's token spans (they are
    # baked into its attention recorder); later images replayed, not captured again
    captures = 3 if mode == "head" else 5
    assert capture.captured == captures and len(graphed.graphs) == captures
    assert_same(masks(graphed, random_image(64, 64, seed=6)), masks(eager, random_image(64, 64, seed=6)))
    assert capture.captured == captures


def test_graphs_off_never_captures(tiny_sd, tiny_head):
    capture = FakeCapture()
    segmenter = Segmenter(tiny_sd, *tiny_head, SegmenterSettings(resolution=64, cuda_graphs=False),
                          graphs=fake_cache(capture))
    masks(segmenter, random_image(64, 64))
    assert capture.captured == 0 and len(segmenter.graphs) == 0


def test_with_settings_and_new_segmenters_share_the_unets_cache(tiny_sd, tiny_head):
    segmenter = Segmenter(tiny_sd, *tiny_head, SETTINGS)
    assert segmenter.graphs is graph_cache(tiny_sd.unet)
    assert segmenter.with_settings(seed=3).graphs is segmenter.graphs
    assert Segmenter(tiny_sd, settings=SETTINGS).graphs is segmenter.graphs


def test_least_recently_used_call_is_dropped_beyond_the_limit(tiny_sd, tiny_head):
    capture = FakeCapture()
    segmenter = Segmenter(tiny_sd, *tiny_head, SETTINGS, graphs=fake_cache(capture, limit=2))
    image = random_image(64, 64)
    for terms, captured in ((["a"], 2), (["b", "c"], 3), (["d"], 4), (["e", "f"], 5), (["g", "h"], 5)):
        masks(segmenter, image, [terms])  # encode replayed (used last), the other term count dropped
        assert capture.captured == captured
        assert len(segmenter.graphs) == 2 and segmenter.graphs.memory_bytes == 2000


def test_moved_weights_are_captured_again_then_given_up(tiny_sd, tiny_head, caplog):
    head = copy.deepcopy(tiny_head[0])
    capture = FakeCapture()
    graphed = Segmenter(tiny_sd, head, tiny_head[1], SETTINGS, graphs=fake_cache(capture))
    eager = graphed.with_settings(cuda_graphs=False)
    image = random_image(64, 64)
    masks(graphed, image, [["cat"]])
    assert capture.captured == 2
    for move in range(1, RECAPTURE_LIMIT + 1):
        layer = head.final[-1]
        with torch.no_grad():  # new storage (a reload, a host's patch): and a new value the replay must see
            layer.weight = nn.Parameter(layer.weight * 1.01)
        assert_same(masks(graphed, image, [["cat"]]), masks(eager, image, [["cat"]]))
        if move < RECAPTURE_LIMIT:  # the head's call re-keyed, the stale one dropped
            assert capture.captured == 2 + move and len(graphed.graphs) == 2
    assert "weights moved" in graphed.graphs.disabled["head"]
    assert "encode" not in graphed.graphs.disabled
    assert any("CUDA graphs off for head" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_weights_changed_in_place_are_read_by_the_replay(tiny_sd, tiny_head):
    head = copy.deepcopy(tiny_head[0])
    capture = FakeCapture()
    graphed = Segmenter(tiny_sd, head, tiny_head[1], SETTINGS, graphs=fake_cache(capture))
    image = random_image(64, 64)
    before = masks(graphed, image, [["cat"]])
    with torch.no_grad():
        head.final[-1].bias.add_(1.0)  # A1111's LoRA: weights patched in place
    after = masks(graphed, image, [["cat"]])
    assert capture.captured == 2
    assert not torch.equal(before[0]["cat"], after[0]["cat"])
    assert_same(after, masks(graphed.with_settings(cuda_graphs=False), image, [["cat"]]))


@pytest.mark.parametrize("failure", ["error", "disagreement"])
def test_a_failed_capture_falls_back_once_with_a_log_line(failure, tiny_sd, tiny_head, caplog):
    capture = FakeCapture(error=RuntimeError("operation not permitted when stream is capturing\nmore")) \
        if failure == "error" else FakeCapture(offset=0.5)
    graphed = Segmenter(tiny_sd, *tiny_head, SETTINGS, graphs=fake_cache(capture))
    image = random_image(64, 64)
    with caplog.at_level(logging.INFO, logger="ldznet_ext.graphs"):
        got = masks(graphed, image)
    assert_same(got, masks(graphed.with_settings(cuda_graphs=False), image))
    reason = ("capture failed: RuntimeError: operation not permitted when stream is capturing"
              if failure == "error" else "its captured graph disagreed with the eager call")
    assert graphed.graphs.disabled == {"encode": reason, "head": reason}
    assert len(graphed.graphs) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"ldznet: CUDA graphs off for {p}, running eagerly: {reason}" for p in ("encode", "head")]
    assert capture.captured == (0 if failure == "error" else 2)


def test_only_reasons_a_user_can_act_on_are_logged_once(caplog):
    x = torch.ones(2)
    with caplog.at_level(logging.INFO, logger="ldznet_ext.graphs"):
        for _ in range(2):
            assert GraphCache().run("head", lambda t: (t + 1,), [x], None)[0].tolist() == [2.0, 2.0]
        assert caplog.records == []  # on the CPU graphs do not exist: nothing to tell
        for cache in (fake_cache(FakeCapture()), fake_cache(FakeCapture())):  # each cache tells it once
            for _ in range(3):
                cache.run("head", lambda t: (t + 1,), [x], None)
    assert [r.getMessage() for r in caplog.records] == [
        "ldznet: CUDA graphs not used for head: the backbone's calls run host code a replay would skip"] * 2


class HookedBackbone:
    """The tiny SD model seen through a host adapter without ``capture_modules``."""

    def __init__(self, sd):
        self.sd = sd

    def __getattr__(self, name):
        if name == "capture_modules":
            raise AttributeError(name)
        return getattr(self.sd, name)


def test_calls_that_must_run_eagerly(tiny_sd, tiny_head):
    cache = fake_cache(FakeCapture())
    x = torch.zeros(1, 4, 8, 8)
    head = tiny_head[0]
    assert cache.inspect([x], (tiny_sd.unet, head)) == (None, inspect_modules((tiny_sd.unet, head))[0])
    assert cache.inspect([x.to("meta")], (head,)) == ("not on cpu", ())
    assert GraphCache().inspect([x], (head,)) == ("not on cuda", ())
    assert cache.inspect([x], None) == ("the backbone's calls run host code a replay would skip", ())
    hooked = ("the models have forward hooks (another extension, or --medvram/--lowvram offloading)", ())
    handle = tiny_sd.unet.input_blocks[1].register_forward_pre_hook(lambda module, args: None)
    try:
        assert cache.inspect([x], (tiny_sd.unet, head)) == hooked
    finally:
        handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        assert cache.inspect([x], (head,)) == hooked
    finally:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache.inspect([x], (head,)) == (
            "called inside an autocast region (its cached casts would outlive a capture)", ())


def test_a_backbone_without_capture_modules_runs_eagerly(tiny_sd, tiny_head):
    capture = FakeCapture()
    segmenter = Segmenter(HookedBackbone(tiny_sd), *tiny_head, SETTINGS, graphs=fake_cache(capture))
    got = masks(segmenter, random_image(64, 64))
    assert capture.captured == 0
    assert_same(got, masks(Segmenter(tiny_sd, *tiny_head, SETTINGS).with_settings(cuda_graphs=False),
                           random_image(64, 64)))


def test_clearing_every_cache_frees_the_captured_calls(tiny_sd, tiny_head):
    capture = FakeCapture()
    segmenter = Segmenter(tiny_sd, *tiny_head, SETTINGS, graphs=fake_cache(capture))
    monkey_caches = {tiny_sd.unet: segmenter.graphs}
    masks(segmenter, random_image(64, 64), [["cat"]])
    assert len(segmenter.graphs) == 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graphs, "_CACHES", monkey_caches)
        graphs.clear_graph_caches()
    assert len(segmenter.graphs) == 0 and segmenter.graphs.memory_bytes == 0


def test_fingerprint_follows_storage_and_dtype_not_values():
    layer = nn.Linear(3, 3)
    before = inspect_modules([layer])[0]
    assert before == (layer.weight.data_ptr(), layer.bias.data_ptr(), (torch.device("cpu"), torch.float32))
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: same storage
    assert inspect_modules([layer])[0] == before
    layer.double()
    assert inspect_modules([layer])[0][-1] == (torch.device("cpu"), torch.float64)
    layer.weight = nn.Parameter(layer.weight.clone())
    assert inspect_modules([layer])[0][0] == layer.weight.data_ptr() != before[0]


def test_cache_limit_must_hold_a_call():
    with pytest.raises(ValueError, match="at least one call"):
        GraphCache(limit=0)


def test_conditioning_tensors_round_trip():
    conditioning = Conditioning(torch.ones(2, 3, 4), torch.zeros(2, 5), {"size": torch.full((2, 6), 7.0)})
    tensors = conditioning.tensors()
    assert [t.shape for t in tensors] == [(2, 3, 4), (2, 5), (2, 6)]
    rebuilt = conditioning.with_tensors([t + 1 for t in tensors])
    assert torch.equal(rebuilt.context, conditioning.context + 1) and torch.equal(rebuilt.pooled, torch.ones(2, 5))
    assert list(rebuilt.extra) == ["size"] and torch.equal(rebuilt.extra["size"], torch.full((2, 6), 8.0))
    plain = Conditioning(torch.ones(1, 2, 3))
    assert plain.with_tensors(plain.tensors()).pooled is None and plain.with_tensors(plain.tensors()).extra == {}


def test_alphas_are_looked_up_on_the_timesteps_device_as_the_table_says():
    schedule = NoiseSchedule()
    t = torch.tensor([0, 400, 999])
    assert torch.equal(schedule.alphas_at(t), schedule.alphas_cumprod[t].float())
    assert schedule.alphas_at(t).device == t.device


def test_heads_without_sd_features_are_replayed_too(tiny_sd):
    config = head_config("znet", "tiny", latent_size=8)
    torch.manual_seed(0)
    head = build_head(config).eval()
    capture = FakeCapture()
    graphed = Segmenter(tiny_sd, head, config, SETTINGS, graphs=fake_cache(capture))
    image = random_image(64, 64)
    assert_same(masks(graphed, image), masks(graphed.with_settings(cuda_graphs=False), image))
    assert capture.captured == 3


def test_autocast_is_detected_on_torch_without_a_device_argument(tiny_head):
    """torch < 2.4 (A1111 v1.10 installs 2.1): is_autocast_enabled() takes no device and means CUDA."""
    cuda_only = torch.is_autocast_enabled

    def old_signature(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
        return cuda_only("cuda")

    cache = fake_cache(FakeCapture())
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with pytest.MonkeyPatch.context() as patch:  # inside: torch.autocast itself calls the new signature
                patch.setattr(torch, "is_autocast_enabled", old_signature)
                reason = cache.inspect([torch.zeros(1)], (tiny_head[0],))[0]
        assert reason == ("called inside an autocast region (its cached casts would outlive a capture)"
                          if autocast else None)


def test_switching_between_heads_keeps_both_captured(tiny_sd, tiny_head):
    """Another model is another entry, not moved weights: alternating heads never gives up on graphs."""
    other = copy.deepcopy(tiny_head[0])
    capture = FakeCapture()
    cache = fake_cache(capture)
    first = Segmenter(tiny_sd, *tiny_head, SETTINGS, graphs=cache)
    second = Segmenter(tiny_sd, other, tiny_head[1], SETTINGS, graphs=cache)
    image = random_image(64, 64)
    for _ in range(RECAPTURE_LIMIT + 1):
        for segmenter in (first, second):
            masks(segmenter, image, [["cat"]])
    assert capture.captured == 3 and cache.disabled == {}  # one encode, one head call per head


def test_clear_forgets_the_capture_counts(tiny_sd, tiny_head):
    head = copy.deepcopy(tiny_head[0])
    capture = FakeCapture()
    graphed = Segmenter(tiny_sd, head, tiny_head[1], SETTINGS, graphs=fake_cache(capture))
    image = random_image(64, 64)
    for _ in range(RECAPTURE_LIMIT):
        head.final[-1].weight = nn.Parameter(head.final[-1].weight.detach().clone())
        masks(graphed, image, [["cat"]])
    graphed.graphs.clear()  # what a host's release does: the next move starts counting afresh
    head.final[-1].weight = nn.Parameter(head.final[-1].weight.detach().clone())
    masks(graphed, image, [["cat"]])
    assert graphed.graphs.disabled == {} and len(graphed.graphs) == 2


def test_clear_gives_a_purpose_that_went_eager_another_try(tiny_sd, tiny_head):
    """A purpose disabled once (weights that moved on every call) stayed eager for the rest of a WebUI
    session, through model changes and releases."""
    head = copy.deepcopy(tiny_head[0])
    capture = FakeCapture()
    graphed = Segmenter(tiny_sd, head, tiny_head[1], SETTINGS, graphs=fake_cache(capture))
    image = random_image(64, 64)
    for _ in range(RECAPTURE_LIMIT + 1):
        head.final[-1].weight = nn.Parameter(head.final[-1].weight.detach().clone())
        masks(graphed, image, [["cat"]])
    assert "head" in graphed.graphs.disabled
    graphed.graphs.clear()
    captured = capture.captured
    masks(graphed, image, [["cat"]])
    assert graphed.graphs.disabled == {} and capture.captured == captured + 2  # the encode and the head again
