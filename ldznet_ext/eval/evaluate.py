"""Evaluate a segmenter (a trained head or zero-shot) on a data source with the CLIPSeg metrics.

Each example's image is set once and all its phrases are predicted in one batch, each phrase as
a single-term expression. PhraseCut and CLIPSeg evaluate only phrases that are in the image, so
absent phrases (empty masks) are skipped unless ``include_absent``. By default predictions are
scored at the image's own size (the segmenter resizes); with ``square=N`` the whole image and its
masks are first squashed to N x N (``data.examples.resize_square``, CLIPSeg's PhraseCut test protocol) and
PhraseCut's binary IoUs are measured on the original masks, the prediction resized back.

Sharding: ``shard=(k, n)``, 1 <= k <= n as everywhere in ldznet, evaluates examples k - 1,
k - 1 + n, k - 1 + 2n, ... (0-based indices). Every sample is keyed by (example index, phrase
position); ``merge_results`` of shards 1..n gives exactly the metrics of one unsharded run
(``SegmentationMetrics.merge``). Unreadable examples are skipped and listed. Result files of
version 1 numbered shards from 0; :meth:`EvalResult.from_dict` reads them as 1-based.

``boundary``: a tolerance in pixels; every map's edge is then also scored (boundary F against the
mask the map is scored on, :class:`BoundaryMetrics`), kept in the result with keys, so it is in the
JSON and merges across shards exactly like the region metrics.

``presence``: each phrase first gets the segmenter's found / not-found decision (a head's learned
presence output, or else the calibrated rule on its map, ``Segmenter.decide_presence``), and a
phrase not found is scored as an empty map, as an expression would use it. With absent phrases
included, ``EvalResult.absent_summary`` says how many of them came back empty (no pixel above the
binary threshold) beside the present phrases' mIoU.
"""

from __future__ import annotations

import json
import reprlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..data.examples import Source, resize_square
from ..data.stream import iterate_examples
from ..errors import LdznetError
from ..limits import EXAMPLE_COUNT, RENDER_SIZE, SAMPLE_KEY, SECONDS, Limit
from ..segmenter import Segmenter
from .boundary import BoundaryMetrics
from .metrics import THRESHOLDS, MetricSummary, SegmentationMetrics

FORMAT = "ldznet-eval"
VERSION = 2  # 2: shards numbered 1..N (1: 0..N-1)
READABLE_VERSIONS = (1, 2)


