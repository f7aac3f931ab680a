"""`ldznet eval`: CLIPSeg-methodology metrics of a head (or zero-shot masks) on a data source.

``ldznet eval --model sd.safetensors --head runs/a/head.safetensors --data world:test:500`` prints
a markdown table in the shape of the paper's Table 1 (``--table 2|3|4`` for the others) and
optionally writes the full result, raw counts included, as JSON. Without --model and --head it
evaluates the embedded micro model and its head.

At scale, run N processes with ``--shard K/N --json shard-K.json``, K = 1..N (one per GPU), and
combine them with ``ldznet eval --merge shard-*.json``: the merged metrics equal those of one
unsharded run exactly, and --merge refuses shards that do not cover 1..N once each. ``--merge``
also joins results of several models and data sets into one table. Shards counted from 0 before
(as they no longer do, like ``batch``'s); ``--shard 0/N`` still means the first, with a warning.
"""

from __future__ import annotations

import argparse
import json
import re
import reprlib
import sys
from pathlib import Path

from ..data.files import read_json
from ..data.spec import open_source, renders_scenes, spec_file
from ..errors import LdznetError
from ..eval.evaluate import FORMAT, READABLE_VERSIONS, VERSION, EvalResult, evaluate, merge_results
from ..eval.tables import EARLIER_TABLE, TABLES, build_table, default_table, markdown_table
from ..limits import BOUNDARY_TOLERANCE, RENDER_SIZE, SHARDS, THRESHOLD, WORKERS, bounded_number, number_from_text
from ..outputs import check_outputs, check_report_name, writing
from ..refine import RefineSettings
from ..world.scenes import VOCABULARY
from .common import add_model_arguments, add_shard_argument, parse_shard, segmenter_from_args


def eval_shard(text: str) -> tuple[int, int]:
    """``--shard``'s type: "K/N" 1-based (:func:`parse_shard`), with one line on stderr whenever it is
    given, since eval counted from 0 until version 2 of its result files: "0/N", which only the old
    counting wrote, is read as the first shard (1/N)."""
    k, _, n = text.partition("/")
    try:
        count = number_from_text(n, int) if k.strip() == "0" else None
    except ValueError:
        count = None
    if count is not None and SHARDS.accepts(count):
        print(f"ldznet eval: warning: --shard {text} counts from 0, which is deprecated: read as 1/{count} "
              f"(shards are 1..N, as in ldznet batch)", file=sys.stderr)
        return 1, count
    shard = parse_shard(text)
    print(f"ldznet eval: note: --shard counts from 1 (K = 1..N, as in ldznet batch) since eval results "
          f"version {VERSION}; --merge checks that the shards cover 1..N once each", file=sys.stderr)
    return shard


def _table_number(text: str) -> int:
    """``--table``'s type: a number written with ASCII digits (argparse then checks it is one of TABLES)."""
    try:
        return number_from_text(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, TABLES))}, got {text!r}") from None


EARLIER_RESULT = re.compile(r'\s*\{\s*"format"\s*:\s*"' + FORMAT + '"')
"""How a result that ``_report`` wrote begins (its first key is the format): only such a file is replaced."""


SKIPPED_SHOWN = 3
"""Unreadable examples a report names (a data set with thousands of them would bury the table)."""


