"""`ldznet data summary SPEC...`: count and validate data sets before a long run starts.

Every example of each source is read (in ``--workers`` processes): images, phrases, present and
absent phrases, distinct phrases, image sizes, the area of present masks as a fraction of their
image, and every unreadable example with its reason. The command exits 1 when a source cannot be
opened, an example cannot be read, or a source has no present phrase; 0 when all is usable.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data.examples import Source
from ..data.spec import open_source, spec_file
from ..data.stream import iterate_examples
from ..errors import LdznetError
from ..limits import EXAMPLES, RENDER_SIZE, WORKERS, bounded_number
from ..outputs import check_outputs, check_report_name, writing

SHOWN_ERRORS = 10


@dataclass
class DataSummary:
    """Counts of one source; ``areas`` are present masks' fractions of their image in [0, 1]."""

    spec: str
    description: str = ""
    examples: int = 0
    read: int = 0
    phrases: int = 0
    present: int = 0
    absent: int = 0
    distinct_phrases: int = 0
    min_size: tuple[int, int] | None = None  # (width, height) of the smallest image by area
    max_size: tuple[int, int] | None = None
    area: dict[str, float] = field(default_factory=dict)  # min, mean, median, max of mask fractions
    errors: list[tuple[int, str]] = field(default_factory=list)
    open_error: str | None = None

    @property
    def valid(self) -> bool:
        return self.open_error is None and not self.errors and self.present > 0


def summarize(spec: str, size: int = 128, workers: int = 0, limit: int | None = None) -> DataSummary:
    """Open ``spec`` and read (the first ``limit`` of) its examples; never raises for bad data."""
    summary = DataSummary(spec)
    try:
        source: Source = open_source(spec, size=size)
    except LdznetError as error:
        summary.open_error = str(error)
        return summary
    summary.description = source.description
    summary.examples = len(source) if limit is None else min(limit, len(source))
    phrases, areas, sizes = set(), [], []
    for _, example in iterate_examples(source, range(summary.examples), workers,
                                       on_error=lambda i, e: summary.errors.append((i, str(e)))):
        summary.read += 1
        height, width = example.image.shape[:2]
        sizes.append((width * height, width, height))
        for phrase, mask in example.pairs:
            phrases.add(phrase)
            pixels = int(np.count_nonzero(mask))
            summary.phrases += 1
            if pixels:
                summary.present += 1
                areas.append(pixels / mask.size)
            else:
                summary.absent += 1
    summary.distinct_phrases = len(phrases)
    if sizes:
        summary.min_size, summary.max_size = min(sizes)[1:], max(sizes)[1:]
    if areas:
        a = np.asarray(areas)
        summary.area = {"min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
                        "max": float(a.max())}
    return summary


def format_summary(s: DataSummary) -> str:
    """A human-readable block for one source."""
    if s.open_error:
        return f"## {s.spec}\nINVALID: cannot open: {s.open_error}"
    lines = [f"## {s.description}",
             f"- images: {s.examples} ({s.read} read, {len(s.errors)} unreadable)",
             f"- phrases: {s.phrases} ({s.present} present, {s.absent} absent; {s.distinct_phrases} distinct)"]
    if s.min_size:
        lines.append(f"- image sizes: {s.min_size[0]}x{s.min_size[1]} .. {s.max_size[0]}x{s.max_size[1]}")
    if s.area:
        lines.append("- present mask area, % of the image: " + ", ".join(
            f"{k} {100 * v:.2f}" for k, v in s.area.items()))
    lines += [f"- unreadable example {i}: {reason}" for i, reason in s.errors[:SHOWN_ERRORS]]
    if len(s.errors) > SHOWN_ERRORS:
        lines.append(f"- ... and {len(s.errors) - SHOWN_ERRORS} more unreadable examples")
    lines.append("OK" if s.valid else "INVALID: " + ("unreadable examples" if s.errors else "no present phrase"))
    return "\n".join(lines)


EARLIER_SUMMARY = re.compile(r'\s*\[\s*\{\s*"spec"\s*:')
"""How the summaries ``_summary`` writes begin (a list of objects whose first key is the spec)."""


def _summary(args: argparse.Namespace) -> int:
    check_outputs((args.json,), {path: f"the data {spec}" for spec in args.specs if (path := spec_file(spec))})
    check_report_name(args.json, (".json",), "--json", EARLIER_SUMMARY, "an earlier ldznet data summary --json")
    summaries = []
    for spec in args.specs:
        summaries.append(summarize(spec, args.size, args.workers, args.limit))
        print(format_summary(summaries[-1]) + "\n")
    if args.json:
        with writing(args.json):
            Path(args.json).write_text(json.dumps([{**asdict(s), "valid": s.valid} for s in summaries], indent=1)
                                       + "\n", encoding="utf-8")
    return 0 if all(s.valid for s in summaries) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="inspect training and evaluation data")
    p.set_defaults(func=lambda _: p.print_help() or 2)
    commands = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    s = commands.add_parser("summary", help="count and validate data sets (exit 1 if anything is unusable)")
    s.add_argument("specs", nargs="+", metavar="SPEC",
                   help="data specs: world:SPLIT:N, PATH.jsonl, phrasecut:DIR:SPLIT, refcoco:DIR:SPLIT, aigi:DIR ... "
                        "(docs/datasets.md)")
    s.add_argument("--workers", type=bounded_number(WORKERS), default=0,
                   help="processes reading examples, 0..64 (default 0: this one)")
    s.add_argument("--limit", type=bounded_number(EXAMPLES),
                   help="read only the first N examples of each source")
    s.add_argument("--size", type=bounded_number(RENDER_SIZE), default=128,
                   help="render size of micro-world specs, 8..4096 (default 128)")
    s.add_argument("--json", metavar="OUT.json", help="also write the summaries as JSON")
    s.set_defaults(func=_summary)
