"""Evaluate a segmenter (a trained head or zero-shot) on a data source with the CLIPSeg metrics.

Each example's image is set once and all its phrases are predicted in one batch, each phrase as
a single-term expression. PhraseCut and CLIPSeg evaluate only phrases that are in the image, so
absent phrases (empty masks) are skipped unless ``include_absent``. The segmenter returns maps at
the image's own size (micro-world scenes are rendered at the working resolution by default, so
nothing is resized; other images are resized by the segmenter with align_corners=False).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..errors import LdznetError
from ..segmenter import Segmenter
from ..train.data import Source
from .metrics import MetricSummary, SegmentationMetrics

TABLE_HEADER = ("| model | data | masks | mIoU | IoU_FG | AP | mean IoU@{t} | cum IoU@{t} | ms/mask |\n"
                "|---|---|---:|---:|---:|---:|---:|---:|---:|")


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation; ``ms_per_mask`` is model time (encoding included) per predicted mask."""

    name: str
    data: str
    metrics: MetricSummary
    ms_per_mask: float

    def table_row(self) -> str:
        """A markdown row matching ``table_header()``; metrics x 100 as in the paper."""
        m = self.metrics
        values = [100 * v for v in (m.miou, m.iou_fg, m.ap, m.mean_iou, m.cumulative_iou)]
        return (f"| {self.name} | {self.data} | {m.count} | " + " | ".join(f"{v:.1f}" for v in values)
                + f" | {self.ms_per_mask:.1f} |")

    def table_header(self) -> str:
        return TABLE_HEADER.format(t=f"{self.metrics.binary_threshold:g}")

    def to_dict(self) -> dict:
        return {"name": self.name, "data": self.data, "ms_per_mask": self.ms_per_mask, **self.metrics.to_dict()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(segmenter: Segmenter, source: Source, name: str = "model", include_absent: bool = False,
             binary_threshold: float = 0.5, progress: bool | None = None) -> EvalResult:
    """Run ``segmenter`` on every example of ``source`` and score its per-phrase probability maps."""
    metrics = SegmentationMetrics(binary_threshold)
    seconds = 0.0
    device = segmenter.backbone.device
    progress = sys.stderr.isatty() if progress is None else progress
    for index in tqdm(range(len(source)), desc="eval", disable=not progress, dynamic_ncols=True):
        example = source[index]
        samples = example.samples(include_absent)
        if not samples:
            continue
        _sync(device)
        start = time.perf_counter()
        segmenter.set_image(example.image)
        maps = segmenter.predict_terms([s.phrase for s in samples])
        _sync(device)
        seconds += time.perf_counter() - start
        for sample in samples:
            metrics.add(maps[sample.phrase], sample.mask)
    segmenter.reset_image()
    if not len(metrics):
        raise LdznetError(f"{source.description}: no phrases to evaluate"
                          + ("" if include_absent else " (all absent; include absent phrases to score them)"))
    return EvalResult(name, source.description, metrics.summary(), 1000.0 * seconds / len(metrics))
