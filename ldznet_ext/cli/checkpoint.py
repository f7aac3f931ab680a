"""`ldznet info` and `ldznet convert`: what a checkpoint is, and importing the official release."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..checkpoint_io import read_metadata, read_state_dict, read_tensor_shapes, read_tensors
from ..errors import CheckpointError, LdznetError
from ..heads import convert_official, read_head_config
from ..modeling.build import ARCHITECTURES, build_head, head_config
from ..backbones.family import checkpoint_part
from ..sd.checkpoint import (SUPPORTED, TEXT_PREFIX, UNET_PREFIX, V_PREDICTION_KEY, VAE_PREFIX, ZERO_SHOT_ONLY,
                             ZERO_TERMINAL_SNR_KEY, classify, parse_sd_metadata, unet_config_from_state_dict)
from ..sd.unet import UNET_CONFIGS, UNetModel, count_parameters, unet_config


def describe_architecture(arch: str, size: str) -> dict:
    """Parameter and tensor counts of an architecture built on the meta device."""
    with torch.device("meta"):
        model = UNetModel(unet_config(size)) if arch == "sd-unet" else build_head(head_config(arch, size))
    return {"arch": arch, "size": size, "parameters": count_parameters(model), "tensors": len(model.state_dict())}


def describe_file(path: Path) -> dict:
    """Family, sizes, parameter counts and metadata of a checkpoint file.

    Metadata of the wrong kind is a CheckpointError; weights that no model fits make the file
    ``usable: false`` with a note.
    """
    metadata = read_metadata(path)
    state = _tensors_to_describe(path)
    info = classify(state, metadata)
    report = {"file": str(path), "family": info.family, "tensors": len(state),
              "parameters": sum(v.numel() for v in state.values()), **info.details}
    if info.family == "ldznet-head":
        if "head" in metadata:
            read_head_config(path)
        report.update(metadata)
    elif info.family == "sd-v1":
        unet = checkpoint_part(state, UNET_PREFIX)
        described = parse_sd_metadata(metadata, path.name)
        try:
            report["unet"] = (described.unet or unet_config_from_state_dict(unet)).to_dict()
        except KeyError as error:
            info.problem = f"the UNet is incomplete (no '{UNET_PREFIX}{error.args[0]}')"
        except CheckpointError as error:
            info.problem = f"the UNet's {error}"
        for part, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", TEXT_PREFIX)):
            report[f"{part}_parameters"] = sum(v.numel() for k, v in state.items() if k.startswith(prefix))
        if described.resolution:
            report["resolution"] = described.resolution
        if described.vocabulary is not None:
            report["vocabulary"] = sorted(described.vocabulary)
    unet_dtype = next((v.dtype for k, v in state.items() if k.startswith(UNET_PREFIX)), None)
    if unet_dtype is not None:
        report["dtype"] = str(unet_dtype).replace("torch.", "")
        if V_PREDICTION_KEY in state:
            report["prediction"] = f"v (the '{V_PREDICTION_KEY}' marker)"
        if ZERO_TERMINAL_SNR_KEY in state:
            report["noise_schedule"] = f"rescaled to zero terminal SNR (the '{ZERO_TERMINAL_SNR_KEY}' marker)"
    if info.family in ZERO_SHOT_ONLY:
        report["usable"] = "zero-shot"
        report["note"] = f"{ZERO_SHOT_ONLY[info.family]}."
    elif info.problem:
        report["usable"] = False
        report["note"] = f"{info.problem}. Supported: {SUPPORTED}."
    return report


def _tensors_to_describe(path: Path) -> dict[str, torch.Tensor]:
    """The tensors ``describe_file`` reads: of a safetensors file only what its header says (meta tensors
    in the dtype of its first UNet tensor, the one dtype reported), so that describing a 7 GB SDXL file
    reads none of its weights; of other files everything (they have no header to read). Opening that one
    tensor also checks the file's length against its header (a truncated file is refused)."""
    shapes = read_tensor_shapes(path)
    if shapes is None:
        return read_state_dict(path)
    first = next((name for name in shapes if name.startswith(UNET_PREFIX)), next(iter(shapes), None))
    dtype = torch.float32 if first is None else read_tensors(path, [first])[first].dtype
    return {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()}


def _info(args: argparse.Namespace) -> int:
    if args.arch:
        report = describe_architecture(args.arch, args.size)
    elif args.file:
        report = describe_file(Path(args.file))
    else:
        raise LdznetError("give a checkpoint FILE or --arch NAME")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    config = convert_official(args.checkpoint, args.output, use_ema=not args.no_ema,
                              dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {args.output}: {config.arch} head, blocks {list(config.sd_blocks)}, "
          f"{'EMA' if not args.no_ema else 'training'} weights")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser("info", help="describe a checkpoint file or an architecture")
    info.add_argument("file", nargs="?", help="a .safetensors or .ckpt file")
    info.add_argument("--arch", choices=(*ARCHITECTURES, "sd-unet"), help="describe an architecture instead")
    info.add_argument("--size", choices=tuple(UNET_CONFIGS), default="sd-v1")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    convert = subparsers.add_parser("convert", help="import the official LDZNet_txt2mask.ckpt as a head file")
    convert.add_argument("checkpoint", help="the official Lightning checkpoint")
    convert.add_argument("-o", "--output", required=True, help="head .safetensors to write")
    convert.add_argument("--no-ema", action="store_true", help="take model.diffusion_model.* instead of the EMA")
    convert.add_argument("--fp16", action="store_true", help="store fp16 (half the size)")
    convert.set_defaults(func=_convert)
