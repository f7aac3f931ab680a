"""tools/feature_ablation.py: object-size bins, per-bin IoU at one global threshold, and the feature replacements."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ldznet_ext.data.examples import Example
from ldznet_ext.eval.metrics import SegmentationMetrics

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("feature_ablation", ROOT / "tools" / "feature_ablation.py")
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


@pytest.mark.parametrize("phrase, area, size, expected", [
    ("red star", 0, 128, "< 100 px"), ("red star", 99, 128, "< 100 px"), ("stars", 100, 128, "100-400 px"),
    ("red star", 399, 128, "100-400 px"), ("red star", 400, 128, "400-1600 px"), ("red star", 1599, 128, "400-1600 px"),
    ("red star", 1600, 128, ">= 1600 px"), ("red star", 396, 256, "< 100 px"), ("red star", 400, 256, "100-400 px"),
    ("sky", 10, 128, "stuff"), ("sand", 5000, 256, "stuff")])
def test_size_bin_edges_stuff_and_scaling_to_128_px(phrase, area, size, expected):
    assert ablation.size_bin(phrase, area, size) == expected


def test_bin_names_in_order():
    assert ablation.bin_names() == ["< 100 px", "100-400 px", "400-1600 px", ">= 1600 px", "stuff"]


def _two_samples() -> SegmentationMetrics:
    metrics = SegmentationMetrics()
    metrics.add(torch.tensor([[0.95, 0.5, 0.25, 0.25]]), np.array([[1, 1, 0, 0]], dtype=bool), key=(0, 1))
    metrics.add(torch.tensor([[0.75, 0.31, 0.01, 0.01]]), np.array([[0, 1, 0, 0]], dtype=bool), key=(1, 0))
    return metrics


def test_per_bin_iou_at_the_best_global_threshold_or_a_given_one():
    metrics = _two_samples()
    # Best mIoU at t = 0.26: A 2 / 3, B 1 / 3 (TP / (1 + TP + FP + FN)).
    threshold, bins = ablation.per_bin_iou(metrics, ["a", "b"])
    assert threshold == pytest.approx(0.26)
    assert bins["a"] == (1, pytest.approx(2 / 3)) and bins["b"] == (1, pytest.approx(1 / 3))
    assert ablation.per_bin_iou(metrics, ["x", "x"])[1] == {"x": (2, pytest.approx(0.5))}
    # At t = 0.5: A TP 1 FN 1 -> 1 / 3; B FP 1 FN 1 -> 0.
    threshold, bins = ablation.per_bin_iou(metrics, ["a", "b"], 0.5)
    assert threshold == pytest.approx(0.5) and bins == {"a": (1, pytest.approx(1 / 3)), "b": (1, 0.0)}


def test_sample_bins_read_phrase_and_mask_area_by_key():
    class Scenes:
        description = "two scenes"

        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> Example:
            image = np.zeros((1, 4, 3), np.uint8)
            mask = np.zeros((1, 4), bool)
            return Example(str(index), image, (("sky", mask), ("red star", mask)))

    # sample (0, 1) is "red star" with 2 mask pixels; (1, 0) is "sky"
    assert ablation.sample_bins(Scenes(), _two_samples(), 128) == ["< 100 px", "stuff"]


def test_replacements_keep_scale_or_channel_means_and_drop_the_rest():
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 3, 64, 64, generator=generator) * torch.tensor([1.0, 4.0]).view(2, 1, 1, 1) + 3.0
    noise = ablation.replace_feature(feature, "noise", torch.Generator().manual_seed(1))
    assert noise.shape == feature.shape and not torch.allclose(noise, feature, atol=0.5)
    for i in range(2):
        assert noise[i].mean() == pytest.approx(feature[i].mean().item(), abs=0.05)
        assert noise[i].std() == pytest.approx(feature[i].std().item(), rel=0.02)
    assert torch.equal(noise, ablation.replace_feature(feature, "noise", torch.Generator().manual_seed(1)))
    assert torch.equal(ablation.replace_feature(feature, "zeros", generator), torch.zeros_like(feature))
    mean = ablation.replace_feature(feature, "spatial mean", generator)
    assert torch.allclose(mean.mean(dim=(2, 3)), feature.mean(dim=(2, 3)), atol=1e-5)
    assert torch.equal(mean, mean[..., :1, :1].expand_as(mean))
    with pytest.raises(ValueError, match="unknown replacement 'shuffle'"):
        ablation.replace_feature(feature, "shuffle", generator)


def test_replaced_features_reach_the_head(tiny_sd, tiny_head):
    from fixtures_models import one_thread, random_image

    from ldznet_ext.segmenter import Segmenter, SegmenterSettings

    def maps(segmenter: Segmenter) -> torch.Tensor:
        with one_thread():
            segmenter.set_image(random_image(64, 64, seed=3))
            return segmenter.predict_terms(["cat"])["cat"]

    settings = SegmenterSettings(resolution=64)
    plain = maps(Segmenter(tiny_sd, *tiny_head, settings))
    seen: list[dict] = []
    zeroed = ablation.with_replaced_features(Segmenter(tiny_sd, *tiny_head, settings), "zeros")
    tapped = zeroed.head_features
    zeroed.head_features = lambda *args: seen.append(tapped(*args)) or seen[-1]
    replaced = maps(zeroed)
    assert len(seen) == 1 and all(not f.any() for f in seen[0].values())
    assert (replaced - plain).abs().max() > 0.01
