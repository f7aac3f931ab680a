"""Referring-segmentation metrics: CLIPSeg's fixed-interval methodology plus PhraseCut's binary IoUs.

CLIPSeg (``metrics.py: FixedIntervalMetrics``, which the LD-ZNet paper's numbers come from): a
prediction is a probability map in [0, 1], resized bilinearly (align_corners=True) to its ground
truth when the sizes differ. At each of 49 thresholds t = 0.02, 0.04, ..., 0.98 a pixel is
positive when p > t (compared in float32, as the reference compares float32 tensors), and
TP/FP/FN/TN are counted per sample and summed:

- IoU_FG(t) = sum TP / (1 + sum TP + sum FP + sum FN);
- mIoU(t) = mean over samples of TP / (1 + TP + FP + FN) (for PhraseCut the "class" is the sample);
- the reported values are the best over t, chosen on the evaluated set itself;
- AP = Simpson integral (scipy.integrate.simpson's rule, ``simpson`` below) of precision
  TP / (1 + TP + FP) over recall TP / (1 + TP + FN), using the thresholds where TP + FP > 0,
  duplicate (recall, precision) pairs removed, sorted by recall (ties by precision; the reference
  leaves ties in set order). With no positive prediction at any threshold AP is 0 (the reference
  refuses to compute it).

PhraseCut's evaluator adds, on binary masks p > threshold: mean IoU (per-sample I / U averaged;
a sample with an empty union, a correctly rejected absent phrase, counts 1) and cumulative IoU
(sum I / sum U).
"""

from __future__ import annotations

import itertools
import reprlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..limits import SAMPLE_KEY, SAMPLE_PIXELS, THRESHOLD

