"""`ldznet world ...`: the micro world's command group.

``ldznet world sample --seed S -o DIR [--size N] [--domain cartoon|photo]`` writes
``DIR/image.png`` (RGB), ``DIR/masks/<phrase>.png`` (mode L, 0 or 255; spaces in the phrase
become ``_``: ``red_star.png``) and ``DIR/phrases.json``::

    {"seed": 7, "domain": "photo", "size": 128, "caption": "a photo of ...",
     "phrases": [{"phrase": "red star", "file": "masks/red_star.png", "area": 312, "present": true}, ...]}

``area`` is the mask's pixel count; absent phrases have ``"present": false`` and area 0.
Sampling again into the same DIR removes the earlier sample's masks that the new one lacks.
``ldznet world split NAME [--count N]`` prints the first N seeds of split NAME as a JSON list.
``ldznet world train-sd -o DIR [--recipe full|clip|smoke] [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16]
[--image-size PX] [--stages vae,text,unet] [--init-model FILE [--init-unet] [--text-tower T]] [--unet-steps N]
[--unet-batch N] [--unet-min-snr-gamma G] [--snapshot-every K] [--time-budget-s S]`` trains the micro SD v1
(``world.train_sd``) into DIR.
Each sub-command is one ``_add_*`` function in ``SUBCOMMANDS``; add more there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from PIL import Image

from ..errors import LdznetError
from ..limits import (MICRO_IMAGE_SIZE, MIN_SNR_GAMMA, PROCESSES, RENDER_SIZE, SCENES, SEED, STEP_INTERVAL, STEPS,
                      TIME_BUDGET, TRAIN_BATCH_SIZE, bounded_number)
from ..outputs import png_writer, writable_folder, write_together
from ..world.scenes import SPLIT_START, VOCABULARY, make_scene, split_seeds
from .common import add_device_argument


PHRASES_FILE = "phrases.json"


def mask_filename(phrase: str) -> str:
    """File name of a phrase's mask: ``'red star' -> 'red_star.png'``."""
    return phrase.replace(" ", "_") + ".png"


def write_sample(seed: int, out: Path, size: int = 128, domain: str | None = None) -> dict:
    """Render scene ``seed`` into directory ``out`` (created); returns the phrases.json content.
    The sample's files are written together (all replaced or none, ``outputs.write_together``), over
    an earlier sample's only: a file of those names that no earlier sample in ``out`` wrote is refused.
    Masks that the earlier sample wrote and this one does not are removed; nothing else is touched."""
    writable_folder(writable_folder(out) / "masks")
    earlier = _earlier_sample_files(out)
    scene = make_scene(seed, size, domain)
    images = {"image.png": Image.fromarray(scene.image, "RGB")}
    entries = []
    for phrase, mask in scene.phrases.items():
        file = f"masks/{mask_filename(phrase)}"
        images[file] = Image.fromarray(mask.astype("uint8") * 255, "L")
        entries.append({"phrase": phrase, "file": file, "area": int(mask.sum()),
                        "present": scene.present(phrase)})
    info = {"seed": seed, "domain": scene.spec.domain, "size": size, "caption": scene.caption,
            "phrases": entries}
    for file in images:
        if (out / file).exists() and file not in earlier:
            raise LdznetError(f"{out / file}: exists and is no file of an earlier sample in {out}; choose another -o")
    text = (json.dumps(info, indent=2) + "\n").encode("utf-8")
    writers = {out / file: png_writer(image) for file, image in images.items()}
    write_together({**writers, out / PHRASES_FILE: lambda stream: stream.write(text)})  # phrases.json last
    for file in earlier - set(images) - {"image.png"}:
        (out / file).unlink(missing_ok=True)
    return info


