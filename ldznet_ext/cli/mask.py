"""`ldznet mask IMAGE EXPR -o MASK.png`: one image, one mask expression, up to three PNGs.

The mask options are defined here once (``add_mask_arguments``) and shared with `ldznet batch`;
:func:`job_from_args` turns them into the :class:`~ldznet_ext.job.MaskJob` every front end builds.
Cheap checks (expression, options, image, output names) run before any model is loaded, so a typo
costs no model load.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from PIL import Image

from ..errors import LdznetError
from ..images import load_image
from ..job import HEAD_MODE, ZERO_SHOT_MODE, MaskJob
from ..limits import FEATHER, GROW, KEEP_LARGEST, MIN_AREA, REFINE_RADIUS, REFINE_STRENGTH, THRESHOLD, bounded_number
from ..masks.expression import parse
from ..masks.instances import Instance, instance_image
from ..outputs import (check_outputs, mask_image, png_writer, probability_image, render_overlay, same_file,
                       selected_share, write_mask, write_together, writing)
from ..segmenter import Prediction
from .common import add_model_arguments, segmenter_from_args

NO_MATCH_STATUS = 3  # --require-match and the mask selects nothing

EPILOG = """examples:
  ldznet mask photo.jpg "goblin OR sword" -o mask.png --overlay check.png
  ldznet mask photo.jpg "face{-4} AND NOT hair" -o mask.png --feather 4
  ldznet mask photo.jpg "cat" --model sd15.safetensors --zero-shot -o mask.png
  ldznet mask photo.jpg "stars[1] OR moon" -o mask.png     (the leftmost star, and the moon)
  ldznet mask photo.jpg "face" -o face.png --instances     (face-1.png, face-2.png, face-instances.json)