THRESHOLDS: np.ndarray = np.linspace(0, 1, 51)[1:-1]
"""The 49 thresholds 0.02 .. 0.98 of CLIPSeg's FixedIntervalMetrics."""


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den where den != 0, else 0 (scipy's guarded divisions)."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _basic_simpson(y: np.ndarray, x: np.ndarray, stop: int) -> float:
    """Composite Simpson over the parabola triples starting at 0, 2, ... before ``stop``."""
    h = np.diff(x)
    h0, h1 = h[0:stop:2], h[1:stop + 1:2]
    y0, y1, y2 = y[0:stop:2], y[1:stop + 1:2], y[2:stop + 2:2]
    hsum, hprod = h0 + h1, h0 * h1
    h0divh1 = _divide(h0, h1)
    tmp = hsum / 6.0 * (y0 * (2.0 - _divide(np.ones_like(h0divh1), h0divh1))
                        + y1 * (hsum * _divide(hsum, hprod))
                        + y2 * (2.0 - h0divh1))
    return float(np.sum(tmp))


def simpson(y: Sequence[float], x: Sequence[float]) -> float:
    """The integral of samples y(x) by ``scipy.integrate.simpson(y, x=x)`` (scipy >= 1.11 default).

    Irregular spacing is allowed; zero-width intervals (repeated x) contribute through scipy's
    guarded divisions (x / 0 taken as 0). An even number of samples gets Simpson's rule on all but
    the last interval plus Cartwright's correction for it; two samples the trapezoid; one sample 0.
    """
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    if y.ndim != 1 or y.shape != x.shape or len(y) == 0:
        raise ValueError(f"simpson needs 1-D y and x of the same non-zero length, got {y.shape} and {x.shape}")
    n = len(y)
    if n % 2:
        return _basic_simpson(y, x, n - 2)
    if n == 2:
        return float(0.5 * (x[1] - x[0]) * (y[1] + y[0]))
    h0, h1 = x[-2] - x[-3], x[-1] - x[-2]
    alpha = _divide(2 * h1 ** 2 + 3 * h0 * h1, 6 * (h1 + h0))
    beta = _divide(h1 ** 2 + 3.0 * h0 * h1, 6 * h0)
    eta = _divide(1 * h1 ** 3, 6 * h0 * (h0 + h1))
    return float(_basic_simpson(y, x, n - 3) + (alpha * y[-1] + beta * y[-2] - eta * y[-3]))


def threshold_counts(probability: Tensor, truth: Tensor, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Per-threshold pixel counts int64 [T, 4] (TP, FP, FN, TN) of ``probability`` [h, w] in [0, 1]
    against ``truth`` bool [H, W]; the probability is first resized to [H, W] (bilinear,
    align_corners=True) if needed. A pixel is positive when p > t."""
    p = probability.detach().float().cpu()
    g = torch.as_tensor(truth).bool().cpu()
    if p.shape != g.shape:
        p = F.interpolate(p[None, None], size=tuple(g.shape), mode="bilinear", align_corners=True)[0, 0]
    p, order = p.flatten().sort()
    g = g.flatten()[order].long()
    total, positives = len(g), int(g.sum())
    # Below-or-equal counts per threshold; thresholds in float32 as the reference's tensor comparison.
    below = torch.searchsorted(p, torch.as_tensor(thresholds, dtype=torch.float32), right=True)
    fn = torch.cat([torch.zeros(1, dtype=torch.long), g.cumsum(0)])[below]  # mask pixels at or below t
    tp = positives - fn
    fp = total - below - tp
    tn = below - fn
    return torch.stack([tp, fp, fn, tn], dim=1).numpy().astype(np.int64)


def sample_iou(counts: np.ndarray) -> np.ndarray:
    """IoU TP / (1 + TP + FP + FN) of (TP, FP, FN, TN) counts [..., 4], float64 [...]: one sample's IoU
    at each threshold from :func:`threshold_counts`, the quantity mIoU averages over samples."""
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    return tp / (1 + tp + fp + fn)


@dataclass(frozen=True)
class MetricSummary:
    """Metric values in [0, 1] (the paper reports them x 100) and the thresholds that gave them."""

    count: int
    miou: float
    miou_threshold: float
    iou_fg: float
    iou_fg_threshold: float
    ap: float
    mean_iou: float
    cumulative_iou: float
    binary_threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def merge_order(keys: Sequence[Sequence[tuple[int, ...]]]) -> list[tuple[tuple[int, ...], int, int]]:
    """(key, part i, sample j) of every sample of parts whose sample keys are ``keys[i]``, in key
    order; a key in more than one part (overlapping shards) raises ValueError."""
    rows = sorted((k, i, j) for i, part in enumerate(keys) for j, k in enumerate(part))
    duplicate = next((a[0] for a, b in zip(rows, rows[1:]) if a[0] == b[0]), None)
    if duplicate is not None:
        raise ValueError(f"sample {list(duplicate)} is in more than one part (overlapping shards?)")
    return rows


def read_keys(keys: object, field: str) -> list[tuple[int, ...]]:
    """Sample keys as ``records()`` writes them (lists of integers in :data:`SAMPLE_KEY`'s range) as tuples;
    ValueError naming ``field`` otherwise."""
    if not isinstance(keys, list) or not all(isinstance(k, list) and all(map(SAMPLE_KEY.accepts, k)) for k in keys):
        raise ValueError(f"'{field}' must be a list of lists of integers in [0, {SAMPLE_KEY.high}], "
                         f"got {reprlib.repr(keys)}")
    return [tuple(k) for k in keys]


def _pixel_counts(records: dict, name: str, count: int, width: int | None = None) -> np.ndarray:
    """``records[name]``: ``count`` integers (rows of ``width`` integers) in :data:`SAMPLE_PIXELS`' range,
    int64 [count] ([count, width]); ValueError naming the field otherwise."""
    rows = records[name]
    what = f"{count} integers" if width is None else f"{count} rows of {width} integers"
    if not isinstance(rows, list) or len(rows) != count or (
            width is not None and not all(isinstance(r, list) and len(r) == width for r in rows)):
        raise ValueError(f"'records.{name}' must be {what} (one per key), got {reprlib.repr(rows)}")
    values = rows if width is None else itertools.chain.from_iterable(rows)
    high = SAMPLE_PIXELS.high
    # type() rather than Limit.accepts: a PhraseCut test run holds over a million counts; bool is refused too
    bad = [v for v in values if type(v) is not int or not 0 <= v <= high][:1]
    if bad:
        raise ValueError(f"each value of 'records.{name}' must be {SAMPLE_PIXELS.describe()}, "
                         f"got {reprlib.repr(bad[0])}")
    return np.array(rows, np.int64).reshape(count, *(() if width is None else (width,)))


class SegmentationMetrics:
    """Accumulates samples one at a time; ``summary()`` gives every metric of the module docstring.

    ``binary_threshold`` is the fixed threshold of PhraseCut's mean and cumulative IoU. Each sample
    may carry a ``key`` (e.g. (example index, phrase position)); ``records()`` are the raw counts as
    JSON-able lists, and ``merge`` puts the records of several parts (shards) back in key order,
    so the merged summary is bit-identical to that of one run over all samples in key order.
    """

    def __init__(self, binary_threshold: float = 0.5):
        self.binary_threshold = binary_threshold
        self.counts: list[np.ndarray] = []  # per sample [49, 4]
        self.intersections: list[int] = []
        self.unions: list[int] = []
        self.keys: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, probability: Tensor, truth: Tensor | np.ndarray, key: tuple[int, ...] = (),
            binary_truth: Tensor | np.ndarray | None = None) -> None:
        """One sample: probability [h, w] in [0, 1] and its ground-truth mask bool [H, W].

        ``binary_truth`` (bool [H', W'], default ``truth``) is the mask PhraseCut's binary IoUs are
        measured on, e.g. the original-resolution mask when ``truth`` was resized.
        """
        truth = torch.as_tensor(np.asarray(truth)).bool()
        if binary_truth is None:
            counts = threshold_counts(probability, truth, np.array([*THRESHOLDS, self.binary_threshold]))
            self.counts.append(counts[:-1])
            binary = counts[-1]
        else:
            self.counts.append(threshold_counts(probability, truth))
            binary = threshold_counts(probability, torch.as_tensor(np.asarray(binary_truth)).bool(),
                                      np.array([self.binary_threshold]))[0]
        tp, fp, fn, _ = (int(v) for v in binary)
        self.intersections.append(tp)
        self.unions.append(tp + fp + fn)
        self.keys.append(tuple(int(k) for k in key))

    def records(self) -> dict[str, list]:
        """The raw per-sample counts: keys, TP and FP at the 49 thresholds, mask and total pixels,
        and the binary intersection and union (FN and TN follow from the pixel counts)."""
        counts = np.stack(self.counts) if self.counts else np.zeros((0, len(THRESHOLDS), 4), np.int64)
        return {"keys": [list(k) for k in self.keys], "tp": counts[..., 0].tolist(), "fp": counts[..., 1].tolist(),
                "positives": (counts[:, 0, 0] + counts[:, 0, 2]).tolist(), "pixels": counts[:, 0].sum(1).tolist(),
                "intersection": list(self.intersections), "union": list(self.unions)}

    @classmethod
    def from_records(cls, records: dict[str, list], binary_threshold: float) -> SegmentationMetrics:
        """The inverse of ``records()``. Records no evaluation writes raise ValueError naming the field: a
        value that is not an integer in :data:`SAMPLE_PIXELS`' range, a count beyond what its sample's pixels
        allow (FN and TN would be negative), a key that is not a list of non-negative integers."""
        THRESHOLD.check(binary_threshold, "'binary_threshold'")
        if not isinstance(records, dict):
            raise ValueError(f"'records' must be an object, got {reprlib.repr(records)}")
        keys = read_keys(records["keys"], "records.keys")
        count = len(keys)
        tp, fp = (_pixel_counts(records, name, count, len(THRESHOLDS)) for name in ("tp", "fp"))
        positives, pixels, intersection, union = (_pixel_counts(records, name, count)
                                                  for name in ("positives", "pixels", "intersection", "union"))
        for name, beyond, what in (("positives", positives > pixels, "its pixels"),
                                   ("tp", tp > positives[:, None], "its mask's pixels ('positives')"),
                                   ("fp", fp > (pixels - positives)[:, None], "its pixels outside the mask"),
                                   ("intersection", intersection > union, "its union")):
            if beyond.any():
                sample = int(np.argmax(beyond.reshape(count, -1).any(axis=1)))
                raise ValueError(f"'records.{name}' of sample {list(keys[sample])} is more than {what}")
        metrics = cls(binary_threshold)
        if count:
            fn, tn = positives[:, None] - tp, pixels[:, None] - positives[:, None] - fp
            metrics.counts = list(np.stack([tp, fp, fn, tn], axis=2))
        metrics.keys = keys
        metrics.intersections, metrics.unions = intersection.tolist(), union.tolist()
        return metrics

    @classmethod
    def merge(cls, parts: Sequence[SegmentationMetrics]) -> SegmentationMetrics:
        """All samples of ``parts`` in key order; duplicate keys (overlapping shards) are an error."""
        thresholds = sorted({p.binary_threshold for p in parts})
        if len(thresholds) > 1:
            raise ValueError(f"parts measured at different binary thresholds: {thresholds}")
        merged = cls(parts[0].binary_threshold if parts else 0.5)
        for key, i, j in merge_order([p.keys for p in parts]):
            merged.counts.append(parts[i].counts[j])
            merged.intersections.append(parts[i].intersections[j])
            merged.unions.append(parts[i].unions[j])
            merged.keys.append(key)
        return merged

    def sample_ious(self) -> np.ndarray:
        """Per-sample IoU TP / (1 + TP + FP + FN) at each threshold, float64 [N, 49]; mIoU(t) is its column mean."""
        if not self.counts:
            raise ValueError("no samples were added")
        return sample_iou(np.stack(self.counts))  # counts [N, 49, 4]

    def summary(self) -> MetricSummary:
        miou = self.sample_ious().mean(axis=0)
        pooled = np.stack(self.counts).astype(np.float64).sum(0)  # [49, 4]
        tp, fp, fn = pooled[:, 0], pooled[:, 1], pooled[:, 2]
        iou_fg = tp / (1 + tp + fp + fn)
        predicted = tp + fp > 0
        pairs = sorted(set(zip((tp / (1 + tp + fn))[predicted].tolist(), (tp / (1 + tp + fp))[predicted].tolist())))
        ap = simpson([p for _, p in pairs], [r for r, _ in pairs]) if pairs else 0.0
        inter, union = np.array(self.intersections, np.float64), np.array(self.unions, np.float64)
        per_iou = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
        return MetricSummary(
            count=len(self.counts), miou=float(miou.max()), miou_threshold=float(THRESHOLDS[np.argmax(miou)]),
            iou_fg=float(iou_fg.max()), iou_fg_threshold=float(THRESHOLDS[np.argmax(iou_fg)]), ap=ap,
            mean_iou=float(per_iou.mean()), cumulative_iou=float(inter.sum() / union.sum()) if union.sum() else 1.0,
            binary_threshold=self.binary_threshold)
