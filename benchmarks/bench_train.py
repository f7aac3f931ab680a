"""Time one training step of a head (LD-ZNet, ZNet, RGBNet) on a frozen SD v1 backbone, random weights.

For each configuration of a grid (--arch x --precision x gradient checkpointing off/on) one Trainer
(ldznet_ext/train/trainer.py) is built with the official recipe (``PRESETS["official"]``: AdamW,
EMA, plateau schedule, PhraseCut templates) at --resolution px and --batch-size samples, runs one
untimed warm-up step and then --steps timed ``train_step()`` calls, and is freed before the next.
Each step draws new synthetic examples (uint8 noise images with two blob-masked phrases, made in
memory), so the VAE and the text encoder run every step, as in a first epoch. Reported: the median
seconds per step, samples per second (batch / median), and peak memory over construction and
steps: GPU memory allocated by torch (the frozen backbone included) on CUDA, the process's peak
RSS on the CPU (reset per configuration where Linux allows it). Nothing is written to disk.

Each configuration is freed before the next, so the peak is one configuration's: at SD v1 size
about 18.5 GB of fp32 head weights, gradients, AdamW moments and EMA (926 M parameters), 2 GB of
fp16 SD model, plus activations; meant for one 80 GB GPU. A configuration that runs out of GPU
memory is reported as such and the grid goes on. On a GPU at SD v1 size:

    python benchmarks/bench_train.py --size sd-v1 --device cuda --dtype fp16 --precision fp32 bf16 --steps 5

A quick check on the CPU: python benchmarks/bench_train.py --size tiny --resolution 64 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from ldznet_ext.data.examples import Example
from ldznet_ext.modeling.build import ARCHITECTURES
from ldznet_ext.precision import DTYPES
from ldznet_ext.sd.model import StableDiffusion
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import AutoencoderKL, vae_config
from ldznet_ext.train.config import PRECISIONS, PRESETS, TrainConfig
from ldznet_ext.train.trainer import Trainer

from bench_mask import SIZES, TINY_VAE
from common import device_argument, environment, load_average, materialise, peak_rss_mib, time_runs


class SyntheticSource:
    """``count`` examples of ``side`` px made from their index on demand: a uint8 noise image
    [side, side, 3] and two phrases, each with a random elliptic blob as its mask (never empty)."""

    def __init__(self, count: int, side: int):
        self.count, self.side = count, side
        self.description = f"synthetic:{count}x{side}px"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Example:
        rng = np.random.default_rng(index)
        image = rng.integers(0, 256, (self.side, self.side, 3), dtype=np.uint8)
        y, x = np.mgrid[:self.side, :self.side] / self.side
        pairs = []
        for k in range(2):
            (cy, cx), (ry, rx) = rng.uniform(0.2, 0.8, 2), rng.uniform(0.1, 0.3, 2)
            pairs.append((f"blob {index} {k}", ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0))
        return Example(f"synthetic:{index}", image, tuple(pairs))


def build_backbone(size: str, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
    """A random-weight SD v1 model of ``size`` (the tiny one with bench_mask's x8 VAE)."""
    vae = TINY_VAE if size == "tiny" else vae_config(size)
    return StableDiffusion(materialise(lambda: UNetModel(unet_config(size)), device, dtype),
                           materialise(lambda: AutoencoderKL(vae), device, dtype),
                           materialise(lambda: TextEncoder.from_config(text_config(size)), device, dtype))


def reset_peak_memory(device: torch.device) -> bool:
    """Restart the peak-memory count; False where it cannot (CPU off Linux: the process peak so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the process's peak RSS, which getrusage then reports afresh
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch (CUDA) or peak RSS (CPU) since the last reset, in MiB."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()


def measure(backbone: StableDiffusion, source: SyntheticSource, config: TrainConfig,
            steps: int) -> tuple[float, float, float]:
    """(seconds to build the Trainer, median seconds of ``steps`` train steps after one warm-up,
    peak memory in MiB); the Trainer is freed before returning, also when a step fails."""
    device = backbone.device
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(backbone, source, config, run_dir)
        try:
            build = time.perf_counter() - start
            times = time_runs(trainer.train_step, device, steps)
            return build, statistics.median(times), peak_memory_mib(device)
        finally:
            trainer.close_reader()
            del trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def markdown_tables(rows: list[dict], memory: str) -> str:
    """The measurements, then gradient checkpointing on / off per arch and precision."""
    lines = [f"| arch | precision | grad checkpoint | s/step | samples/s | {memory} (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['precision']} | {r['ckpt']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['arch']} | {r['precision']} | {r['ckpt']} | {r['seconds']:.3f} | "
                         f"{r['samples']:.2f} | {r['memory']:,.0f} |")
    lines += ["", "| arch | precision | grad checkpointing on / off: time | memory |", "|---|---|---|---|"]
    done = {(r["arch"], r["precision"], r["ckpt"]): r for r in rows if "error" not in r}
    for (arch, precision, ckpt), on in done.items():
        off = done.get((arch, precision, "off"))
        if ckpt == "on" and off is not None:
            lines.append(f"| {arch} | {precision} | {on['seconds'] / off['seconds']:.3f} | "
                         f"{on['memory'] / off['memory']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="sd-v1", help="model size (tiny: a quick check)")
    parser.add_argument("--resolution", type=int, default=384, help="image side in pixels, a multiple of 64")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step (official: 4 per GPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--device", type=device_argument, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the frozen SD model (fp16 on a GPU); the head trains in fp32")
    parser.add_argument("--arch", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                        help="the head's autocast (bf16, fp16: CUDA only)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.resolution % 64:
        parser.error(f"--resolution must be a multiple of 64, got {args.resolution}")
    if min(args.batch_size, args.steps) < 1:
        parser.error(f"--batch-size and --steps must be at least 1, got {args.batch_size} and {args.steps}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    print(f"{environment(args.device, args.dtype)}, {args.size} models with random weights, image "
          f"{args.resolution}x{args.resolution}, batch {args.batch_size}, median of {args.steps} steps after "
          f"1 warm-up step; {load_average()} at the start", flush=True)
    precisions = list(dict.fromkeys(args.precision))
    if device.type != "cuda":
        for skipped in [p for p in precisions if p != "fp32"]:
            print(f"note: skipping precision {skipped}: autocast training is for CUDA, not {device.type}")
        precisions = [p for p in precisions if p == "fp32"]
        if not precisions:
            print("nothing left to measure")
            return 0
    backbone = build_backbone(args.size, device, DTYPES[args.dtype])
    source = SyntheticSource((args.steps + 1) * args.batch_size, args.resolution)
    rows, resets = [], True
    for arch in dict.fromkeys(args.arch):
        for precision in precisions:
            for ckpt in (False, True):
                config = TrainConfig.from_dict({**PRESETS["official"], "arch": arch, "data": source.description,
                                                "resolution": args.resolution, "batch_size": args.batch_size,
                                                "precision": precision, "grad_checkpoint": ckpt, "workers": 0})
                row = {"arch": arch, "precision": precision, "ckpt": "on" if ckpt else "off"}
                resets = reset_peak_memory(device) and resets
                try:
                    build, seconds, memory = measure(backbone, source, config, args.steps)
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of GPU memory"
                else:
                    row.update(seconds=seconds, samples=args.batch_size / seconds, memory=memory)
                    print(f"  {arch} {precision} checkpoint {row['ckpt']}: built in {build:.1f} s, "
                          f"{seconds:.3f} s/step", file=sys.stderr, flush=True)
                rows.append(row)
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS" + ("" if resets else " so far")
    print(markdown_tables(rows, memory))
    print(f"\n{load_average()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