def read_results(path: str) -> list[EvalResult]:
    """The results in an ``ldznet eval --json`` file."""
    report = read_json(path, "an eval result")
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise LdznetError(f"{path}: not written by ldznet eval --json (no \"format\": \"{FORMAT}\")")
    version = report.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # true == 1 and 2.0 == 2 in Python
        raise LdznetError(f"{path}: eval result version {version}, this ldznet reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    results = report.get("results", [])
    if not isinstance(results, list):
        raise LdznetError(f"{path}: 'results' must be a list of eval results, got {reprlib.repr(results)}")
    return [EvalResult.from_dict(r, f"{path} result {i}", version) for i, r in enumerate(results)]


def _report(results: list[EvalResult], args: argparse.Namespace) -> int:
    complete = [r for r in results if r.shard[1] == 1]
    table = build_table(complete, args.table or default_table(complete)) if complete else None
    if table:
        print(markdown_table(table))
        for r in complete:
            s = r.summary
            print(f"\n{r.name} on {r.data}: {s.count} masks of {r.examples} examples"
                  f"{f' ({len(r.skipped)} unreadable, skipped)' if r.skipped else ''}; best mIoU at t = "
                  f"{s.miou_threshold:.2f}, IoU_FG at t = {s.iou_fg_threshold:.2f}; mean/cum IoU at t = "
                  f"{s.binary_threshold:g}; {r.ms_per_mask:.1f} ms per mask")
            for index, reason in r.skipped[:SKIPPED_SHOWN]:
                print(f"  unreadable example {index}: {reason}")
            if len(r.skipped) > SKIPPED_SHOWN:
                print(f"  and {len(r.skipped) - SKIPPED_SHOWN} more (every one in the --json result's 'skipped')")
            if r.include_absent:
                a = r.absent_summary
                print(f"absent phrases{' (presence decided)' if r.presence else ''}: {a.absent_empty} of {a.absent} "
                      f"returned empty ({100 * a.absent_empty_share:.1f} %, no pixel above t = "
                      f"{s.binary_threshold:g}); "
                      f"present phrases: {a.present}, mIoU {100 * a.present_miou:.2f} at t = "
                      f"{a.present_miou_threshold:.2f}")
            if r.boundary is not None and len(r.boundary):
                b = r.boundary.summary()
                print(f"boundary F (within {b.tolerance:g} px, {b.count} masks): {100 * b.boundary_f:.1f} at best "
                      f"t = {b.boundary_f_threshold:.1f}, {100 * b.boundary_f_at_binary:.1f} at t = "
                      f"{b.binary_threshold:g}")
    for r in results:
        if r.shard[1] > 1:
            print(f"{r.name} on {r.data}: shard {r.shard[0]}/{r.shard[1]}, {len(r.metrics)} masks of {r.examples} "
                  f"examples, {len(r.skipped)} skipped; merge all shards with ldznet eval --merge")
    if args.json:
        report = {"format": FORMAT, "version": VERSION, "table": table, "results": [r.to_dict() for r in results]}
        with writing(args.json):  # a full disk after a long evaluation: the table above is still printed
            Path(args.json).write_text(json.dumps(report) + "\n", encoding="utf-8")
    if args.markdown and table:
        with writing(args.markdown):
            Path(args.markdown).write_text(f"{table['title']}\n\n{markdown_table(table)}\n", encoding="utf-8")
    return 0


def _inputs(args: argparse.Namespace) -> dict[str, str]:
    """The files the run reads by name (path -> what it is), which its outputs must not overwrite."""
    named = {args.model: "the model", args.mask_model: "the mask model", args.vae: "the VAE", args.head: "the head",
             spec_file(args.data or ""): f"the data {args.data}"}
    named |= {path: "a result to merge" for path in args.merge or ()}
    return {path: what for path, what in named.items() if path}


def _run(args: argparse.Namespace) -> int:
    check_outputs((args.json, args.markdown), _inputs(args))  # before the work, so none of it is lost to a bad path
    check_report_name(args.json, (".json",), "--json", EARLIER_RESULT, "an earlier ldznet eval --json result")
    check_report_name(args.markdown, (".md", ".markdown"), "--markdown", EARLIER_TABLE,
                      "an earlier ldznet eval --markdown table")
    if args.merge:
        given = [flag for dest, (flag, default) in args.evaluation_defaults.items() if getattr(args, dest) != default]
        if given:
            raise LdznetError(f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} an evaluation, and "
                              "--merge evaluates nothing: it combines the results as they were made; drop "
                              f"{'it' if len(given) == 1 else 'them'} or --merge")
        return _report(merge_results([r for path in args.merge for r in read_results(path)]), args)
    if args.size is not None and renders_scenes(args.data) is False:
        raise LdznetError(f"--size is the size micro-world scenes are rendered at, and {args.data} is not rendered "
                          "(world:SPLIT:N is): drop --size")
    if args.shard[1] > 1 and (args.markdown or args.table):
        flag = "--markdown" if args.markdown else "--table"
        raise LdznetError(f"{flag} makes a table of the whole evaluation, and --shard {args.shard[0]}/{args.shard[1]} "
                          f"evaluates part of it: write each shard's --json, then ldznet eval --merge them with {flag}")
    segmenter, loaded = segmenter_from_args(args, RefineSettings(enabled=False) if args.no_refine else None)
    source = open_source(args.data, size=args.size or segmenter.resolution, domain=args.domain)
    name = args.name or (Path(loaded["head"]).stem if loaded["head"] else "zero-shot")
    result = evaluate(segmenter, source, name, include_absent=args.include_absent, binary_threshold=args.threshold,
                      shard=args.shard, workers=args.workers, square=args.square, boundary=args.boundary,
                      presence=args.presence, setup=eval_setup(loaded, args.size or segmenter.resolution))
    return _report([result], args)


