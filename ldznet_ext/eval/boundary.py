"""Boundary F-score: how well a predicted mask's edge follows the true edge, within a tolerance.

Region metrics (IoU) barely move when an edge is off by a pixel or two, since most pixels of a
mask are far from its edge. The boundary F-score (Perazzi et al., DAVIS 2016; Martin et al. for
contours) scores the edge alone:

- the boundary of a binary mask is its foreground pixels with a 4-neighbour in the background;
  the image border is not an edge (a mask cut by the frame has no edge there);
- precision = the fraction of predicted boundary pixels within ``tolerance`` pixels (Euclidean
  distance between pixel centres) of a true boundary pixel; recall = the fraction of true
  boundary pixels within ``tolerance`` of a predicted one;
- F = 2 P R / (P + R) (0 when P + R = 0). Two empty boundaries score F = 1; one empty boundary
  scores 0.

:class:`BoundaryMetrics` accumulates samples and reports the mean F over samples at each of a
few thresholds, the best of them (chosen on the evaluated set, as the CLIPSeg mIoU) and the value
at a fixed threshold.
"""

from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch.nn.functional as F
from torch import Tensor

from ..limits import BOUNDARY_TOLERANCE, THRESHOLD
from .metrics import merge_order, read_keys

BOUNDARY_THRESHOLDS: np.ndarray = np.round(np.arange(1, 10) / 10, 2)
"""Thresholds 0.1 .. 0.9 at which :class:`BoundaryMetrics` binarises probability maps."""
DEFAULT_TOLERANCE = 2.0


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool [H, W] mask: foreground with a 4-neighbour (inside the image) in
    the background. Returns bool [H, W]."""
    mask = np.asarray(mask, dtype=bool)
    # Padding with True: outside the image counts as foreground, so the border is no edge.
    padded = np.pad(mask, 1, constant_values=True)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _within(points: np.ndarray, targets: np.ndarray, tolerance: float) -> int:
    """How many True pixels of ``points`` lie within ``tolerance`` of a True pixel of ``targets``."""
    if not targets.any():
        return 0
    # distanceTransform measures the distance to the nearest zero pixel: targets become the zeros.
    distance = cv2.distanceTransform((~targets).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return int((distance[points] <= tolerance + 1e-6).sum())


def boundary_counts(prediction: np.ndarray, truth: np.ndarray, tolerance: float = DEFAULT_TOLERANCE
                    ) -> tuple[int, int, int, int]:
    """(matched predicted, predicted, matched true, true) boundary pixel counts of two bool [H, W] masks."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} must have the same shape")
    predicted, true = mask_boundary(prediction), mask_boundary(truth)
    return (_within(predicted, true, tolerance), int(predicted.sum()),
            _within(true, predicted, tolerance), int(true.sum()))


