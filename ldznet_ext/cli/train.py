"""`ldznet train`: train a segmentation head on a frozen SD v1 model.

``ldznet train --arch ldznet --model sd.safetensors --data world:train:5000 -o runs/a`` writes
``runs/a/head.safetensors`` (the EMA head, usable with the segmenter), ``runs/a/last.pt`` (resume
state) and ``runs/a/log.csv``. Settings come from the defaults, ``--preset``, ``--config FILE``
(YAML or JSON, keys = TrainConfig fields) and the flags, later ones winning. ``--resume``
continues a run from its last.pt with its saved settings; options given with it (e.g. a larger
``--steps``) override those that may change. Under ``torchrun --nproc-per-node N -m
ldznet_ext.cli train ...`` the N processes train one head data-parallel (see docs/training.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..data.spec import open_source, spec_file
from ..errors import LdznetError
from ..limits import bounded_number
from ..devices import resolve_device
from ..loading import load_model, model_label
from ..modeling.build import ARCHITECTURES
from ..modeling.ldznet import FUSIONS
from ..outputs import check_outputs, writable_folder
from ..precision import PRECISIONS, autocast_dtype
from ..sd.vae_file import read_vae_file
from ..train import distributed
from ..train.augment import TEMPLATES
from ..train.config import (FIELD_LIMITS, PRESETS, SCHEDULES, TrainConfig, check_values, compose_config,
                            read_config_file)
from ..train.logs import LOG, TENSORBOARD
from ..train.trainer import CHECKPOINT, HEAD, Trainer, read_checkpoint
from .common import add_device_argument


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig from the parsed arguments (see the module docstring for the order)."""
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.preset is not None:
        flags["preset"] = args.preset
    file_values = read_config_file(args.config) if args.config else {}
    if args.resume:
        path = Path(args.output) / CHECKPOINT
        if not path.is_file():
            raise LdznetError(f"--resume: {path} " + ("is not a file" if path.exists() else "does not exist"))
        base = read_checkpoint(path)["config"]
    else:
        if "arch" not in flags and "arch" not in file_values:
            raise LdznetError("--arch is required (unless --resume or the config file sets arch)")
        base = asdict(TrainConfig())
    return compose_config(base, file_values, check_values(flags, "command line"))


def check_run_folder(args: argparse.Namespace, config: TrainConfig) -> None:
    """Refuse a run folder whose files this run would overwrite: without --resume, one that already holds a
    run's files (another run's weights, or a user's own log.csv); and any run file that is one of the run's
    inputs, also through a link."""
    run = Path(args.output)
    if not args.resume:
        held = [name for name in (CHECKPOINT, HEAD, LOG, TENSORBOARD) if (run / name).exists()]
        if CHECKPOINT in held:
            raise LdznetError(f"{run} already holds {', '.join(held)}: continue that run with --resume, or give "
                              "a new folder")
        if held:  # a run stopped before its first checkpoint, or someone's own files: nothing to resume
            raise LdznetError(f"{run} already holds {', '.join(held)} but no {CHECKPOINT} to resume from; "
                              "remove them or give a new folder")
    inputs = {args.model: "the model", args.vae: "the VAE", args.config: "the config file",
              spec_file(config.data): f"the data {config.data}", config.init: "the head to start from"}
    check_outputs([run / name for name in (CHECKPOINT, HEAD, LOG)], {k: v for k, v in inputs.items() if k})


def train(args: argparse.Namespace) -> Trainer:
    """Run ``ldznet train``: join torchrun's process group if the environment describes one (and
    leave it at the end; a group the caller joined stays), train, return the finished Trainer."""
    config = resolve_config(args)
    writable_folder(args.output)  # before the model loads and the data opens, not at the first checkpoint
    check_run_folder(args, config)
    device, joined = distributed.init_from_env(resolve_device(args.device))
    try:
        vae = read_vae_file(args.vae) if args.vae is not None else None
        backbone = load_model(args.model, device=device, dtype=autocast_dtype(config.precision) or torch.float32,
                              vae=vae)
        source = open_source(config.data, size=config.resolution, domain=args.domain)
        trainer = Trainer(backbone, source, config, args.output, model_name=model_label(args.model, args.vae),
                          resuming=args.resume)
        if args.resume:
            trainer.resume()
        trainer.run()
    finally:
        if joined:
            distributed.shutdown()
    return trainer


def _run(args: argparse.Namespace) -> int:
    trainer = train(args)
    if trainer.is_main:
        steps = f"{trainer.step} step{'s' * (trainer.step != 1)}"
        print(f"{Path(args.output) / HEAD}: {trainer.config.arch} head, {steps} on "
              f"{trainer.source.description} with {trainer.world_size} process(es), loss {trainer.recent_loss:.4f}")
    return 0


def _field(name: str) -> Callable[[str], float]:
    """The argparse type of TrainConfig field ``name``'s flag: its bound in ``FIELD_LIMITS``, which
    config files are held to as well."""
    return bounded_number(FIELD_LIMITS[name])


