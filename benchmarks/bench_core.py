"""Time the core of one LD-ZNet mask at SD v1 size, stage by stage, with random weights.

Stages (batch 1, z = image / 8):
  vae_encode        SD v1 VAE posterior mean of a [1, 3, S, S] image
  features_full     SD UNet call at t = 400 on q_sample(z) with the tap on blocks 6-10, run to the end
  features_early    the same call stopped after block 10 (FeatureTap early exit)
  ldznet_head       LD-ZNet forward on z, the text context and the five SD features

Each stage runs in its own process so that its peak RSS (``resource.getrusage``, weights included)
is its own; the median of ``--repeats`` timed runs follows one warm-up run.

    python benchmarks/bench_core.py [--size 384] [--repeats 3] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch import Tensor

from ldznet_ext.backbones.base import LDZNET_BLOCKS, ldm_layout
from ldznet_ext.modeling.build import build_head, head_config
from ldznet_ext.precision import DTYPES
from ldznet_ext.sd.schedule import NoiseSchedule
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import SCALE_FACTOR, AutoencoderKL, vae_config
from ldznet_ext.tap import FeatureTap

from common import device_argument, environment, materialise, peak_rss_mib, run_isolated, time_runs

STAGES = ("vae_encode", "features_full", "features_early", "ldznet_head")
TIMESTEP = 400
CONTEXT_DIM, CONTEXT_TOKENS = 768, 77


def _stage(name: str, size: int, repeats: int, device_name: str, dtype_name: str) -> dict:
    """Run one stage in this process; return its timings and memory peaks."""
    torch.set_flush_denormal(True)
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    side = size // 8
    z = (torch.randn(1, 4, side, side, generator=g) * 0.8).to(device, dtype)
    context = torch.randn(1, CONTEXT_TOKENS, CONTEXT_DIM, generator=g).to(device, dtype)
    t = torch.full((1,), TIMESTEP, device=device)

    with torch.inference_mode():
        if name == "vae_encode":
            vae = materialise(lambda: AutoencoderKL(vae_config("sd-v1")), device, dtype)
            image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
            run = lambda: vae.encode(image) * SCALE_FACTOR  # noqa: E731
        elif name.startswith("features"):
            unet = materialise(lambda: UNetModel(unet_config("sd-v1")), device, dtype)
            z_t = NoiseSchedule().q_sample(z, t, torch.randn(z.shape, generator=g).to(device, dtype))
            early = name == "features_early"

            def run() -> dict[int, Tensor]:
                with FeatureTap(ldm_layout(unet), LDZNET_BLOCKS, early_exit=early) as tap:
                    return tap.run(lambda: unet(z_t, t, context))
        else:
            head = materialise(lambda: build_head(head_config("ldznet", latent_size=side)), device, dtype)
            # Values do not matter for timing: random features of the shapes the SD UNet gives.
            shapes = {6: (1280, side // 4), 7: (1280, side // 8), 8: (1280, side // 4), 9: (1280, side // 4),
                      10: (1280, side // 4)}
            features = {b: torch.randn(1, c, s, s, generator=g).to(device, dtype) for b, (c, s) in shapes.items()}
            run = lambda: head(z, context, features)  # noqa: E731
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_runs(run, device, repeats)

    return {
        "name": name,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def markdown_table(results: list[dict]) -> str:
    gpu = results[0]["peak_gpu_mib"] is not None
    header = "| stage | median ms | min ms | peak RSS MiB |" + (" peak GPU MiB |" if gpu else "")
    lines = [header, "|" + "---|" * header.count(" |")]
    for r in results:
        row = f"| {r['name']} | {r['median_s'] * 1e3:.0f} | {r['min_s'] * 1e3:.0f} | {r['peak_rss_mib']:.0f} |"
        lines.append(row + (f" {r['peak_gpu_mib']:.0f} |" if gpu else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384, help="image side in pixels, a multiple of 64")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage (after one warm-up)")
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp16 is for GPUs")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    args = parser.parse_args(argv)
    if args.size % 64:
        parser.error(f"--size must be a multiple of 64, got {args.size}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    print(f"{environment(args.device, args.dtype)}, image {args.size}x{args.size} (z {args.size // 8}), batch 1, "
          f"median of {args.repeats} after 1 warm-up", flush=True)
    results = []
    for name in args.stages:
        results.append(run_isolated(_stage, name, args.size, args.repeats, args.device, args.dtype))
        print(f"  {name}: {results[-1]['median_s'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    print(markdown_table(results))
    by_name = {r["name"]: r["median_s"] for r in results}
    if {"features_full", "features_early"} <= by_name.keys():
        ratio = by_name["features_early"] / by_name["features_full"]
        print(f"\nearly exit / full feature step: {ratio:.3f} (saves {1 - ratio:.1%}; target >= 35 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
