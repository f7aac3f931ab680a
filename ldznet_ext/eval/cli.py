"""`ldznet eval`: CLIPSeg-methodology metrics of a head (or zero-shot masks) on a data source.

``ldznet eval --model sd.safetensors --head runs/a/head.safetensors --data world:test:500`` prints
a markdown table (mIoU, IoU_FG, AP, PhraseCut mean and cumulative IoU at a fixed threshold,
milliseconds per mask) and optionally writes the full numbers as JSON. Without --model and
--head it evaluates the embedded micro model and its head.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..loading import DTYPES, load_segmenter, resolve_model_paths
from ..train.data import open_source
from ..world.scenes import VOCABULARY
from .evaluate import evaluate


def _run(args: argparse.Namespace) -> int:
    model, head = resolve_model_paths(args.model, args.head, args.zero_shot)
    segmenter = load_segmenter(model, head, device=args.device, dtype=args.dtype, resolution=args.resolution)
    source = open_source(args.data, size=args.size or segmenter.resolution, domain=args.domain)
    result = evaluate(segmenter, source, head.stem if head else "zero-shot", include_absent=args.include_absent,
                      binary_threshold=args.threshold)
    print(result.table_header())
    print(result.table_row())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a head or zero-shot masks (mIoU, IoU_FG, AP)")
    p.add_argument("--model", metavar="SD.safetensors", help="SD v1 checkpoint (default: the embedded micro model)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--head", metavar="HEAD.safetensors", help="a trained or converted head")
    which.add_argument("--zero-shot", action="store_true", help="masks from the SD model alone")
    p.add_argument("--data", default="world:test:500", metavar="SPEC",
                   help="world:SPLIT:N, world:FILE.npz, jsonl:PATH or PATH.jsonl (default world:test:500)")
    p.add_argument("--domain", choices=VOCABULARY.domains, help="render micro-world scenes in one domain")
    p.add_argument("--size", type=int, help="micro-world render size (default: the model's working resolution)")
    p.add_argument("--resolution", type=int, help="working resolution (default: the head's training resolution)")
    p.add_argument("--include-absent", action="store_true",
                   help="also score absent phrases (empty masks); CLIPSeg and PhraseCut score present ones only")
    p.add_argument("--threshold", type=float, default=0.5, help="threshold of the binary mean/cumulative IoU")
    p.add_argument("--json", metavar="OUT.json", help="write all numbers as JSON")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.set_defaults(func=_run)
