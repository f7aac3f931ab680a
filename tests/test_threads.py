"""One UNet, several threads: the feature tap's hooks act only for the call that installed them, so
segmenters sharing a backbone give each thread exactly its single-thread answer (issue #21.11)."""

from __future__ import annotations

import threading

import torch
from fixtures_models import one_thread, random_image

from ldznet_ext.masks.expression import MAX_TERMS
from ldznet_ext.segmenter import MAX_CACHED_TERMS, Segmenter, SegmenterSettings
from ldznet_ext.tap import FeatureTap

JOBS = [(random_image(64, 64, seed=40 + i), [f"term {i}", f"thing {i}"]) for i in range(4)]


def _predict(segmenter: Segmenter, image, terms) -> dict[str, torch.Tensor]:
    segmenter.set_image(image)
    return segmenter.predict_terms(terms)


def _in_threads(work, count: int) -> list:
    """Run ``work(i)`` for i < count in as many threads, started together; their results (or errors)."""
    start = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except Exception as error:  # reported by the assertion, with the thread's error
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_threads_sharing_one_unet_get_their_single_thread_results(tiny_sd, tiny_head):
    head, config = tiny_head
    shared = Segmenter(tiny_sd, head, config, SegmenterSettings(resolution=64))
    with one_thread():
        alone = [_predict(shared.with_settings(), image, terms) for image, terms in JOBS]
        for _ in range(3):  # overlap differs from run to run; every run must be exact
            together = _in_threads(lambda i: _predict(shared.with_settings(), *JOBS[i]), len(JOBS))
            for expected, got in zip(alone, together):
                assert isinstance(got, dict), got
                assert all(torch.equal(expected[t], got[t]) for t in expected)


def test_one_segmenter_in_several_threads_predicts_each_images_batch_exactly(tiny_sd, tiny_head):
    head, config = tiny_head
    segmenter = Segmenter(tiny_sd, head, config, SegmenterSettings(resolution=64))
    with one_thread():
        alone = [segmenter.predict_images([image], " OR ".join(terms))[0].probability for image, terms in JOBS]
        together = _in_threads(
            lambda i: segmenter.predict_images([JOBS[i][0]], " OR ".join(JOBS[i][1]))[0].probability, len(JOBS))
    for expected, got in zip(alone, together):
        assert isinstance(got, torch.Tensor), got
        assert torch.equal(expected, got)


def test_hooks_ignore_calls_from_other_threads(tiny_sd):
    """A host thread running the same UNet while a tap is installed is neither recorded nor stopped."""
    unet = tiny_sd.unet
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, unet.config.context_dim, generator=g)
    t = torch.tensor([400])
    with one_thread():
        expected = unet(x, t, context)
        with FeatureTap(tiny_sd.layout, (6, 7), early_exit=True) as tap:
            other = _in_threads(lambda i: unet(x, t, context), 1)[0]
            assert tap.features == {}
            features = tap.run(lambda: unet(x, t, context))
    assert isinstance(other, torch.Tensor) and torch.equal(other, expected)
    assert sorted(features) == [6, 7]


def test_zero_shot_with_cross_attention_in_threads(tiny_sd):
    """The cross-attention recorder's hooks are per call too."""
    from ldznet_ext.zeroshot import ZeroShotSettings

    settings = SegmenterSettings(resolution=64, zero_shot=ZeroShotSettings(draws=1, cross_attention=0.5))
    shared = Segmenter(tiny_sd, settings=settings)
    with one_thread():
        alone = [_predict(shared.with_settings(), image, terms) for image, terms in JOBS]
        together = _in_threads(lambda i: _predict(shared.with_settings(), *JOBS[i]), len(JOBS))
    for expected, got in zip(alone, together):
        assert isinstance(got, dict), got
        assert all(torch.equal(expected[t], got[t]) for t in expected)


def test_a_cached_term_evicted_by_another_call_meanwhile_is_still_answered(tiny_sd, tiny_head, monkeypatch):
    """Another thread's call may evict the oldest cached terms while a call computes its new ones (here that
    call runs inside the first one's text encoding, the interleaving made certain): a term the first call had
    found cached was read back as a KeyError."""
    head, config = tiny_head
    segmenter = Segmenter(tiny_sd, head, config, SegmenterSettings(resolution=64))
    image = random_image(64, 64, seed=7)
    expected = {t: _predict(segmenter.with_settings(), image, [t])[t] for t in ("oldest", "new")}  # as computed below
    segmenter.set_image(image)
    segmenter.predict_terms(["oldest"])
    others = [f"other {i}" for i in range(MAX_CACHED_TERMS - 1)]
    for start in range(0, len(others), MAX_TERMS):  # the cache is full, "oldest" its least recently used
        segmenter.predict_terms(others[start:start + MAX_TERMS])
    encode, interleaved = tiny_sd.encode_text, []

    def encode_and_let_another_call_run(prompts):
        if not interleaved:
            interleaved.append(prompts)
            segmenter.predict_terms(["one more"])  # evicts "oldest"
        return encode(prompts)

    monkeypatch.setattr(tiny_sd, "encode_text", encode_and_let_another_call_run)
    got = segmenter.predict_terms(["oldest", "new"])
    assert interleaved and all(torch.equal(expected[t], got[t]) for t in expected)
