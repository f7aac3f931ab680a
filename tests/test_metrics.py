"""CLIPSeg fixed-interval metrics and PhraseCut IoUs on hand-built predictions with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldznet_ext.eval.metrics import THRESHOLDS, SegmentationMetrics, sample_iou, simpson, threshold_counts


def test_thresholds_are_clipseg_fixed_interval():
    assert len(THRESHOLDS) == 49
    assert THRESHOLDS[0] == pytest.approx(0.02) and THRESHOLDS[24] == 0.5 and THRESHOLDS[-1] == pytest.approx(0.98)


@pytest.mark.parametrize("y, x, expected", [
    ([1, 2, 3], [0, 1, 2], 4.0),  # exact for the line 1 + x
    ([0, 1, 9], [0, 1, 3], 9.0),  # irregular spacing, exact for x^2
    ([0, 1, 4, 16], [0, 1, 2, 4], 64 / 3),  # even count: Cartwright's last-interval correction, exact for x^2
    ([1, 0, 2, 5], [0, 1, 3, 4], 44 / 9),  # 1.5 (first parabola) + 4/9 * 5 + 7/12 * 2 - 1/36 * 0
    ([1, 5], [0, 2], 6.0),  # two samples: trapezoid
    ([7], [3], 0.0),
    ([1, 2, 3], [0, 0, 1], 4 / 3),  # zero-width interval: scipy's guarded divisions give h/3 (y0 + y2)
    ([1, 2, 3], [0, 1, 1], 4 / 3),
])
def test_simpson_matches_hand_computed_values(y, x, expected):
    assert simpson(y, x) == pytest.approx(expected, abs=1e-12)


def test_simpson_matches_scipy_when_available():
    integrate = pytest.importorskip("scipy.integrate")
    rng = np.random.default_rng(0)
    for n in range(1, 12):
        x = np.sort(rng.choice([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 1.0], n))
        y = rng.random(n)
        assert simpson(y, x) == pytest.approx(float(integrate.simpson(y, x=x)), abs=1e-12)


def test_simpson_rejects_mismatched_input():
    with pytest.raises(ValueError, match="same non-zero length"):
        simpson([1, 2], [0])


def test_threshold_counts_strict_and_float32():
    # p = 0.5 is not > 0.5; at t = 0.48 it is. 0.1 in float32 is not > the float32 threshold 0.1.
    p = torch.tensor([[0.5, 0.1, 0.95, 0.0]])
    g = torch.tensor([[True, False, True, False]])
    counts = threshold_counts(p, g)
    assert counts.shape == (49, 4)
    assert counts[23].tolist() == [2, 0, 0, 2]  # t = 0.48
    assert counts[24].tolist() == [1, 0, 1, 2]  # t = 0.50
    assert counts[3].tolist() == [2, 1, 0, 1]  # t = 0.08
    assert counts[4].tolist() == [2, 0, 0, 2]  # t = 0.10
    assert counts[48].tolist() == [0, 0, 2, 2]  # t = 0.98


def test_threshold_counts_equal_a_direct_count():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(17, 23, generator=gen)
    g = torch.rand(17, 23, generator=gen) > 0.6
    counts = threshold_counts(p, g)
    for i, t in enumerate(THRESHOLDS):
        pos = p > float(t)
        assert counts[i].tolist() == [int((pos & g).sum()), int((pos & ~g).sum()), int((~pos & g).sum()),
                                      int((~pos & ~g).sum())]


def test_prediction_is_resized_bilinearly_with_aligned_corners():
    # 2x2 -> 3x3 with align_corners=True keeps the corners: [[0, .5, 1], [.5, .5, .5], [1, .5, 0]].
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    g = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    counts = threshold_counts(p, g)
    assert counts[24].tolist() == [2, 0, 1, 6]  # t = 0.5: only the two 1-corners
    assert counts[23].tolist() == [3, 4, 0, 2]  # t = 0.48: the five 0.5s too


def _two_samples() -> SegmentationMetrics:
    metrics = SegmentationMetrics()
    metrics.add(torch.tensor([[0.95, 0.5, 0.25, 0.25]]), np.array([[1, 1, 0, 0]], dtype=bool))
    metrics.add(torch.tensor([[0.75, 0.31, 0.01, 0.01]]), np.array([[0, 1, 0, 0]], dtype=bool))
    return metrics


def test_summary_hand_computed():
    # Sample A: t <= 0.24: TP 2 FP 2; 0.26..0.48: TP 2; 0.50..0.94: TP 1 FN 1; 0.96+: FN 2.
    # Sample B: t <= 0.30: TP 1 FP 1; 0.32..0.74: FP 1 FN 1; 0.76+: FN 1.
    s = _two_samples().summary()
    assert s.count == 2
    # Per-sample IoU with +1 at t = 0.26: A 2 / 3, B 1 / 3 -> 0.5 (the best).
    assert s.miou == pytest.approx(0.5, abs=1e-12) and s.miou_threshold == pytest.approx(0.26)
    # Pooled at t = 0.26: TP 3, FP 1, FN 0 -> 3 / 5.
    assert s.iou_fg == pytest.approx(0.6, abs=1e-12) and s.iou_fg_threshold == pytest.approx(0.26)
    # (recall, precision): (1/4, 1/3), (1/4, 1/2), (1/2, 1/2), (3/4, 3/7), (3/4, 3/5); two zero-width
    # parabolas: 1/4 / 6 * (2/3 + 1) + 1/4 / 6 * (1 + 6/5) = 5/72 + 11/120.
    assert s.ap == pytest.approx(29 / 180, abs=1e-12)
    # At 0.5: A I 1 U 2, B I 0 U 2.
    assert s.mean_iou == pytest.approx(0.25, abs=1e-12) and s.cumulative_iou == pytest.approx(0.25, abs=1e-12)


def test_perfect_and_empty_predictions():
    perfect = SegmentationMetrics()
    perfect.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), np.eye(2, dtype=bool))
    s = perfect.summary()
    assert s.miou == pytest.approx(2 / 3) and s.iou_fg == pytest.approx(2 / 3)  # the +1 keeps IoU below 1
    assert s.ap == pytest.approx(0.0)  # one (recall, precision) point: Simpson of a single sample is 0
    assert s.mean_iou == 1.0 and s.cumulative_iou == 1.0

    nothing = SegmentationMetrics()
    nothing.add(torch.zeros(2, 2), np.eye(2, dtype=bool))
    nothing.add(torch.zeros(2, 2), np.zeros((2, 2), dtype=bool))  # a rejected absent phrase: IoU 1
    s = nothing.summary()
    assert (s.miou, s.iou_fg, s.ap, s.mean_iou, s.cumulative_iou) == (0.0, 0.0, 0.0, 0.5, 0.0)

    absent = SegmentationMetrics()  # only rejected absent phrases: every union is empty
    absent.add(torch.zeros(2, 2), np.zeros((2, 2), dtype=bool))
    assert (absent.summary().mean_iou, absent.summary().cumulative_iou) == (1.0, 1.0)


def test_records_with_more_true_positives_than_positives_are_refused():
    metrics = SegmentationMetrics()
    metrics.add(torch.ones(2, 2), np.eye(2, dtype=bool), key=(0, 1))  # TP 2 = positives at every threshold
    records = metrics.records()
    assert SegmentationMetrics.from_records(records, 0.5).records() == records
    records["tp"][0][0] = records["positives"][0] + 1
    with pytest.raises(ValueError, match=r"^'records.tp' of sample \[0, 1\] is more than its mask's pixels "
                                         r"\('positives'\)$"):
        SegmentationMetrics.from_records(records, 0.5)


def test_summary_needs_samples():
    with pytest.raises(ValueError, match="no samples"):
        SegmentationMetrics().summary()


def test_sample_iou_of_counts() -> None:
    assert sample_iou(np.array([[3, 1, 2, 9], [0, 0, 0, 5]])).tolist() == [3 / 7, 0.0]
