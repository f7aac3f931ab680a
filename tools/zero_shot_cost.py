"""Cost of the zero-shot methods side by side: ms per mask and the peak memory a call adds, on the CPU.

    .venv/bin/python tools/zero_shot_cost.py                 # micro model, 384 px, both methods
    .venv/bin/python tools/zero_shot_cost.py --unet sd-v1    # also a random full-size SD v1 UNet at 384 px

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

TERMS = ["red circle", "blue square", "sky", "grass"]
SCORES = {"agreement": dict(score="agreement", timestep=400, draws=4),
          "attention": dict(score="attention", timestep=100, draws=1, attention_scales=((1, 1.0),),
                            propagation_steps=0),
          "attention x self": dict(score="attention", timestep=100, draws=1, attention_scales=((1, 1.0),),
                                   propagation_steps=1)}


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(unet_size: str, score: str, side: int) -> dict:
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
            segmenter.predict_terms(TERMS)
    else:
        sd = build_stable_diffusion(unet_size)
        z = torch.randn(1, 4, side // 8, side // 8)
        context = Conditioning(torch.randn(len(TERMS), 77, sd.unet.config.context_dim))

        def call():
            with torch.no_grad():
                zero_shot_maps(sd, z, TERMS, context, settings)
    call()  # warm-up: first-call allocations and lazy initialisation
    before = _memory_kib("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return {"unet": unet_size, "score": score, "side": side, "ms_per_mask": 1000 * seconds / len(TERMS),
            "peak_above_rss_mib": (_memory_kib("VmHWM") - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", action="append", default=["micro"], help="micro, and/or sd-v1 (random weights)")
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child[0], args.child[1], args.side)))
        return
    print("| UNet | score | ms per mask | peak memory above RSS (MiB) |")
    for unet_size in dict.fromkeys(args.unet):
        for score in SCORES:
            out = subprocess.run([sys.executable, __file__, "--side", str(args.side), "--child", unet_size, score],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.splitlines()[-1])
            print(f"| {unet_size} {args.side} px | {score} | {row['ms_per_mask']:.0f} | "
                  f"{row['peak_above_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