def _earlier_sample_files(out: Path) -> set[str]:
    """The files an earlier sample in ``out`` wrote (image.png and the ``masks/NAME.png`` its
    phrases.json lists); none without a phrases.json. LdznetError when phrases.json is someone else's."""
    phrases_file = out / PHRASES_FILE
    if not phrases_file.exists():
        return set()
    try:
        info = json.loads(phrases_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not (isinstance(info, dict) and {"seed", "caption"} <= info.keys() and isinstance(info.get("phrases"), list)):
        raise LdznetError(f"{phrases_file}: exists and is not a world sample's; choose another -o")
    files = {entry.get("file") for entry in info["phrases"] if isinstance(entry, dict)}
    return {"image.png"} | {f for f in files if isinstance(f, str) and PurePosixPath(f).parent == PurePosixPath("masks")
                            and f.endswith(".png")}


def _run_sample(args: argparse.Namespace) -> int:
    info = write_sample(args.seed, Path(args.output), args.size, args.domain)
    print(f"{args.output}: {info['caption']} ({len(info['phrases'])} phrases)")
    return 0


def _run_split(args: argparse.Namespace) -> int:
    print(json.dumps(list(split_seeds(args.name, args.count))))
    return 0


def _run_train_sd(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..world.micro import micro_recipe
    from ..world.train_sd import UNetOptions, train_sd

    stages = None if args.stages is None else [s.strip() for s in args.stages.split(",") if s.strip()]
    unet_options = {"--unet-steps": args.unet_steps, "--unet-batch": args.unet_batch,
                    "--unet-min-snr-gamma": args.unet_min_snr_gamma, "--snapshot-every": args.snapshot_every,
                    "--time-budget-s": args.time_budget_s}
    given = next((flag for flag, value in unet_options.items() if value is not None), None)
    if stages is not None and "unet" not in stages and given:
        raise LdznetError(f"{given} sets stage unet, which --stages {','.join(stages)} does not run; drop it or add "
                          "unet to --stages")
    recipe = micro_recipe(args.recipe).with_overrides(
        seed=args.seed, image_size=args.image_size, unet_steps=args.unet_steps, unet_batch=args.unet_batch,
        unet_min_snr_gamma=args.unet_min_snr_gamma)
    options = UNetOptions(None if args.init_model is None else Path(args.init_model), args.init_unet,
                          args.snapshot_every or 0, args.time_budget_s, args.text_tower)
    log = train_sd(Path(args.output), recipe, resolve_device(args.device), args.dtype, stages,
                   args.workers, progress=not args.quiet and sys.stderr.isatty(), options=options)
    print(json.dumps({"output": args.output, "seconds": log["seconds"], "probes": log["probes"]}, indent=1))
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="render one scene with its caption and phrase masks")
    p.add_argument("--seed", type=bounded_number(SEED), required=True, help="scene seed")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write into")
    p.add_argument("--size", type=bounded_number(RENDER_SIZE), default=128,
                   help="image side in pixels, 8..4096 (default 128)")
    p.add_argument("--domain", choices=VOCABULARY.domains,
                   help="rendering domain (default: cartoon for even seeds, photo for odd)")
    p.set_defaults(func=_run_sample)


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="print the seeds of a fixed data split as a JSON list")
    p.add_argument("name", choices=tuple(SPLIT_START))
    p.add_argument("--count", type=bounded_number(SCENES), default=10,
                   help="how many seeds, from the split's first, 1..1000000 (default 10)")
    p.set_defaults(func=_run_split)


def _add_train_sd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-sd", help="train the micro SD v1 (VAE, text encoder, UNet) on micro-world scenes")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory for vae_stage.safetensors, micro-sd-v1.safetensors and train_sd_log.json")
    # no argparse choices: micro.RECIPES is the one list (micro_recipe names them on a bad one),
    # and importing it here would load torch for every world sub-command
    p.add_argument("--recipe", default="full",
                   help="hyper-parameter preset: full (default), clip (with the contrastive text-tower stage) "
                        "or smoke")
    p.add_argument("--seed", type=bounded_number(SEED),
                   help="seed of the initial weights, batches and noise (default: the recipe's, 0); same scenes")
    p.add_argument("--image-size", type=bounded_number(MICRO_IMAGE_SIZE), metavar="PX",
                   help="side of the training scenes in pixels, a multiple of 64 in 64..1024 (default: the "
                        "recipe's, 128); the model file records it as its working size")
    add_device_argument(p)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (default auto: bfloat16 on CUDA; on CPUs with native bf16, "
                        "bfloat16 for the VAE stage only; else float32)")
    p.add_argument("--stages",
                   help="comma-separated stages to run (default: all of the recipe's, vae,unet or with clip "
                        "vae,text,unet); a later stage alone reuses DIR/vae_stage.safetensors and "
                        "DIR/text_stage.safetensors")
    p.add_argument("--workers", type=bounded_number(PROCESSES),
                   help="scene-rendering processes, 1..64 (default: the usable cores, at most 16)")
    p.add_argument("--init-model", metavar="FILE",
                   help="a micro SD v1 file (e.g. the shipped micro-sd-v1.safetensors) whose VAE and text tower "
                        "stage unet starts from, both kept as they are (see --text-tower); runs stage unet alone")
    p.add_argument("--init-unet", action="store_true",
                   help="with --init-model: start from its UNet too (default: a random UNet)")
    # no argparse choices, as for --recipe: train_sd.TEXT_TOWERS is the one list
    p.add_argument("--text-tower", default="keep",
                   help="with --init-model: keep (default) its text tower, frozen; train a random one with the "
                        "UNet, as the recipe does; or random: that random tower, frozen untrained")
    p.add_argument("--unet-steps", type=bounded_number(STEPS), help="stage unet's steps (default: the recipe's)")
    p.add_argument("--unet-batch", type=bounded_number(TRAIN_BATCH_SIZE),
                   help="stage unet's batch, 1..4096 (default: the recipe's)")
    p.add_argument("--unet-min-snr-gamma", type=bounded_number(MIN_SNR_GAMMA), metavar="G",
                   help="stage unet's loss: min-SNR weighting with this gamma, 0..10000 (0, the recipe's: SD's "
                        "plain eps MSE; Hang et al. use 5)")
    p.add_argument("--snapshot-every", type=bounded_number(STEP_INTERVAL), metavar="K",
                   help="write the EMA weights every K steps of stage unet as "
                        "DIR/snapshots/micro-sd-v1-stepNNNNNN.safetensors (14 MB each; refused before the run "
                        "when they would not fit on the disk)")
    p.add_argument("--time-budget-s", type=bounded_number(TIME_BUDGET), metavar="S",
                   help="stop stage unet after the step that ends S seconds after the run's start "
                        "(the final file and probes are still written)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train_sd)


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_sample, _add_split, _add_train_sd)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``world`` command group to the top-level ``ldznet`` parser."""
    parser = subparsers.add_parser("world", help="procedural micro world: scenes, captions, phrase masks")
    sub = parser.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)
