"""`ldznet batch INPUT_DIR EXPR -o OUT_DIR`: masks for a whole folder, resumable and shardable.

The work is :func:`ldznet_ext.batch.run_batch`, the engine the WebUI's LD-ZNet tab runs too; this
module reads the arguments, checks the folders and the manifest before the models load, and
reports. The manifest's "settings" are the job's (:meth:`MaskJob.manifest_settings`, as the tab
writes them) with what was loaded and how (model, head, device, dtype, sampling).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..batch import (MANIFEST_NAME, BatchCallbacks, BatchJob, Manifest, check_folders, check_manifest, check_resume,
                     run_batch)
from ..limits import BATCH_SIZE, bounded_number
from . import one_line
from .common import add_model_arguments, add_shard_argument, segmenter_from_args
from .mask import add_mask_arguments, job_from_args


class ProgressBar(BatchCallbacks):
    """run_batch -> a tqdm bar on stderr (shown only on a terminal) and one line per failed file."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def started(self, total: int) -> None:
        self.bar = tqdm(total=total, unit="image", desc="ldznet batch", disable=None, file=sys.stderr)

    def file_done(self, entry: dict) -> None:
        error, name = entry["error"], Path(entry["input"]).name
        if error:  # image errors already start with the file name
            self.bar.write(one_line(error if error.startswith(f"{name}:") else f"{name}: {error}"), file=sys.stderr)
        self.bar.update(1)

    def finished(self) -> None:
        self.bar.close()


def _run(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    input_dir, output_dir = Path(args.input_dir), Path(args.output)
    manifest_path = Path(args.manifest) if args.manifest else output_dir / MANIFEST_NAME
    check_manifest(manifest_path, check_folders(input_dir, output_dir, args.instances), output_dir)  # before models
    # OUT_DIR's own manifest too: a run given a new --manifest would skip that job's masks as its own.
    manifests = dict.fromkeys([manifest_path, output_dir / MANIFEST_NAME])
    for path in manifests:
        check_resume(path, job.expression, job.manifest_settings(), args.overwrite)
    segmenter, loaded = segmenter_from_args(args, job.refine_settings())
    loaded.pop("refine")  # the job's refine, refine_strength and refine_radius say it
    settings = {**job.manifest_settings(), **loaded}
    for path in manifests:  # the model and its sampling are known once loaded
        check_resume(path, job.expression, settings, args.overwrite)
    batch = BatchJob(input_dir, output_dir, job.tree(), job.expression, job.mask_options(), settings,
                     args.overwrite, args.shard, args.batch_size, args.max_pixels, instances=args.instances)
    try:
        with Manifest(manifest_path) as manifest:
            summary = run_batch(batch, segmenter, manifest, ProgressBar())
    except KeyboardInterrupt:
        print("ldznet batch: interrupted; finished masks are kept, run the same command again to resume",
              file=sys.stderr)
        return 130
    counts = summary.counts
    print(f"{counts['ok']} written{summary.empty_note}, {counts['skipped']} skipped (already done), "
          f"{counts['error']} failed" + (f"; see {manifest_path}" if counts["error"] else ""))
    return summary.exit_status


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch", help="write masks for every image of a folder (resumable)",
        description="Write OUT_DIR/{stem}.png, the mask of EXPR, for every image INPUT_DIR/{stem}.{ext}\n"
                    "(png, jpg, jpeg, webp, bmp, tif, tiff): the names A1111's inpaint batch mask folder\n"
                    "looks up. Masks already in OUT_DIR are skipped, so an interrupted run resumes.",
        epilog="Every file gets a line in the JSONL manifest: input, expression, settings, output,\n"
               "status (ok, skipped or error), error, seconds, and for a written mask each term's found\n"
               "and score (and with --instances the objects). Exit status: 0 all ok or skipped,\n"
               "1 some files failed, 2 bad arguments or models, 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder of images (not searched recursively)")
    parser.add_argument("expression", metavar="EXPR", help='mask expression, e.g. "cat OR dog"')
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the masks")
    parser.add_argument("--overwrite", action="store_true", help="redo masks that already exist")
    parser.add_argument("--instances", action="store_true",
                        help="also write each object of a mask as OUT_DIR/instances/{stem}-{k}.png, k = 1.. left "
                             "to right, listed in the manifest")
    add_shard_argument(parser, "every N-th of the sorted files, to split a folder between N processes")
    parser.add_argument("--batch-size", type=bounded_number(BATCH_SIZE), default=4, metavar="B",
                        help=f"same-size images predicted together, 1..{BATCH_SIZE.high} (default 4)")
    parser.add_argument("--manifest", metavar="PATH", help=f"JSONL log, appended (default OUT_DIR/{MANIFEST_NAME})")
    add_mask_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(func=_run)
