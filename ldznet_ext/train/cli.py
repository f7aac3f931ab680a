"""`ldznet train`: train a segmentation head on a frozen SD v1 model.

``ldznet train --arch ldznet --model sd.safetensors --data world:train:5000 -o runs/a`` writes
``runs/a/head.safetensors`` (the EMA head, usable with the segmenter), ``runs/a/last.pt`` (resume
state) and ``runs/a/log.jsonl``. ``--resume`` continues a run from its last.pt with its saved
settings; options given with it (e.g. a larger ``--steps``) override those that may change.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..errors import LdznetError
from ..loading import resolve_device
from ..modeling.build import ARCHITECTURES
from ..sd.checkpoint import load_stable_diffusion
from .data import TEMPLATES, open_source
from .trainer import CHECKPOINT, HEAD, TrainConfig, Trainer

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.resume:
        path = Path(args.output) / CHECKPOINT
        if not path.is_file():
            raise LdznetError(f"--resume: {path} does not exist")
        saved = torch.load(path, map_location="cpu", weights_only=True)["config"]
        return TrainConfig.from_dict({**saved, **given})
    if "arch" not in given:
        raise LdznetError("--arch is required (unless --resume)")
    return TrainConfig.from_dict({**asdict(TrainConfig()), **given})


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    amp_dtype = AMP_DTYPES[args.dtype]
    backbone = load_stable_diffusion(args.model, resolve_device(args.device), amp_dtype or torch.float32)
    source = open_source(config.data, size=config.resolution, domain=args.domain)
    trainer = Trainer(backbone, source, config, args.output, amp_dtype, model_name=Path(args.model).name)
    if args.resume:
        trainer.resume()
    loss = trainer.run()
    print(f"{Path(args.output) / HEAD}: {config.arch} head, {trainer.step} steps on {source.description}, "
          f"loss {loss:.4f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = subparsers.add_parser("train", help="train a segmentation head (LD-ZNet, ZNet, RGBNet) on a frozen SD model")
    p.add_argument("--arch", choices=ARCHITECTURES)
    p.add_argument("--model", required=True, metavar="SD.safetensors", help="SD v1 checkpoint (frozen backbone)")
    p.add_argument("--domain", help="paint micro-world scenes in this domain only (cartoon or photo)")
    p.add_argument("--data", metavar="SPEC", help=f"world:SPLIT:N, world:FILE.npz, jsonl:PATH or PATH.jsonl (default {d.data})")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory (created)")
    p.add_argument("--steps", type=int, help=f"optimiser steps in all (default {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"AdamW rate of the SD-initialised layers (default {d.lr:g})")
    p.add_argument("--new-lr-scale", type=float,
                   help=f"rate multiplier for layers trained from scratch (default {d.new_lr_scale:g})")
    p.add_argument("--warmup", type=int, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--schedule", choices=("constant", "cosine"), help=f"after warm-up (default {d.schedule})")
    p.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay:g}")
    p.add_argument("--ema", type=float, help=f"EMA decay of the saved head (default {d.ema:g})")
    p.add_argument("--grad-clip", type=float, help=f"gradient norm limit, 0 = off (default {d.grad_clip:g})")
    p.add_argument("--pos-weight", type=float, help=f"BCE weight of mask pixels (default {d.pos_weight:g})")
    p.add_argument("--decoder-init", choices=("identity", "default"),
                   help=f"mask decoder start: identity up-sampling, or torch's default as the official code "
                        f"(default {d.decoder_init})")
    p.add_argument("--templates", choices=tuple(TEMPLATES), help=f"prompt templates (default {d.templates})")
    p.add_argument("--no-negatives", dest="negatives", action="store_const", const=False,
                   help="train on present phrases only (default: absent phrases too, with empty masks)")
    p.add_argument("--resolution", type=int, help=f"training image side, a multiple of 64 (default {d.resolution})")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--save-every", type=int, help=f"checkpoint interval in steps (default {d.save_every})")
    p.add_argument("--log-every", type=int, help=f"log.jsonl interval in steps (default {d.log_every})")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=tuple(AMP_DTYPES), default="fp32",
                   help="precision of the frozen SD model and autocast dtype of the head (bf16/fp16: CUDA only; "
                        "the head's weights stay fp32)")
    p.set_defaults(func=_run)
