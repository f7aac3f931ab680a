"""`ldznet webui install-model SD.safetensors WEBUI_DIR`: the WebUI helpers' command group.

The installation itself is ``ldznet_ext.webui.install_model``; it is imported when the command
runs, so that the other commands never load the WebUI package.
"""

from __future__ import annotations

import argparse


def _run_install_model(args: argparse.Namespace) -> int:
    from ..webui.install_model import install_model

    target = install_model(args.checkpoint, args.webui_dir, args.name, args.hf_home)
    clip = target.with_name(f"{target.stem}.clip")
    print(f"installed {target} (+ {target.with_suffix('.yaml').name}" + (f", {clip.name}/)" if clip.is_dir() else ")"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    webui = subparsers.add_parser("webui", help="WebUI helpers")
    commands = webui.add_subparsers(dest="webui_command", metavar="COMMAND", required=True)
    parser = commands.add_parser("install-model",
                                 help="install an SD v1, SD 2.x or SDXL checkpoint into A1111, offline",
                                 description="make an SD v1 checkpoint of any width, or an SD 2.x- or "
                                             "SDXL-architecture one, loadable by A1111 v1.10 without network access")
    parser.add_argument("checkpoint", help="SD v1, SD 2.x or SDXL single-file checkpoint (.safetensors or .ckpt)")
    parser.add_argument("webui_dir", help="the WebUI folder (holds webui.py)")
    parser.add_argument("--name", help="file name in models/Stable-diffusion (default: the checkpoint's)")
    parser.add_argument("--hf-home", help="Hugging Face home (default: $HF_HOME or ~/.cache/huggingface)")
    parser.set_defaults(func=_run_install_model)
