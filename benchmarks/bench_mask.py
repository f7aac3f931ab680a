"""Time LD-ZNet masks through the Segmenter against a naive pipeline, with random weights.

All in one process, on one image (square, --resolution px), SD timestep 400, one noise draw:
  (a) one mask: set_image + predict of one term, and predict alone (image set), next to the naive
      pipeline (VAE encode, text encode, the FULL SD UNet with the tap, LD-ZNet), which is first
      checked to give the segmenter's map (the segmenter's after edge refinement of the naive map);
      the refinement step of that one map is timed on its own, to show its share of the mask
      (the naive pipeline does not refine);
  (b) k terms: one predict of "t1 OR ... OR tk" (one batch) next to k separate predicts;
  (c) a second expression with new terms on the image already set (z cached) next to the first
      (set_image + predict), both of two terms.
Every predict asks for terms never asked before, so no per-term map comes from the cache; (b) times
predicts only, on the image already set, so that it compares batching alone (at k = 1 both sides
are the same call, measured twice: their ratio shows the run-to-run noise). A measurement shared
by two comparisons (a's predict alone is b's k = 1 batch; c's second expression is b's k = 2 batch)
is taken once. The measurements run in rounds, each calling every one of them once in turn (one
untimed warm-up round, then --repeats timed rounds), so that a load drifting on a shared machine
weighs on both sides of every ratio alike; each figure is the median over the timed rounds.

    python benchmarks/bench_mask.py [--size sd-v1|tiny] [--resolution 384] [--repeats 3] [--threads N]
                                    [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--terms 1 2 4]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ldznet_ext.graphs import AGREEMENT
from ldznet_ext.images import to_model_input
from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.modeling.build import HeadConfig, build_head, head_config
from ldznet_ext.precision import DTYPES
from ldznet_ext.refine import refine_probability
from ldznet_ext.sd.model import StableDiffusion
from ldznet_ext.sd.text import TextEncoder, text_config
from ldznet_ext.sd.unet import UNetModel, unet_config
from ldznet_ext.sd.vae import SCALE_FACTOR, AutoencoderKL, VAEConfig, vae_config
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.tap import FeatureTap

from common import device_argument, environment, load_average, materialise, peak_rss_mib, time_interleaved

SIZES = ("sd-v1", "tiny")
TIMESTEP = 400
TARGET_RATIO = 0.8  # (a): segmenter / naive for one mask
# The "tiny" VAE downsamples by 2, which would give the tiny UNet 192 x 192 latents at 384 px (a
# 36,864-token attention); this one downsamples by 8 as SD's does, so z has the SD v1 side.
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def build_models(size: str, resolution: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[StableDiffusion, nn.Module, HeadConfig]:
    """A random-weight SD v1 model of ``size`` and an LD-ZNet head for ``resolution`` px images."""
    vae = TINY_VAE if size == "tiny" else vae_config(size)
    backbone = StableDiffusion(materialise(lambda: UNetModel(unet_config(size)), device, dtype),
                               materialise(lambda: AutoencoderKL(vae), device, dtype),
                               materialise(lambda: TextEncoder.from_config(text_config(size)), device, dtype))
    config = head_config("ldznet", size, latent_size=resolution // vae.downsample_factor, timestep=TIMESTEP)
    return backbone, materialise(lambda: build_head(config), device, dtype), config


MAPS_AS_THEY_ARE = MaskOptions(presence=False)
"""What the checks predict with: random weights give every term one flat map, which the presence rule
(on by default) decides "not found" and empties, and an empty map agrees with any other."""


def relative_difference(got: Tensor, expected: Tensor) -> float:
    """max |got - expected| relative to max |expected|; inf when ``expected`` is all zero, where a
    comparison would pass whatever ``got`` holds."""
    scale = float(expected.abs().max())
    return float((got.to(expected.device) - expected).abs().max()) / scale if scale > 0 else float("inf")


def naive_probability(backbone: StableDiffusion, head: nn.Module, config: HeadConfig, image: np.ndarray,
                      prompt: str, noise: Tensor) -> Tensor:
    """One term's map with no engine: every step once and the SD UNet run to its end (no early exit).

    ``image`` is uint8 [S, S, 3] with S the head's resolution; ``noise`` [1, 4, S/8, S/8] on the
    model's device and dtype. Returns the probability [S, S] in [0, 1], float32."""
    pixels = to_model_input(image, (image.shape[1], image.shape[0])).to(backbone.device, backbone.dtype)
    z = backbone.vae.encode(pixels) * SCALE_FACTOR
    context = backbone.text_encoder.encode([prompt])
    t = torch.full((1,), config.timestep, dtype=torch.long, device=z.device)
    z_t = backbone.schedule.q_sample(z, t, noise)
    with FeatureTap(backbone.layout, config.sd_blocks, early_exit=False) as tap:
        features = tap.run(lambda: backbone.unet(z_t, t, context))
    logits = head(z, context, features)
    return torch.sigmoid(logits.float())[0, 0]