Without --model the embedded micro model (and its head) is used. Masks are white where the
expression holds (the area to repaint), at the image's own size; their edges follow the image's
(--no-refine: plain bilinear upsampling of the model's maps). A term that is not in the image
selects nothing and is named on stderr ("no match for 'goblin'"). Exit status: 0 done,
1 a system error, 2 bad input (message on stderr), 3 with --require-match when the mask selects
nothing (the outputs are still written), 130 interrupted."""


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    """--threshold, --grow, --feather, --invert, --keep-largest, --min-area, --no-presence and the edge
    refinement (--no-refine, --refine-strength, --refine-radius)."""
    group = parser.add_argument_group("mask")
    group.add_argument("--threshold", type=bounded_number(THRESHOLD), default=0.5, metavar="T",
                       help="a pixel is selected when its probability is above T, 0 <= T < 1 (default 0.5)")
    group.add_argument("--grow", type=bounded_number(GROW), default=0.0, metavar="N",
                       help=f"grow the mask by N pixels (negative: shrink), at most {GROW.high:g}, before the region "
                            "filters")
    group.add_argument("--feather", type=bounded_number(FEATHER), default=0.0, metavar="R",
                       help=f"soft edge of R pixels, 0..{FEATHER.high:g} (the mask is then grey at its border)")
    group.add_argument("--invert", action="store_true", help="select everything the expression does not")
    group.add_argument("--keep-largest", type=bounded_number(KEEP_LARGEST), metavar="K",
                       help=f"keep only the K largest regions, 1..{KEEP_LARGEST.high:,}")
    group.add_argument("--min-area", type=bounded_number(MIN_AREA), default=0, metavar="A",
                       help="drop regions smaller than A pixels")
    group.add_argument("--no-presence", action="store_true",
                       help="use every term's map as it is, also of terms judged not to be in the image")
    group.add_argument("--no-refine", action="store_true",
                       help="upsample the model's maps bilinearly instead of snapping their edges to the image's")
    group.add_argument("--refine-strength", type=bounded_number(REFINE_STRENGTH), metavar="S",
                       help="edge refinement strength, 0 (bilinear) .. 1 (default 1)")
    group.add_argument("--refine-radius", type=bounded_number(REFINE_RADIUS), metavar="PX",
                       help=f"how far (output pixels, 1..{REFINE_RADIUS.high:g}) refinement may move an edge "
                            "(default: two latent pixels)")


def job_from_args(args: argparse.Namespace) -> MaskJob:
    """The MaskJob of EXPR, --zero-shot and the mask options. A malformed or empty EXPR is an
    ExpressionError here, before any work; refinement settings beside --no-refine are an LdznetError."""
    if args.no_refine and (args.refine_strength is not None or args.refine_radius is not None):
        given = "--refine-strength" if args.refine_strength is not None else "--refine-radius"
        raise LdznetError(f"{given} sets the edge refinement that --no-refine turns off; drop one of them")
    job = MaskJob(expression=args.expression, mode=ZERO_SHOT_MODE if args.zero_shot else HEAD_MODE,
                  threshold=args.threshold, grow=args.grow, feather=args.feather, invert=args.invert,
                  refine=not args.no_refine, keep_largest=args.keep_largest, min_area=args.min_area,
                  refine_radius=args.refine_radius, presence=not args.no_presence,
                  **({} if args.refine_strength is None else {"refine_strength": args.refine_strength}))
    if not job.active:  # a job may have no mask, a command needs one: the parser says what one looks like
        parse(job.expression)
    return job


def check_png_outputs(args: argparse.Namespace, outputs: list[str | Path], reports: list[str | Path] = ()) -> None:
    """Output names must end in .png (``reports``: files of other kinds, such as the instances' JSON),
    differ from each other and from the run's inputs (the image, the model files), also through a link,
    and be writable (their folders are created)."""
    for output in outputs:
        if Path(output).suffix.lower() != ".png":
            raise LdznetError(f"{output}: outputs are PNG files; give a name ending in .png")
    inputs = {args.image: "the input image", args.model: "the model", args.mask_model: "the mask model",
              args.vae: "the VAE", args.head: "the head"}
    check_outputs([*outputs, *reports], {path: what for path, what in inputs.items() if path})


def report_missing(prediction: Prediction) -> None:
    """One stderr line per term judged not to be in the image."""
    for note in prediction.missing_notes():
        print(note, file=sys.stderr)


def instance_paths(output: str | Path, count: int) -> tuple[list[Path], Path]:
    """``NAME-1.png`` .. ``NAME-count.png`` and ``NAME-instances.json`` beside ``output`` (NAME.png)."""
    output = Path(output)
    stem = output.with_suffix("")
    return [Path(f"{stem}-{k}.png") for k in range(1, count + 1)], Path(f"{stem}-instances.json")


def earlier_instance_masks(output: str | Path) -> set[Path]:
    """The instance masks that an earlier run's report beside ``output`` lists (only names of the form
    NAME-k.png); LdznetError when a file of the report's name is something else."""
    _, report = instance_paths(output, 0)
    if not report.exists():
        return set()
    try:
        entries = json.loads(report.read_text(encoding="utf-8"))["instances"]
        files = {entry["file"] for entry in entries}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LdznetError(f"{report}: exists and is not the instance report of an earlier run of -o {output} "
                          f"({type(error).__name__}); move it, or choose another -o") from error
    pattern = re.compile(re.escape(Path(output).stem) + r"-[1-9][0-9]*\.png")
    return {report.parent / name for name in files if isinstance(name, str) and pattern.fullmatch(name)}


def check_instance_names(args: argparse.Namespace, outputs: list[str | Path], count: int) -> None:
    """The outputs of a run with ``count`` instances (``outputs``: -o, --overlay, --probability), as
    :func:`check_png_outputs` checks them, and NAME-k.png beside -o NAME.png, a name the user did not give:
    not one of the other outputs, and a file there is replaced only when an earlier run's report lists it
    as its instance mask."""
    output = args.output
    paths, report = instance_paths(output, count)
    for k, path in enumerate(paths, 1):
        for option, named in (("--overlay", args.overlay), ("--probability", args.probability)):
            if named is not None and same_file(path, named):
                raise LdznetError(f"{named}: {option} names the file of instance mask {k} of -o; give it another name")
    check_png_outputs(args, outputs + paths, [report])
    earlier = earlier_instance_masks(output)
    for path in paths:
        if path.exists() and path not in earlier:
            raise LdznetError(f"{path}: exists and is no instance mask of an earlier run of -o {output}; move it, or "
                              "choose another -o")


def write_instances(output: str | Path, prediction: Prediction, instances: list[Instance],
                    feather_radius: float) -> int:
    """One mask per instance of the prediction (``prediction.instances()``) and a JSON list (order, box,
    area, score, file), at :func:`instance_paths`, which the caller has checked (:func:`check_instance_names`);
    an earlier run's instance masks beyond the new count are removed. Returns their number."""
    earlier = earlier_instance_masks(output)
    paths, report = instance_paths(output, len(instances))
    for instance, path in zip(instances, paths):
        with writing(path):
            write_mask(path, instance_image(instance, feather_radius))
    entries = [{**instance.to_dict(), "file": path.name} for instance, path in zip(instances, paths)]
    with writing(report):
        report.write_text(json.dumps({"expression": str(prediction.expression), "terms": prediction.presence_report(),
                                      "instances": entries}, indent=1) + "\n", encoding="utf-8")
    for stale in earlier - set(paths):
        stale.unlink(missing_ok=True)
    return len(instances)


def _run_mask(args: argparse.Namespace) -> int:
    outputs = [p for p in (args.output, args.overlay, args.probability) if p is not None]
    # With --instances, the first instance and the report now, every instance once they are counted.
    if args.instances:
        check_instance_names(args, outputs, 1)
    else:
        check_png_outputs(args, outputs)
    job = job_from_args(args)
    expression = job.tree()
    image = load_image(args.image, max_pixels=args.max_pixels)
    segmenter, _ = segmenter_from_args(args, job.refine_settings())
    segmenter.set_image(image, max_pixels=args.max_pixels)
    prediction = segmenter.predict(expression, job.mask_options())
    # connected regions of the full-size mask: found once, for the names' check and the files
    instances = prediction.instances() if args.instances else []
    if args.instances:  # before any file is written: MASK-k.png may be the input, --overlay or --probability
        check_instance_names(args, outputs, len(instances))
    mask = prediction.mask_image()
    images = {args.output: mask_image(mask),
              args.probability: args.probability and probability_image(prediction.probability_image()),
              args.overlay: args.overlay and Image.fromarray(render_overlay(image, mask))}
    # all together: a full disk at the last one leaves every output as it was
    with writing(", ".join(str(path) for path in images if path is not None)):
        write_together({Path(path): png_writer(picture) for path, picture in images.items() if path is not None})
    found = ""
    if args.instances:
        count = write_instances(args.output, prediction, instances, job.feather)
        found = f", {count} instance{'' if count == 1 else 's'}"
    report_missing(prediction)
    selected = selected_share(mask) * 100
    inverted = ", inverted" if job.invert else ""
    print(f"{args.output}: {mask.shape[1]}x{mask.shape[0]}, {selected:.1f}% selected by {expression}{inverted}{found}")
    return NO_MATCH_STATUS if args.require_match and not mask.any() else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "mask", help="write the mask of a text expression for one image",
        description="Write the mask of a text expression for one image: terms joined by OR, AND, NOT and\n"
                    "parentheses, with modifiers such as {+8} (grow), {-4} (shrink), {*1.5} (boost).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", metavar="IMAGE", help="the image (PNG, JPEG, WebP, ...)")
    parser.add_argument("expression", metavar="EXPR", help='mask expression, e.g. "cat OR dog"')
    parser.add_argument("-o", "--output", required=True, metavar="MASK.png",
                        help="mask to write: 8-bit grey, 255 = selected")
    parser.add_argument("--overlay", metavar="OVERLAY.png", help="also write the image with the mask in red")
    parser.add_argument("--probability", metavar="PROB.png",
                        help="also write the expression's probability map as 16-bit grey (before --invert)")
    parser.add_argument("--instances", action="store_true",
                        help="also write one mask per object, MASK-1.png, MASK-2.png, ... left to right, and "
                             "MASK-instances.json (order, box, area, score, file)")
    parser.add_argument("--require-match", action="store_true",
                        help=f"exit with status {NO_MATCH_STATUS} when the mask selects nothing")
    add_mask_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(func=_run_mask)
