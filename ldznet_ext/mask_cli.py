"""`ldznet mask IMAGE EXPR -o MASK.png`: one image, one mask expression, up to three PNGs.

The model and mask options are defined here once (``add_model_arguments``,
``add_mask_arguments``) and shared with `ldznet batch`. Cheap checks (expression, options,
image, output names) run before any model is loaded, so a typo costs no model load.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from .errors import LdznetError
from .images import MAX_PIXELS, load_image
from .limits import (DEVICE_NAMES, DRAWS, FEATHER, GROW, KEEP_LARGEST, MIN_AREA, PIXELS, REFINE_RADIUS,
                     REFINE_STRENGTH, RESOLUTION, SEED, THRESHOLD, TIMESTEP, bounded_number, device_name)
from .loading import DTYPES, load_segmenter, resolve_model_paths, with_grow
from .masks.expression import parse
from .masks.ops import MaskOptions
from .masks.tree import Expression
from .refine import RefineSettings
from .outputs import same_file, writable_path, write_mask, write_overlay, write_probability, writing
from .segmenter import Segmenter

EPILOG = """examples:
  ldznet mask photo.jpg "goblin OR sword" -o mask.png --overlay check.png
  ldznet mask photo.jpg "face{-4} AND NOT hair" -o mask.png --feather 4
  ldznet mask photo.jpg "cat" --model sd15.safetensors --zero-shot -o mask.png

Without --model the embedded micro model (and its head) is used. Masks are white where the
expression holds (the area to repaint), at the image's own size; their edges follow the image's
(--no-refine: plain bilinear upsampling of the model's maps). Exit status: 0 done,
1 a system error, 2 bad input (message on stderr), 130 interrupted."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --head/--zero-shot, sampling settings, --device, --dtype, --max-pixels."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="SD.safetensors",
                       help="SD v1 single-file checkpoint (default: the embedded micro model)")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--head", metavar="HEAD.safetensors",
                       help="LD-ZNet/ZNet head trained for the model (default: the embedded head, "
                            "only with the embedded model)")
    which.add_argument("--zero-shot", action="store_true",
                       help="no head: masks from where the text changes the SD model's noise prediction")
    group.add_argument("--resolution", type=bounded_number(RESOLUTION), metavar="R",
                       help="working side in pixels, 64..2048 (area about R^2, sides multiples of 64; default: "
                            "the head's, 384 zero-shot)")
    group.add_argument("--timestep", type=bounded_number(TIMESTEP), metavar="T",
                       help="SD timestep of the feature step, 0..999 (default: the head's, 400 zero-shot)")
    group.add_argument("--draws", type=bounded_number(DRAWS), metavar="K",
                       help="noise draws averaged, 1..64 (default: 1 with a head, 4 zero-shot)")
    group.add_argument("--seed", type=bounded_number(SEED), default=0, metavar="S",
                       help="noise seed, 0..2^63-1 (default 0)")
    group.add_argument("--device", type=device_name, default="auto", metavar="D",
                       help=f"{DEVICE_NAMES} (default auto: CUDA, then MPS, then the CPU)")
    group.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                       help="compute precision (default fp32; fp16 falls back to fp32 on the CPU)")
    group.add_argument("--max-pixels", type=bounded_number(PIXELS), default=MAX_PIXELS, metavar="N",
                       help=f"refuse larger images before decoding them, 1..{PIXELS.high:,} (default {MAX_PIXELS:,})")


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    """--threshold, --grow, --feather, --invert, --keep-largest, --min-area, and the edge refinement
    (--no-refine, --refine-strength, --refine-radius)."""
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
    group.add_argument("--no-refine", action="store_true",
                       help="upsample the model's maps bilinearly instead of snapping their edges to the image's")
    group.add_argument("--refine-strength", type=bounded_number(REFINE_STRENGTH), default=1.0, metavar="S",
                       help="edge refinement strength, 0 (bilinear) .. 1 (default 1)")
    group.add_argument("--refine-radius", type=bounded_number(REFINE_RADIUS), metavar="PX",
                       help=f"how far (output pixels, 1..{REFINE_RADIUS.high:g}) refinement may move an edge "
                            "(default: two latent pixels)")


def expression_from_args(args: argparse.Namespace) -> Expression:
    """The parsed expression with --grow applied (ExpressionError for malformed text)."""
    return with_grow(parse(args.expression), args.grow)


def mask_options_from_args(args: argparse.Namespace) -> MaskOptions:
    """The MaskOptions of --threshold, --invert, --keep-largest, --min-area and --feather."""
    return MaskOptions(threshold=args.threshold, invert=args.invert, keep_largest=args.keep_largest,
                       min_area=args.min_area, feather=args.feather)


def refine_settings_from_args(args: argparse.Namespace) -> RefineSettings:
    """The RefineSettings of --no-refine, --refine-strength and --refine-radius."""
    return RefineSettings(enabled=not args.no_refine, strength=args.refine_strength, radius=args.refine_radius)


def segmenter_from_args(args: argparse.Namespace) -> tuple[Segmenter, dict]:
    """The Segmenter the arguments describe, and a JSON-ready record of what was loaded and how."""
    model, head = resolve_model_paths(args.model, args.head, args.zero_shot)
    segmenter = load_segmenter(model, head, device=args.device, dtype=args.dtype, resolution=args.resolution,
                               timestep=args.timestep, draws=args.draws, seed=args.seed)
    segmenter = segmenter.with_settings(refine=refine_settings_from_args(args))
    # Only the settings that apply: a head run has no zero-shot settings and vice versa.
    unused = {"resolution", "timestep", "draws"} if segmenter.zero_shot else {"resolution", "zero_shot"}
    record = {"model": str(model), "head": str(head) if head else None, "device": str(segmenter.backbone.device),
              "dtype": str(segmenter.backbone.dtype).replace("torch.", ""), "resolution": segmenter.resolution,
              **{k: v for k, v in asdict(segmenter.settings).items() if k not in unused}}
    return segmenter, record


def check_png_outputs(image: str | Path, outputs: list[str | Path]) -> None:
    """Output names must end in .png, differ from each other and from the input image, and be writable
    (their folders are created)."""
    seen = {image: "the input image"}
    for output in outputs:
        if Path(output).suffix.lower() != ".png":
            raise LdznetError(f"{output}: outputs are PNG files; give a name ending in .png")
        for other, name in seen.items():
            if same_file(output, other):
                raise LdznetError(f"{output}: the same file as {name}; give each output its own name")
        seen[output] = str(output)
        writable_path(output)


def _run_mask(args: argparse.Namespace) -> int:
    outputs = [p for p in (args.output, args.overlay, args.probability) if p is not None]
    check_png_outputs(args.image, outputs)
    expression = expression_from_args(args)
    options = mask_options_from_args(args)
    image = load_image(args.image, max_pixels=args.max_pixels)
    segmenter, _ = segmenter_from_args(args)
    segmenter.set_image(image, max_pixels=args.max_pixels)
    prediction = segmenter.predict(expression, options)
    mask = prediction.mask_image()
    writers = [(args.output, lambda path: write_mask(path, mask)),
               (args.probability, lambda path: write_probability(path, prediction.probability_image())),
               (args.overlay, lambda path: write_overlay(path, image, mask))]
    for path, write in writers:
        if path is None:
            continue
        with writing(path):
            write(path)
    selected = float((mask >= 128).mean()) * 100
    print(f"{args.output}: {mask.shape[1]}x{mask.shape[0]}, {selected:.1f}% selected by {expression}")
    return 0


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
                        help="also write the expression's probability map as 16-bit grey")
    add_mask_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(func=_run_mask)