def register(subparsers: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    bool_flag = argparse.BooleanOptionalAction
    p = subparsers.add_parser("train", help="train a segmentation head (LD-ZNet, ZNet, RGBNet) on a frozen SD model")
    p.add_argument("--config", metavar="FILE", help="settings file, YAML or JSON (keys: TrainConfig fields, preset)")
    p.add_argument("--preset", choices=tuple(PRESETS), help="named settings under the file and flags "
                                                            "(official: the released model's recipe)")
    p.add_argument("--arch", choices=ARCHITECTURES)
    p.add_argument("--model", required=True, metavar="SD.safetensors",
                   help="SD v1 checkpoint or diffusers folder (frozen backbone)")
    p.add_argument("--vae", metavar="VAE.safetensors", help="VAE file used in place of the model's VAE, or where its "
                                                            "file has none (as for ldznet mask; again with --resume)")
    p.add_argument("--domain", help="paint micro-world scenes in this domain only (cartoon or photo)")
    p.add_argument("--data", metavar="SPEC",
                   help=f"data spec, e.g. world:train:5000 or phrasecut:DIR:train (docs/datasets.md; default {d.data})")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory (created)")
    p.add_argument("--steps", type=_field("steps"), help=f"optimiser steps in all (default {d.steps})")
    p.add_argument("--batch-size", type=_field("batch_size"),
                   help=f"samples per process and micro-batch (default {d.batch_size})")
    p.add_argument("--accumulate", type=_field("accumulate"),
                   help=f"micro-batches per optimiser step (default {d.accumulate})")
    p.add_argument("--lr", type=_field("lr"),
                   help=f"AdamW rate of the SD-initialised layers (default {d.lr:g})")
    p.add_argument("--scale-lr", action=bool_flag,
                   help="--lr is per sample: the rate used is lr x batch size x accumulate x processes")
    p.add_argument("--new-lr-scale", type=_field("new_lr_scale"),
                   help=f"rate multiplier for layers trained from scratch (default {d.new_lr_scale:g})")
    p.add_argument("--fast-cross-attention", action=bool_flag,
                   help="the text cross-attention layers get the --new-lr-scale rate too (default off)")
    p.add_argument("--warmup", type=_field("warmup"), help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"after warm-up (default {d.schedule})")
    p.add_argument("--plateau-factor", type=_field("plateau_factor"),
                   help=f"plateau: rate multiplier (default {d.plateau_factor:g})")
    p.add_argument("--plateau-patience", type=_field("plateau_patience"),
                   help=f"plateau: windows without improvement before a cut (default {d.plateau_patience})")
    p.add_argument("--plateau-every", type=_field("plateau_every"),
                   help=f"plateau: steps per loss window (default {d.plateau_every})")
    p.add_argument("--weight-decay", type=_field("weight_decay"), help=f"default {d.weight_decay:g}")
    p.add_argument("--ema", type=_field("ema"), help=f"EMA decay of the saved head (default {d.ema:g})")
    p.add_argument("--grad-clip", type=_field("grad_clip"),
                   help=f"gradient norm limit, 0 = off (default {d.grad_clip:g})")
    p.add_argument("--pos-weight", type=_field("pos_weight"),
                   help=f"BCE weight of mask pixels (default {d.pos_weight:g})")
    p.add_argument("--dice-weight", type=_field("dice_weight"),
                   help=f"weight of a per-sample soft Dice loss added to the BCE (default {d.dice_weight:g})")
    p.add_argument("--decoder-init", choices=("identity", "default"),
                   help=f"mask decoder start: identity up-sampling, or torch's default as the official code "
                        f"(default {d.decoder_init})")
    p.add_argument("--sd-fusion", choices=FUSIONS,
                   help=f"LD-ZNet: cross-attend to the SD features, or concatenate them (the paper's Table 4 "
                        f"ablation) (default {d.sd_fusion})")
    p.add_argument("--templates", choices=tuple(TEMPLATES), help=f"prompt templates (default {d.templates})")
    p.add_argument("--negatives", action=bool_flag,
                   help="also train on absent phrases, with empty masks (default: on)")
    p.add_argument("--negative-prob", type=_field("negative_prob"), metavar="P",
                   help="0 <= P < 1: with this probability a sample's phrase is replaced by one of another image of "
                        "the micro-batch that its image does not name, with an empty mask (CLIPSeg's negatives, "
                        "for data without absent phrases such as PhraseCut; CLIPSeg used 0.2) "
                        f"(default {d.negative_prob:g})")
    p.add_argument("--presence-weight", type=_field("presence_weight"),
                   help="> 0: give the head a learned presence output (is the phrase in the image?), its BCE "
                        "added with this weight; absent phrases come from --negatives and --negative-prob "
                        f"(default {d.presence_weight:g})")
    p.add_argument("--init", metavar="HEAD.safetensors",
                   help="start from this head file (same architecture, SD model and resolution) instead of the SD "
                        "UNet; a presence output it lacks starts fresh")
    p.add_argument("--freeze-head", action=bool_flag,
                   help="with --init and --presence-weight: train the presence output alone, the head's maps stay "
                        "exactly the same (default off)")
    p.add_argument("--resolution", type=_field("resolution"),
                   help=f"training image side, a multiple of 64 (default {d.resolution})")
    p.add_argument("--precision", "--dtype", choices=PRECISIONS,
                   help="fp32, or bf16/fp16 (CUDA): the frozen SD model's dtype and the head's autocast; the "
                        f"head's weights stay fp32 (default {d.precision})")
    p.add_argument("--grad-checkpoint", action=bool_flag,
                   help="recompute the head's activations in the backward pass (less memory, about one more "
                        "forward pass a step)")
    p.add_argument("--seed", type=_field("seed"), help=f"default {d.seed}")
    p.add_argument("--workers", type=_field("workers"), metavar="N",
                   help="processes that read and decode examples ahead of training; results do not depend on it "
                        f"and --resume may change it (default {d.workers}: read in the training process)")
    p.add_argument("--save-every", type=_field("save_every"),
                   help=f"checkpoint interval in steps (default {d.save_every})")
    p.add_argument("--log-every", type=_field("log_every"),
                   help=f"log.csv interval in steps (default {d.log_every})")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    add_device_argument(p, "; under torchrun each process takes cuda:LOCAL_RANK")
    p.set_defaults(func=_run)
