"""Cost of the zero-shot methods side by side: ms per mask and the peak memory a call adds, on the CPU.

    .venv/bin/python tools/zero_shot_cost.py                 # micro model, 384 px, every score
    .venv/bin/python tools/zero_shot_cost.py --unet micro --unet sd-v1   # and a random full-size SD v1 UNet
    .venv/bin/python tools/zero_shot_cost.py --unet sdxl --side 1024 --terms 1 --only attention
                                                             # a random full-size SDXL UNet at 1024 px

Each measurement runs in its own process, so that the peak resident memory (VmHWM) it reports above
the resident memory before the call belongs to that call alone. The micro rows time whole masks
(``Segmenter.predict_terms`` on a 384 px image, 4 terms, the settings in ``SCORES``); the UNet
rows time one zero-shot map computation on random latents and a random context, without the text
encoder and the VAE.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldznet_ext.limits import RESOLUTION, bounded_number  # noqa: E402

TERMS = ["red circle", "blue square", "sky", "grass"]
SCORES = {"agreement": dict(score="agreement", timestep=400, draws=4),
          "attention": dict(score="attention", timestep=100, draws=1, propagation_steps=0),
          "attention x self": dict(score="attention", timestep=100, draws=1, propagation_steps=1)}


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class _UNetBackbone:
    """Only what the zero-shot score reads of a backbone: a UNet's layout and calls (no VAE, no text
    encoder: the latents and the conditioning are random). SDXL's vector rides in ``extra["y"]``."""

    def __init__(self, unet: torch.nn.Module):
        from ldznet_ext.backbones.base import ldm_layout
        from ldznet_ext.sd.schedule import NoiseSchedule

        self.unet, self.schedule, self.layout = unet, NoiseSchedule(), ldm_layout(unet)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def predict_noise(self, z_t, t, conditioning):
        return self.unet(z_t, t, conditioning.context, conditioning.extra.get("y"))


def _measure(unet_size: str, score: str, side: int, terms: list[str]) -> dict:
    """One process's measurement (see the module docstring)."""
    from ldznet_ext.backbones.base import Conditioning
    from ldznet_ext.defaults import WEIGHTS_DIR
    from ldznet_ext.loading import load_segmenter
    from ldznet_ext.sd.checkpoint import build_stable_diffusion
    from ldznet_ext.zeroshot import ZeroShotSettings, zero_shot_maps

    torch.set_num_threads(1)
    settings = ZeroShotSettings(**SCORES[score])
    if unet_size == "micro":
        segmenter = load_segmenter(WEIGHTS_DIR / "micro-sd-v1.safetensors", None, device="cpu", resolution=side)
        segmenter = segmenter.with_settings(zero_shot=settings)
        image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)

        def call():
            segmenter.set_image(image)
            segmenter.predict_terms(terms)
    else:
        if unet_size == "sdxl":
            from ldznet_ext.sd.unet import UNetModel, unet_config
            sd = _UNetBackbone(UNetModel(unet_config("sdxl")).eval())
        else:
            sd = build_stable_diffusion(unet_size)
        config = sd.unet.config
        z = torch.randn(1, 4, side // 8, side // 8)
        extra = {"y": torch.randn(len(terms), config.adm_in_channels)} if config.adm_in_channels else {}
        context = Conditioning(torch.randn(len(terms), 77, config.context_dim), extra=extra)

        def call():
            with torch.no_grad():
                zero_shot_maps(sd, z, terms, context, settings)
    call()  # warm-up: first-call allocations and lazy initialisation
    before = _memory_kib("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return {"unet": unet_size, "score": score, "side": side, "ms_per_mask": 1000 * seconds / len(terms),
            "peak_above_rss_mib": (_memory_kib("VmHWM") - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", action="append", default=None, choices=("micro", "sd-v1", "sdxl"),
                        help="micro (default), sd-v1 and/or sdxl (random weights); repeatable")
    parser.add_argument("--side", type=bounded_number(RESOLUTION), default=384,
                        help="image side in pixels, a multiple of 64 (the working sizes)")
    parser.add_argument("--terms", type=int, default=len(TERMS), choices=range(1, len(TERMS) + 1))
    parser.add_argument("--only", choices=tuple(SCORES), help="measure one score only")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side % 64:
        parser.error(f"--side must be a multiple of 64, got {args.side}")
    terms = TERMS[:args.terms]
    if args.child:
        print(json.dumps(_measure(args.child[0], args.child[1], args.side, terms)))
        return
    print("| UNet | score | ms per mask | peak memory above RSS (MiB) |\n|---|---|---:|---:|")
    for unet_size in dict.fromkeys(args.unet or ["micro"]):
        for score in [args.only] if args.only else SCORES:
            child = subprocess.run([sys.executable, __file__, "--side", str(args.side), "--terms", str(args.terms),
                                    "--child", unet_size, score], capture_output=True, text=True)
            if child.returncode:  # its own error, not "returned non-zero exit status"
                parser.exit(1, f"{parser.prog}: error: {unet_size} {score}: "
                               f"{(child.stderr.strip().splitlines() or ['failed'])[-1]}\n")
            row = json.loads(child.stdout.splitlines()[-1])
            print(f"| {unet_size} {args.side} px | {score} | {row['ms_per_mask']:.0f} | "
                  f"{row['peak_above_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