def run_benchmark(size: str, resolution: int, repeats: int, device_name: str, dtype_name: str,
                  term_counts: list[int]) -> tuple[dict[str, list[float]], list[tuple[str, str, str, str]], bool]:
    """Take the measurements; return {label: seconds per run}, the comparisons to print as
    (what, numerator label, denominator label, target), and whether the two paths' maps agree."""
    torch.set_flush_denormal(True)
    device, dtype = torch.device(device_name), DTYPES[dtype_name]
    backbone, head, config = build_models(size, resolution, device, dtype)
    settings = SegmenterSettings(resolution=resolution, timestep=TIMESTEP)
    segmenter = Segmenter(backbone, head, config, settings)
    image = np.random.default_rng(0).integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
    side = resolution // backbone.downsample_factor
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    fresh = (f"thing {i}" for i in itertools.count())

    def expression(k: int) -> str:
        return " OR ".join(next(fresh) for _ in range(k))

    def first(k: int) -> None:
        segmenter.set_image(image)
        segmenter.predict(expression(k))

    def again(k: int) -> None:
        segmenter.predict(expression(k))

    with torch.no_grad():  # what the Segmenter runs under
        # Both paths must compute the same map (same t and noise; early exit drops no tapped block);
        # the segmenter's is refined as the segmenter refines it (guided by the image, decided on z).
        segmenter.set_image(image)
        naive_map = naive_probability(backbone, head, config, image, "a cat", noise)[None]

        def refine() -> Tensor:
            return refine_probability(naive_map, image, settings.refine, decided_at=(side, side))[0]

        difference = relative_difference(segmenter.predict("a cat", MAPS_AS_THEY_ARE).probability, refine())
        agreed = difference <= AGREEMENT
        print(f"check: max |segmenter - naive| / max |naive| of one term's map = {difference:.2e} "
              f"(<= {AGREEMENT:g}) {'PASS' if agreed else 'FAIL'}", flush=True)
        naive = "naive: VAE + text + full UNet + LD-ZNet, 1 term"
        one = "segmenter: set_image + predict, 1 term"
        refinement = "refinement of 1 term's map (part of set_image + predict)"
        alone = "segmenter: predict, 1 term (image set)"
        runs: dict[str, Callable[[], object]] = {
            naive: lambda: naive_probability(backbone, head, config, image, next(fresh), noise),
            one: lambda: first(1), refinement: refine, alone: lambda: again(1)}
        comparisons = [("(a) one mask: segmenter / naive", one, naive, f"<= {TARGET_RATIO}"),
                       ("(a) refinement's share of one mask", refinement, one, ""),
                       ("(a) predict alone / naive", alone, naive, "")]
        for k in term_counts:
            batched = f"segmenter: predict, {k} terms OR-ed (one batch)" if k > 1 else alone
            separate = f"segmenter: {k} x predict of 1 term (separate calls)"
            runs.setdefault(batched, lambda k=k: again(k))
            runs[separate] = lambda k=k: [again(1) for _ in range(k)]
            comparisons.append((f"(b) k = {k}: one predict / {k} separate", batched, separate, ""))
        second = "segmenter: predict, 2 terms OR-ed (one batch)"
        first_expression = "segmenter: set_image + predict, 2 terms OR-ed"
        runs.setdefault(second, lambda: again(2))
        runs[first_expression] = lambda: first(2)
        comparisons.append(("(c) 2nd expression (z cached) / 1st (set_image + predict)", second,
                            first_expression, ""))

        def report(round_number: int, times: dict[str, list[float]]) -> None:
            medians = ", ".join(f"{statistics.median(t) * 1e3:.0f}" for t in times.values())
            print(f"  round {round_number}/{repeats}, medians so far (ms): {medians}", file=sys.stderr, flush=True)

        times = time_interleaved(runs, device, repeats, report)
    return times, comparisons, agreed


