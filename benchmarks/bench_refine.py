"""Cost of image-guided refinement (ldznet_ext/refine.py) next to the mask it refines, and its memory.

  (a) one LD-ZNet mask of a --output x --output image (set_image + predict of one term) with
      refinement off and on, side by side, and the refinement step alone (the term map upsampled
      to the output, guided vs bilinear): added time / one mask. Models: "sd-v1" (SD v1 size,
      random weights, --resolution px working size, as bench_mask) or "micro" (the embedded
      micro model and head, 128 px). The image is a micro-world scene rendered at the output size.
  (b) peak memory of refining one map to --huge x --huge (default 8192), each path in its own
      process (bilinear resize vs refinement), with the image's own bytes counted apart.
Times are medians of --repeats runs after one warm-up.

    python benchmarks/bench_refine.py [--model sd-v1|micro] [--output 1024] [--resolution 384]
                                      [--repeats 3] [--device cpu|cuda] [--dtype fp32|fp16] [--huge 8192]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import cv2
import numpy as np
import torch

from ldznet_ext.defaults import default_model_paths
from ldznet_ext.images import resize_probability
from ldznet_ext.loading import load_segmenter
from ldznet_ext.precision import DTYPES
from ldznet_ext.refine import RefineSettings, refine_probability
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.world.scenes import MAX_SIZE, make_scene

from bench_mask import TIMESTEP, build_models
from common import device_argument, environment, run_isolated, sync, time_runs

TARGET_CPU = 0.10  # refinement adds at most this share of one mask's time on the CPU
TARGET_GPU_MS = 5.0
SCENE_SEED = 1_000_000  # the first scene of the test split


def scene_image(side: int) -> np.ndarray:
    """A micro-world test scene at ``side`` px: flat and textured regions with real object edges
    (beyond the world's largest render size, a 1024 px render enlarged)."""
    if side <= MAX_SIZE:
        return make_scene(SCENE_SEED, side).image
    return cv2.resize(make_scene(SCENE_SEED, 1024).image, (side, side), interpolation=cv2.INTER_NEAREST)


def _segmenter(model: str, resolution: int, device: torch.device, dtype_name: str) -> Segmenter:
    if model == "micro":
        sd, head = default_model_paths()
        return load_segmenter(sd, head, device=device, dtype=dtype_name)
    backbone, head, config = build_models("sd-v1", resolution, device, DTYPES[dtype_name])
    return Segmenter(backbone, head, config, SegmenterSettings(resolution=resolution, timestep=TIMESTEP))


def cost(model: str, output: int, resolution: int, repeats: int, device_name: str, dtype_name: str) -> dict:
    """(a): medians in seconds of a whole mask with refinement off and on, and of the step alone."""
    torch.set_flush_denormal(True)
    device = torch.device(device_name)
    plain = _segmenter(model, resolution, device, dtype_name).with_settings(refine=RefineSettings(enabled=False))
    refined = plain.with_settings(refine=RefineSettings())
    image = scene_image(output)
    words = iter(range(10**9))
    medians = {}
    with torch.no_grad():
        for name, segmenter in (("mask, bilinear", plain), ("mask, refined", refined)):
            def run(segmenter=segmenter) -> None:
                segmenter.set_image(image)
                segmenter.predict(f"thing {next(words)}")
            medians[name] = statistics.median(time_runs(run, device, repeats))
            print(f"  {name}: {medians[name] * 1e3:.1f} ms", file=sys.stderr, flush=True)
        plain.set_image(image)
        plain.predict("red star")
        state = plain._image  # the cached term map and latent size, as the segmenter refines them
        coarse, decided_at = state.cache["red star"][None], tuple(state.z.shape[-2:])
        step_runs = max(repeats, 10)
        medians["step, bilinear"] = statistics.median(
            time_runs(lambda: resize_probability(coarse, image.shape[:2]), device, step_runs))
        medians["step, refined"] = statistics.median(
            time_runs(lambda: refine_probability(coarse, image, decided_at=decided_at), device, step_runs))
    medians["map"] = tuple(coarse.shape[-2:])
    return medians


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _memory(mode: str, side: int) -> dict:
    """(b) in a fresh process: resident memory before and at the peak of one map's upsampling to
    side x side; the peak is reset after the image is made (its rendering peaks on its own)."""
    torch.set_num_threads(1)
    image = scene_image(side)
    coarse = torch.rand(1, 48, 48, generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    before = _rss_mib("VmRSS")
    start = time.perf_counter()
    if mode == "bilinear":
        out = resize_probability(coarse, (side, side))
    else:
        out = refine_probability(coarse, image, decided_at=(side // 64, side // 64))
    seconds = time.perf_counter() - start
    return {"mode": mode, "before_mib": before, "peak_mib": _rss_mib("VmHWM"), "seconds": seconds,
            "output_mib": out.numel() * out.element_size() / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd-v1", "micro"), default="sd-v1")
    parser.add_argument("--output", type=int, default=1024, help="output (image) side in pixels")
    parser.add_argument("--resolution", type=int, default=384, help="working side of the sd-v1 model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--huge", type=int, default=8192, help="side of the memory test (0: skip it)")
    args = parser.parse_args(argv)
    for option, value, low in (("--output", args.output, 64), ("--resolution", args.resolution, 64),
                               ("--repeats", args.repeats, 1), ("--huge", args.huge, 0)):
        if value < low:
            parser.error(f"{option} must be at least {low}, got {value}")
    if args.resolution % 64:
        parser.error(f"--resolution must be a multiple of 64, got {args.resolution}")
    print(f"{environment(args.device, args.dtype)}, model {args.model}, output {args.output}x{args.output}, "
          f"median of {args.repeats} after 1 warm-up", flush=True)
    m = cost(args.model, args.output, args.resolution, args.repeats, args.device, args.dtype)
    print(f"term map {m['map'][1]}x{m['map'][0]} -> {args.output}x{args.output}")
    print("| measurement | median ms |\n|---|---:|")
    for name in ("mask, bilinear", "mask, refined", "step, bilinear", "step, refined"):
        print(f"| {name} | {m[name] * 1e3:.1f} |")
    added = m["step, refined"] - m["step, bilinear"]
    whole = (m["mask, refined"] - m["mask, bilinear"]) / m["mask, bilinear"]
    gpu = torch.device(args.device).type == "cuda"
    target = f"<= {TARGET_GPU_MS:g} ms" if gpu else f"<= {TARGET_CPU:.0%}"
    print(f"\nrefinement step adds {added * 1e3:.1f} ms = {added / m['mask, bilinear']:.1%} of one mask "
          f"(target {target}); whole masks side by side: {whole:+.1%} (run-to-run noise included)")
    if args.huge:
        rows = [run_isolated(_memory, mode, args.huge) for mode in ("bilinear", "refined")]
        print(f"\n{args.huge}x{args.huge}, one map, each in its own process (CPU):")
        print("| path | seconds | RSS before MiB (image loaded) | peak added MiB | of which the output MiB |\n"
              "|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['mode']} | {r['seconds']:.2f} | {r['before_mib']:.0f} | {r['peak_mib'] - r['before_mib']:.0f} "
                  f"| {r['output_mib']:.0f} |")
    sync(torch.device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
