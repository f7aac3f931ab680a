"""The options several commands share, defined once: the model arguments, ``--device`` and ``--shard``.

``ldznet mask``, ``batch`` and ``eval`` take the model arguments (:func:`add_model_arguments`),
``demo`` and ``train`` the parts that apply to them (:func:`add_device_argument`). Every bound comes
from ``limits.py``, every ``--device`` defaults to ``auto`` and every ``--shard K/N`` is 1-based.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..checkpoint_io import named_path
from ..images import MAX_PIXELS
from ..limits import (DEVICE_NAMES, DRAWS, PIXELS, RESOLUTION, SEED, SHARDS, TIMESTEP, bounded_number, device_name,
                      number_from_text)
from ..errors import LdznetError
from ..loading import load_segmenter, resolve_mask_model, resolve_model_paths
from ..precision import DTYPES
from ..refine import RefineSettings
from ..segmenter import Segmenter
from ..zeroshot import ZERO_SHOT_RESOLUTION, ZeroShotSettings

ZERO_SHOT = ZeroShotSettings()  # the defaults the help texts name

DEFAULT_DEVICE = "auto"


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, note: str = "") -> None:
    """``--device`` (default auto: CUDA, then MPS, then the CPU); ``note`` is appended to its help."""
    parser.add_argument("--device", type=device_name, default=DEFAULT_DEVICE, metavar="D",
                        help=f"{DEVICE_NAMES} (default auto: CUDA, then MPS, then the CPU){note}")


def add_model_arguments(parser: argparse.ArgumentParser, sampling: bool = True) -> argparse._MutuallyExclusiveGroup:
    """--model, --head/--zero-shot, --resolution, --device, --dtype and, with ``sampling``, --timestep,
    --draws, --seed and --max-pixels. Returns the --head/--zero-shot group, so that a command can
    add a third choice (``eval --merge``)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="SD.safetensors",
                       help="SD single-file checkpoint: SD 1.x for a head or zero-shot, SDXL family or SD 2.x for "
                            "zero-shot (default: the embedded micro model)")
    group.add_argument("--mask-model", metavar="SD1.safetensors",
                       help="SD 1.x checkpoint (single file or diffusers folder) the head runs on when --model cannot "
                            "serve one (SDXL family, SD 2.x); needs --head")
    group.add_argument("--vae", metavar="VAE.safetensors",
                       help="VAE file used in place of --model's VAE, or where its file has none (ldm or diffusers "
                            "layout, a diffusers vae/ folder, or a checkpoint whose VAE is taken)")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--head", metavar="HEAD.safetensors",
                       help="LD-ZNet/ZNet head trained for the model (default: the embedded head, "
                            "only with the embedded model)")
    which.add_argument("--zero-shot", action="store_true",
                       help="no head: masks from the SD model's own text cross-attention")
    group.add_argument("--resolution", type=bounded_number(RESOLUTION), metavar="R",
                       help="working side in pixels, 64..2048 (area about R^2, sides multiples of 64; default: "
                            f"the head's, zero-shot the model file's recorded side, else {ZERO_SHOT_RESOLUTION})")
    if sampling:
        group.add_argument("--timestep", type=bounded_number(TIMESTEP), metavar="T",
                           help=f"SD timestep of the feature step, 0..999 (default: the head's, "
                                f"{ZERO_SHOT.timestep} zero-shot)")
        group.add_argument("--draws", type=bounded_number(DRAWS), metavar="K",
                           help=f"noise draws averaged, 1..64 (default: 1 with a head, {ZERO_SHOT.draws} zero-shot)")
        group.add_argument("--seed", type=bounded_number(SEED), default=0, metavar="S",
                           help="noise seed, 0..2^63-1 (default 0)")
    add_device_argument(group)
    group.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                       help="compute precision (default fp32; fp16 falls back to fp32 on the CPU)")
    group.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="on CUDA, run every model call eagerly instead of replaying captured graphs "
                            "(same masks; graphs save launch overhead but hold GPU memory)")
    if sampling:
        group.add_argument("--max-pixels", type=bounded_number(PIXELS), default=MAX_PIXELS, metavar="N",
                           help=f"refuse larger images before decoding them, 1..{PIXELS.high:,} "
                                f"(default {MAX_PIXELS:,})")
    return which


def segmenter_from_args(args: argparse.Namespace, refine: RefineSettings | None = None) -> tuple[Segmenter, dict]:
    """The Segmenter the model arguments describe (with ``refine``, when given), and a JSON-ready
    record of what was loaded and how. Options a command lacks take the library's defaults."""
    mask_model = resolve_mask_model(args.mask_model, args.head, args.zero_shot)
    if args.vae is not None and args.model is None:
        raise LdznetError(f"{named_path(args.vae).name}: --vae replaces the VAE of --model, and the embedded micro "
                          "model keeps its own; pass --model SD.safetensors with --vae")
    model, head = resolve_model_paths(args.model, args.head, args.zero_shot)
    segmenter = load_segmenter(model, head, mask_model=mask_model, vae=args.vae, device=args.device, dtype=args.dtype,
                               resolution=args.resolution, timestep=getattr(args, "timestep", None),
                               draws=getattr(args, "draws", None), seed=getattr(args, "seed", 0))
    segmenter = segmenter.with_settings(cuda_graphs=getattr(args, "cuda_graphs", True),
                                        **({} if refine is None else {"refine": refine}))
    # Only the settings that apply: a head run has no zero-shot settings and vice versa.
    unused = {"resolution", "timestep", "draws"} if segmenter.zero_shot else {"resolution", "zero_shot"}
    # Files by their resolved paths: a record compares equal however a later run names the same file.
    record = {"model": str(model.resolve()), "head": str(head.resolve()) if head else None,
              **({"mask_model": str(mask_model.resolve())} if mask_model else {}),
              **({"vae": str(Path(args.vae).resolve())} if args.vae else {}),
              "device": str(segmenter.backbone.device),
              "dtype": str(segmenter.backbone.dtype).replace("torch.", ""), "resolution": segmenter.resolution,
              **{k: v for k, v in asdict(segmenter.settings).items() if k not in unused}}
    return segmenter, record


def parse_shard(text: str) -> tuple[int, int]:
    """An argparse type: "K/N" -> (K, N) with 1 <= K <= N <= SHARDS.high, shard K of N counted from 1,
    written with ASCII digits as every other number."""
    try:
        k, n = (number_from_text(part, int) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 2/4, got {text!r}") from None
    if not (1 <= k <= n and SHARDS.accepts(n)):
        raise argparse.ArgumentTypeError(f"expected 1 <= K <= N <= {SHARDS.high:,} in K/N, got {text!r}")
    return k, n


def add_shard_argument(parser: argparse.ArgumentParser, what: str,
                       shard_type: Callable[[str], tuple[int, int]] = parse_shard) -> None:
    """``--shard K/N`` (default 1/1): ``what`` says what the shard holds (help text); ``shard_type``
    reads the value (:func:`parse_shard`, or a command's variant that also reads an old spelling)."""
    parser.add_argument("--shard", type=shard_type, default=(1, 1), metavar="K/N",
                        help=f"process only shard K of N, 1 <= K <= N: {what}")