def markdown_tables(times: dict[str, list[float]], comparisons: list[tuple[str, str, str, str]]) -> str:
    """The measurements (median and min, ms) and the ratios of their medians."""
    lines = ["| measurement | median ms | min ms |", "|---|---|---|"]
    lines += [f"| {label} | {statistics.median(t) * 1e3:.1f} | {min(t) * 1e3:.1f} |" for label, t in times.items()]
    lines += ["", "| comparison | ratio of medians | target |", "|---|---|---|"]
    for what, numerator, denominator, target in comparisons:
        ratio = statistics.median(times[numerator]) / statistics.median(times[denominator])
        lines.append(f"| {what} | {ratio:.3f} | {target} |")
    return "\n".join(lines)


def mask_bench_parser(description: str, repeats: int, dtype: str | None, dtype_help: str) -> argparse.ArgumentParser:
    """The options every mask benchmark takes: --size, --resolution, --repeats (rounds after a warm-up
    round, default ``repeats``), --device, --dtype (default ``dtype``); check them with
    :func:`check_mask_bench_args`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=SIZES, default="sd-v1", help="model size (tiny: a quick check)")
    parser.add_argument("--resolution", type=int, default=384, help="image side in pixels, a multiple of 64")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (after one warm-up round)")
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=dtype, help=dtype_help)
    return parser


def check_mask_bench_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what :func:`mask_bench_parser`'s options cannot be (parser.error exits 2)."""
    if args.resolution < 64 or args.resolution % 64:
        parser.error(f"--resolution must be a multiple of 64 from 64 up, got {args.resolution}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")


def main(argv: list[str] | None = None) -> int:
    parser = mask_bench_parser(__doc__.splitlines()[0], 3, "fp32", "fp16 is for GPUs")
    parser.add_argument("--terms", type=int, nargs="+", default=[1, 2, 4], help="term counts k for (b)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    args = parser.parse_args(argv)
    check_mask_bench_args(parser, args)
    if min(args.terms) < 1:
        parser.error(f"--terms must be at least 1, got {args.terms}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    print(f"{environment(args.device, args.dtype)}, {args.size} models with random weights, image "
          f"{args.resolution}x{args.resolution} (z {args.resolution // 8}), median of {args.repeats} rounds "
          f"after 1 warm-up round; {load_average()} at the start", flush=True)
    times, comparisons, agreed = run_benchmark(args.size, args.resolution, args.repeats, args.device, args.dtype,
                                               list(dict.fromkeys(args.terms)))
    print(markdown_tables(times, comparisons))
    memory = f"\n{load_average()} at the end; peak RSS {peak_rss_mib():.0f} MiB"
    if torch.device(args.device).type == "cuda":
        memory += f", peak GPU {torch.cuda.max_memory_allocated(torch.device(args.device)) / 2**20:.0f} MiB"
    print(memory)
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())