def f_score(counts: tuple[int, int, int, int]) -> float:
    """The boundary F-score in [0, 1] of :func:`boundary_counts`' counts."""
    matched_p, n_p, matched_t, n_t = counts
    if n_p == 0 and n_t == 0:
        return 1.0
    if n_p == 0 or n_t == 0:
        return 0.0
    precision, recall = matched_p / n_p, matched_t / n_t
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def boundary_f_score(prediction: np.ndarray, truth: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Boundary F-score in [0, 1] of a bool [H, W] prediction against a bool [H, W] truth."""
    return f_score(boundary_counts(prediction, truth, tolerance))


@dataclass(frozen=True)
class BoundarySummary:
    """Mean boundary F over samples, in [0, 1]: the best over thresholds and at ``binary_threshold``."""

    count: int
    tolerance: float
    boundary_f: float
    boundary_f_threshold: float
    boundary_f_at_binary: float
    binary_threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


class BoundaryMetrics:
    """Accumulates boundary F-scores of probability maps at :data:`BOUNDARY_THRESHOLDS` and at
    ``binary_threshold``; a pixel is foreground when p > threshold. Samples carry keys (as
    ``SegmentationMetrics``), so the scores of shards merge into those of one unsharded run."""

    def __init__(self, tolerance: float = DEFAULT_TOLERANCE, binary_threshold: float = 0.5):
        self.tolerance = tolerance
        self.binary_threshold = binary_threshold
        self.thresholds = np.array([*BOUNDARY_THRESHOLDS, binary_threshold])
        self.scores: list[np.ndarray] = []  # per sample [T + 1]
        self.keys: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self.scores)

    def add(self, probability: Tensor, truth: Tensor | np.ndarray, key: tuple[int, ...] = ()) -> None:
        """One sample: probability [h, w] in [0, 1] and its bool [H, W] truth; the probability is
        resized bilinearly (align_corners=True, as the region metrics) when the sizes differ."""
        truth = np.asarray(truth, bool)
        p = probability.detach().float().cpu()
        if tuple(p.shape) != truth.shape:
            p = F.interpolate(p[None, None], size=truth.shape, mode="bilinear", align_corners=True)[0, 0]
        p = p.numpy()
        self.scores.append(np.array([boundary_f_score(p > t, truth, self.tolerance)
                                     for t in self.thresholds.astype(np.float32)]))
        self.keys.append(tuple(key))

    def records(self) -> dict:
        """JSON-able: the settings, each sample's key and its F-scores at ``thresholds``."""
        return {"tolerance": self.tolerance, "binary_threshold": self.binary_threshold,
                "keys": [list(k) for k in self.keys], "scores": [s.tolist() for s in self.scores]}

    @classmethod
    def from_records(cls, records: dict) -> BoundaryMetrics:
        """The inverse of ``records()``; ValueError naming the field for a tolerance or threshold out of its
        range, a key that is not a list of non-negative integers or a score that is not a number in [0, 1]."""
        if not isinstance(records, dict):
            raise ValueError(f"'boundary' must be an object, got {reprlib.repr(records)}")
        for name, limit in (("tolerance", BOUNDARY_TOLERANCE), ("binary_threshold", THRESHOLD)):
            limit.check(records[name], f"'boundary.{name}'")
        metrics = cls(records["tolerance"], records["binary_threshold"])
        metrics.keys = read_keys(records["keys"], "boundary.keys")
        scores, width = records["scores"], len(metrics.thresholds)
        if not isinstance(scores, list) or len(scores) != len(metrics.keys) or not all(
                isinstance(s, list) and len(s) == width for s in scores):
            raise ValueError(f"'boundary.scores' must be {len(metrics.keys)} rows of {width} numbers (one per key), "
                             f"got {reprlib.repr(scores)}")
        bad = [v for row in scores for v in row if type(v) not in (int, float) or not 0 <= v <= 1][:1]
        if bad:  # NaN fails the comparison too
            raise ValueError(f"each value of 'boundary.scores' must be a number in [0, 1], got {reprlib.repr(bad[0])}")
        metrics.scores = [np.asarray(s, np.float64) for s in scores]
        return metrics

    @classmethod
    def merge(cls, parts: list[BoundaryMetrics]) -> BoundaryMetrics:
        """All samples of ``parts`` (same tolerance and threshold) in key order; duplicate keys are an
        error, as in ``SegmentationMetrics.merge``."""
        settings = {(p.tolerance, p.binary_threshold) for p in parts}
        if len(settings) != 1:
            raise ValueError(f"parts measured with different boundary tolerances or thresholds: {sorted(settings)}")
        merged = cls(*settings.pop())
        for key, i, j in merge_order([p.keys for p in parts]):
            merged.keys.append(key)
            merged.scores.append(parts[i].scores[j])
        return merged

    def summary(self) -> BoundarySummary:
        if not self.scores:
            raise ValueError("no samples were added")
        mean = np.stack(self.scores).mean(axis=0)
        best = int(np.argmax(mean[:-1]))
        return BoundarySummary(len(self.scores), self.tolerance, float(mean[best]), float(self.thresholds[best]),
                               float(mean[-1]), self.binary_threshold)