def eval_setup(loaded: dict, size: int) -> dict:
    """What an evaluation's maps depend on beyond its data, for ``merge_results`` to compare: the files by
    name (shards may run on machines with other paths), precision and settings, the render size; not the
    device (shards run on several) nor captured CUDA graphs (equal to eager)."""
    files = ("model", "head", "mask_model", "vae")
    setup = {key: Path(value).name if key in files and value else value for key, value in loaded.items()
             if key not in ("device", "cuda_graphs")}
    return json.loads(json.dumps({**setup, "size": size}))  # as the result file will hold it: tuples as lists


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a head or zero-shot masks (mIoU, IoU_FG, AP), or merge results")
    which = add_model_arguments(p, sampling=False)
    which.add_argument("--merge", nargs="+", metavar="RESULT.json",
                       help="merge the --json results of shards (and of other models or data sets) into one table")
    p.add_argument("--data", default="world:test:500", metavar="SPEC",
                   help="data spec: world:SPLIT:N, PATH.jsonl, phrasecut:DIR:SPLIT, refcoco:DIR:SPLIT, aigi:DIR ... "
                        "(docs/datasets.md; default world:test:500)")
    p.add_argument("--name", help="the method's name in the table (default: the head's file name)")
    add_shard_argument(p, "examples K, K+N, K+2N, ... counted from 1 (merge the N --json files with --merge)",
                       eval_shard)
    p.add_argument("--workers", type=bounded_number(WORKERS), default=0,
                   help="processes that read examples ahead, 0..64 (default 0)")
    p.add_argument("--square", type=bounded_number(RENDER_SIZE), metavar="N",
                   help="squash each image and mask to N x N (8..4096) first, CLIPSeg's PhraseCut test protocol "
                        "(the paper: 384)")
    p.add_argument("--domain", choices=VOCABULARY.domains, help="render micro-world scenes in one domain")
    p.add_argument("--size", type=bounded_number(RENDER_SIZE),
                   help="micro-world render size, 8..4096 (default: the model's working resolution); "
                        "larger than the working size scores the upsampling too, e.g. 512")
    p.add_argument("--no-refine", action="store_true",
                   help="upsample each map bilinearly instead of guided by the image (refine.py)")
    p.add_argument("--boundary", type=bounded_number(BOUNDARY_TOLERANCE), nargs="?", const=2.0, metavar="PX",
                   help="also score edges: boundary F-score, edges matched within PX pixels, 0 < PX <= 64 (default 2); "
                        "printed, in the JSON and merged")
    p.add_argument("--include-absent", action="store_true",
                   help="also score absent phrases (empty masks); CLIPSeg and PhraseCut score present ones only")
    p.add_argument("--presence", action="store_true",
                   help="decide each phrase found or not first (the head's presence output, else the calibrated "
                        "rule on its map) and score a phrase not found as an empty map; with --include-absent, "
                        "also print the share of absent phrases returned empty and the present phrases' mIoU")
    p.add_argument("--threshold", type=bounded_number(THRESHOLD), default=0.5,
                   help="threshold of the binary mean/cumulative IoU, 0 <= T < 1 (default 0.5)")
    p.add_argument("--table", type=_table_number, choices=tuple(TABLES),
                   help="table shape: 1 PhraseCut, 2 AIGI, 3 RefCOCO family, 4 ablation (default 1, or 3 for "
                        "several RefCOCO-family data sets)")
    p.add_argument("--json", metavar="OUT.json", help="write the results (raw counts included) and the table as JSON")
    p.add_argument("--markdown", metavar="OUT.md", help="write the markdown table")
    merging = {"--merge", "--table", "--json", "--markdown", "-h"}  # what --merge reads, or --help
    p.set_defaults(func=_run, evaluation_defaults={
        action.dest: (action.option_strings[0], action.default) for action in p._actions
        if action.option_strings and not merging & set(action.option_strings)})