@dataclass
class EvalResult:
    """One evaluation (or one shard of it): raw counts in ``metrics``, settings, time and skips.

    ``seconds`` is model time (encoding included); ``examples`` the examples read;
    ``skipped`` (example index, reason) of unreadable ones; ``boundary`` the boundary F-scores
    when they were asked for; ``setup`` what the maps depend on beyond the data (model and head files by
    name, precision, the segmenter's settings, the render size), which shards of one evaluation share.
    """

    name: str
    data: str
    metrics: SegmentationMetrics
    seconds: float = 0.0
    examples: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    shard: tuple[int, int] = (1, 1)
    square: int | None = None
    include_absent: bool = False
    boundary: BoundaryMetrics | None = None
    presence: bool = False
    setup: dict = field(default_factory=dict)

    @property
    def summary(self) -> MetricSummary:
        """All metric values (raises ValueError when no sample was scored)."""
        return self.metrics.summary()

    @property
    def ms_per_mask(self) -> float:
        return 1000.0 * self.seconds / max(1, len(self.metrics))

    def settings(self) -> dict[str, object]:
        """What must agree between shards of one evaluation, by name."""
        return {"shard count": self.shard[1], "square size": self.square, "absent phrases": self.include_absent,
                "binary threshold": self.metrics.binary_threshold,
                "boundary tolerance": None if self.boundary is None else self.boundary.tolerance,
                "presence": self.presence,
                **{f"setup {key}": json.dumps(value, sort_keys=True) for key, value in self.setup.items()}}

    @property
    def absent_summary(self) -> AbsentSummary:
        """Absent phrases returned empty and present-phrase mIoU (:func:`absent_summary`)."""
        return absent_summary(self.metrics)

    def to_dict(self) -> dict:
        """JSON-able: settings, the summary (None for a shard without samples) and the raw records."""
        return {"name": self.name, "data": self.data, "setup": self.setup, "shard": list(self.shard),
                "square": self.square,
                "include_absent": self.include_absent, "presence": self.presence,
                "binary_threshold": self.metrics.binary_threshold,
                "examples": self.examples, "skipped": [list(s) for s in self.skipped], "seconds": self.seconds,
                "ms_per_mask": self.ms_per_mask,
                "summary": self.summary.to_dict() if len(self.metrics) else None,
                "absent_summary": self.absent_summary.to_dict() if self.include_absent else None,
                "records": self.metrics.records(),
                "boundary_summary": self.boundary.summary().to_dict() if self.boundary and len(self.boundary) else None,
                "boundary": self.boundary.records() if self.boundary is not None else None}

    @classmethod
    def from_dict(cls, data: dict, where: str = "result", version: int = VERSION) -> EvalResult:
        """The result :meth:`to_dict` wrote, in a file of format ``version`` (1: shards from 0). A value no
        evaluation writes (wrong type, out of range, counts its pixels cannot give) is an LdznetError naming
        ``where`` and the field: merged, it made a traceback or a table of meaningless numbers."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"expected an object, got {reprlib.repr(data)}")
            metrics = SegmentationMetrics.from_records(data["records"], data["binary_threshold"])
            square = data["square"]
            if square is not None and not RENDER_SIZE.accepts(square):
                raise ValueError(f"'square' must be null or {RENDER_SIZE.describe()}, got {reprlib.repr(square)}")
            examples = _number(data, "examples", EXAMPLE_COUNT)
            scored = len({key[0] for key in metrics.keys})  # keys are (example, phrase)
            if examples < scored:
                raise ValueError(f"'examples' must count at least the {scored} examples its records score, "
                                 f"got {examples}")
            return cls(_string(data, "name"), _string(data, "data"), metrics, _number(data, "seconds", SECONDS),
                       examples, _skipped(data["skipped"]),
                       _shard(data["shard"], version), square, _flag(data, "include_absent"),
                       _boundary(data, metrics), _flag(data, "presence", default=False), _setup(data))
        except KeyError as error:
            raise LdznetError(f"{where}: not an ldznet eval result (no field {error})") from error
        except (TypeError, ValueError) as error:
            raise LdznetError(f"{where}: not an ldznet eval result ({error})") from error


def _boundary(data: dict, metrics: SegmentationMetrics) -> BoundaryMetrics | None:
    """The boundary scores, if any: of the same samples, at the same binary threshold as ``metrics``."""
    if not data.get("boundary"):
        return None
    boundary = BoundaryMetrics.from_records(data["boundary"])
    if boundary.binary_threshold != metrics.binary_threshold:
        raise ValueError(f"'boundary.binary_threshold' must be the result's binary_threshold "
                         f"{metrics.binary_threshold}, got {boundary.binary_threshold}")
    if boundary.keys != metrics.keys:
        raise ValueError("'boundary.keys' must be the keys of 'records.keys' (each scored map's edge is scored)")
    return boundary


def _string(data: dict, key: str) -> str:
    if not isinstance(data[key], str):
        raise TypeError(f"{key!r} must be a string, got {reprlib.repr(data[key])}")
    return data[key]


def _number(data: dict, key: str, limit: Limit) -> float:
    return limit.check(data[key], repr(key))


def _skipped(skipped: object) -> list[tuple[int, str]]:
    """(example index, reason) pairs of the unreadable examples."""
    if not isinstance(skipped, list) or not all(isinstance(s, list) and len(s) == 2 and SAMPLE_KEY.accepts(s[0])
                                               and isinstance(s[1], str) for s in skipped):
        raise ValueError(f"'skipped' must be a list of [example index, reason], got {reprlib.repr(skipped)}")
    return [(i, r) for i, r in skipped]


def _shard(shard: object, version: int) -> tuple[int, int]:
    """[K, N] with 1 <= K <= N (0 <= K < N in version 1 files, read as K + 1), N at most the examples any
    source may hold: a larger N names shards no run can make."""
    first = 0 if version == 1 else 1
    if not (isinstance(shard, list) and len(shard) == 2 and all(map(EXAMPLE_COUNT.accepts, shard))
            and first <= shard[0] <= shard[1] - 1 + first):
        raise ValueError(f"'shard' must be [K, N] with {first} <= K <= N{' - 1' if first == 0 else ''} <= "
                         f"{EXAMPLE_COUNT.high}, got {reprlib.repr(shard)}")
    return shard[0] + 1 - first, shard[1]


def _setup(data: dict) -> dict:
    """``data["setup"]``, a JSON object (empty in files older than the key)."""
    setup = data.get("setup", {})
    if not isinstance(setup, dict):
        raise TypeError(f"'setup' must be an object, got {reprlib.repr(setup)}")
    return setup


def _flag(data: dict, key: str, default: bool | None = None) -> bool:
    """``data[key]`` if it is true or false (``default`` when absent, for files older than the key); a string
    such as "false" is refused, since merging decides by it which results were scored alike."""
    value = data[key] if default is None or key in data else default
    if type(value) is not bool:
        raise TypeError(f"{key!r} is {value!r}; expected true or false")
    return value


@dataclass(frozen=True)
class AbsentSummary:
    """Absent phrases (empty ground truth) and how many came back empty (no pixel above the binary
    threshold), beside the mIoU (best t) of the present phrases alone."""

    absent: int
    absent_empty: int
    present: int
    present_miou: float
    present_miou_threshold: float

    @property
    def absent_empty_share(self) -> float:
        """absent_empty / absent in [0, 1] (0 without absent phrases)."""
        return self.absent_empty / self.absent if self.absent else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "absent_empty_share": self.absent_empty_share}


def absent_summary(metrics: SegmentationMetrics) -> AbsentSummary:
    """``metrics``' samples split by their ground truth: absent ones returned empty, present ones' mIoU."""
    counts = np.stack(metrics.counts).astype(np.float64) if len(metrics) else np.zeros((0, len(THRESHOLDS), 4))
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    present = (tp[:, 0] + fn[:, 0]) > 0
    empty = np.array(metrics.unions, np.int64) == 0  # an absent phrase's binary union is its false positives
    miou = (tp / (1 + tp + fp + fn))[present].mean(axis=0) if present.any() else np.zeros(len(THRESHOLDS))
    return AbsentSummary(absent=int((~present).sum()), absent_empty=int((~present & empty).sum()),
                         present=int(present.sum()), present_miou=float(miou.max()),
                         present_miou_threshold=float(THRESHOLDS[np.argmax(miou)]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(segmenter: Segmenter, source: Source, name: str = "model", include_absent: bool = False,
             binary_threshold: float = 0.5, progress: bool | None = None, shard: tuple[int, int] = (1, 1),
             workers: int = 0, square: int | None = None, boundary: float | None = None,
             presence: bool = False, setup: dict | None = None) -> EvalResult:
    """Run ``segmenter`` on the examples of ``source`` in ``shard`` (k, n), 1 <= k <= n, and count its per-phrase
    probability maps; ``workers`` processes read the examples ahead; ``boundary``: also score edges
    matched within that many pixels; ``presence``: a phrase not found is an empty map (module docstring)."""
    k, n = shard
    if not 1 <= k <= n:
        raise LdznetError(f"shard {k}/{n}: expected K/N with 1 <= K <= N")
    result = EvalResult(name, source.description, SegmentationMetrics(binary_threshold), shard=shard, square=square,
                        include_absent=include_absent,
                        boundary=None if boundary is None else BoundaryMetrics(boundary, binary_threshold),
                        presence=presence, setup=setup or {})
    device = segmenter.backbone.device
    progress = sys.stderr.isatty() if progress is None else progress
    indices = range(k - 1, len(source), n)
    stream = iterate_examples(source, indices, workers, on_error=lambda i, e: result.skipped.append((i, str(e))))
    for index, original in tqdm(stream, total=len(indices), desc="eval", disable=not progress, dynamic_ncols=True):
        result.examples += 1
        example = resize_square(original, square) if square else original
        wanted = [j for j, (_, mask) in enumerate(example.pairs) if include_absent or mask.any()]
        if not wanted:
            continue
        _sync(device)
        start = time.perf_counter()
        segmenter.set_image(example.image)
        maps = segmenter.predict_terms(list(dict.fromkeys(example.pairs[j][0] for j in wanted)))
        if presence:
            decisions = segmenter.decide_presence(maps)
            maps = {t: m if decisions[t].found else torch.zeros_like(m) for t, m in maps.items()}
        _sync(device)
        result.seconds += time.perf_counter() - start
        for j in wanted:
            phrase, mask = example.pairs[j]
            result.metrics.add(maps[phrase], mask, key=(index, j),
                               binary_truth=original.pairs[j][1] if square else None)
            if result.boundary is not None:
                result.boundary.add(maps[phrase], mask, key=(index, j))
    segmenter.reset_image()
    if n == 1 and not len(result.metrics):
        reasons = [f"unreadable examples: {len(result.skipped)} (the first, {result.skipped[0][0]}: "
                   f"{result.skipped[0][1]})"] if result.skipped else []
        if result.examples and not include_absent:
            reasons.append(f"readable examples: {result.examples}, their phrases all absent; include absent phrases "
                           "to score them")
        raise LdznetError(f"{source.description}: no phrases to evaluate" + (f" ({'; '.join(reasons)})"
                                                                               if reasons else ""))
    return result


def merge_results(results: Sequence[EvalResult]) -> list[EvalResult]:
    """Shards merged into whole evaluations, grouped by model name and data in first-seen order.

    Each group must hold every shard 1..N of one N exactly once, with the same settings;
    an unsharded result is its own group (shard 1/1).
    """
    groups: dict[tuple, list[EvalResult]] = {}
    for result in results:
        groups.setdefault((result.name, result.data), []).append(result)
    merged = []
    for (name, data), parts in groups.items():
        first = parts[0].settings()
        for part in parts[1:]:
            other = part.settings()
            differ = [f"{key} {first.get(key, 'unset')} vs {other.get(key, 'unset')}"
                      for key in dict.fromkeys([*first, *other]) if first.get(key) != other.get(key)]
            if differ:
                raise LdznetError(f"{name} on {data}: the parts were not made alike: {'; '.join(differ)}")
        count = parts[0].shard[1]
        shards = sorted(p.shard[0] for p in parts)
        if len(shards) != count or shards != list(range(1, count + 1)):  # no list of a crafted N's length
            raise LdznetError(f"{name} on {data}: expected shards 1..{count} of {count} once each, got "
                              f"{', '.join(map(str, shards))}")
        try:
            metrics = SegmentationMetrics.merge([p.metrics for p in parts])
            boundary = None if parts[0].boundary is None else BoundaryMetrics.merge([p.boundary for p in parts])
        except ValueError as error:
            raise LdznetError(f"{name} on {data}: {error}") from error
        if not len(metrics):
            raise LdznetError(f"{name} on {data}: no phrases were scored in any shard")
        merged.append(EvalResult(name, data, metrics, sum(p.seconds for p in parts), sum(p.examples for p in parts),
                                 sorted(s for p in parts for s in p.skipped), (1, 1), parts[0].square,
                                 parts[0].include_absent, boundary, parts[0].presence, parts[0].setup))
    return merged
