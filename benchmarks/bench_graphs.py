"""Captured CUDA graphs in the Segmenter: equality with eager calls, first-call cost and timings (issue #25).

One process, random weights, one set of models shared by a graphed segmenter (``cuda_graphs=True``, its own
``GraphCache``), an eager one (``cuda_graphs=False``) and a graphed / eager zero-shot pair (no head):
  1. equality before any timing: 1 term, 4 terms OR-ed, zero-shot 1 term and a gallery batch
     (``predict_images`` of 4 same-size images, 1 term); each case runs once on the graphed segmenter
     (that call captures, and returns the eager result), then its replay is compared with the eager
     segmenter's maps: max |graphed - eager| relative to the eager maps' max, PASS at <= 1e-3; on CUDA
     every purpose must also have been captured (none gone eager). Exit code 1 if any check fails; the
     timings are taken either way;
  2. first-call cost: set_image + predict of 1 term on a segmenter with an empty graph cache (its
     captures included) against an eager one and the same graphed call once captured;
  3. interleaved timings (median of --repeats rounds after one warm-up round): (a) one mask, image
     not yet set, next to the naive pipeline; (b) 4 terms OR-ed; (c) gallery masks per second with
     ``predict_images`` at batch 1, 4 and 16. Every set_image / predict_images starts with an empty
     term cache, and the term names keep one token count, so no call hits a cache or a new graph.

    python benchmarks/bench_graphs.py [--size sd-v1|tiny] [--device cuda|cpu] [--dtype fp16|fp32|bf16]
                                      [--resolution 384] [--repeats 20]
"""

from __future__ import annotations

import itertools
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from ldznet_ext.graphs import AGREEMENT, GraphCache
from ldznet_ext.precision import DTYPES
from ldznet_ext.segmenter import Prediction, Segmenter, SegmenterSettings

from bench_mask import (MAPS_AS_THEY_ARE, TIMESTEP, build_models, check_mask_bench_args, markdown_tables,
                        mask_bench_parser, naive_probability, relative_difference)
from common import environment, load_average, peak_rss_mib, sync, time_interleaved

GALLERY_BATCHES = (1, 4, 16)
# Goals of issue #25, for an H100 in fp16 at 384 px, SD v1 size
TARGET_ONE_MASK_MS = 30.0
TARGET_NAIVE_RATIO = 0.5
TARGET_FOUR_TERMS_MS = 35.0
TARGET_GALLERY_PER_S = 60.0


class Segmenters:
    """The segmenters on one set of models, their image and gallery, and fresh term names."""

    def __init__(self, size: str, resolution: int, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.backbone, self.head, self.config = build_models(size, resolution, device, dtype)
        self.settings = SegmenterSettings(resolution=resolution, timestep=TIMESTEP)
        self.graphed = self.segmenter(head=True, graphed=True)
        self.eager = self.segmenter(head=True, graphed=False)
        self.zero_shot_graphed = self.segmenter(head=False, graphed=True)
        self.zero_shot_eager = self.segmenter(head=False, graphed=False)
        rng = np.random.default_rng(0)
        self.gallery = [rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
                        for _ in range(max(GALLERY_BATCHES))]
        self.image = self.gallery[0]
        side = resolution // self.backbone.downsample_factor
        self.noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        # One digit each: every name has the same token count (zero-shot graphs are keyed by token spans)
        self._names = itertools.cycle([f"thing {i}" for i in range(1, 10)])

    def segmenter(self, head: bool, graphed: bool) -> Segmenter:
        """A segmenter on the shared models; a graphed one gets its own graph cache."""
        settings = replace(self.settings, cuda_graphs=graphed)
        models = (self.head, self.config) if head else (None, None)
        return Segmenter(self.backbone, *models, settings, graphs=GraphCache() if graphed else None)

    def expression(self, k: int) -> str:
        """k term names OR-ed, not asked in the last few calls."""
        return " OR ".join(next(self._names) for _ in range(k))

    def mask(self, segmenter: Segmenter, k: int) -> Prediction:
        """set_image + predict of k terms: the image is encoded anew, the term cache is empty."""
        segmenter.set_image(self.image)
        return segmenter.predict(self.expression(k))

    def masks(self, segmenter: Segmenter, batch: int) -> list[Prediction]:
        """Gallery masks: one term on ``batch`` same-size images in one ``predict_images`` call."""
        return segmenter.predict_images(self.gallery[:batch], self.expression(1))

    def naive(self) -> Tensor:
        return naive_probability(self.backbone, self.head, self.config, self.image, self.expression(1), self.noise)


def maps(predictions: list[Prediction]) -> Tensor:
    """Every combined and per-term probability map of ``predictions``, stacked, float32."""
    return torch.stack([m.float() for p in predictions for m in (p.probability, *p.terms.values())])


def equality_checks(s: Segmenters) -> list[tuple[str, float, bool]]:
    """(case, relative difference, passed) for each case; names repeat in one case's two runs so
    that both sides see the same prompts."""
    cases: dict[str, tuple[Segmenter, Segmenter, Callable[[Segmenter], list[Prediction]]]] = {
        "1 term": (s.graphed, s.eager, lambda seg: [seg.predict("thing 1", MAPS_AS_THEY_ARE)]),
        "4 terms OR-ed": (s.graphed, s.eager,
                          lambda seg: [seg.predict("thing 1 OR thing 2 OR thing 3 OR thing 4", MAPS_AS_THEY_ARE)]),
        "zero-shot 1 term": (s.zero_shot_graphed, s.zero_shot_eager,
                             lambda seg: [seg.predict("thing 1", MAPS_AS_THEY_ARE)]),
        "gallery batch 4, 1 term": (s.graphed, s.eager,
                                    lambda seg: seg.predict_images(s.gallery[:4], "thing 1", MAPS_AS_THEY_ARE)),
    }
    def fresh(segmenter: Segmenter, run: Callable[[Segmenter], list[Prediction]]) -> Tensor:
        segmenter.set_image(s.image)  # a new image state: its term cache is empty
        return maps(run(segmenter))

    results = []
    for case, (graphed, eager, run) in cases.items():
        fresh(graphed, run)  # captures where graphs apply (and returns the eager result)
        difference = relative_difference(fresh(graphed, run), fresh(eager, run))
        results.append((case, difference, difference <= AGREEMENT))
    return results


def graphs_engaged(s: Segmenters) -> tuple[str, bool]:
    """What the graph caches hold after the checks, and whether graphs were used where they should be."""
    lines, engaged = [], True
    for what, segmenter in (("head", s.graphed), ("zero-shot", s.zero_shot_graphed)):
        cache = segmenter.graphs
        gone = "; ".join(f"{purpose}: {why}" for purpose, why in cache.disabled.items()) or "none"
        lines.append(f"graph cache ({what} segmenter): {len(cache)} captured calls, "
                     f"{cache.memory_bytes / 2**20:.1f} MiB; purposes gone eager: {gone}")
        engaged &= len(cache) > 0 and not cache.disabled
    if s.graphed.graphs.device_type != s.device.type:
        return "\n".join(lines + [f"graphs engaged: n/a on {s.device.type} (every call is eager there)"]), True
    return "\n".join(lines + [f"graphs engaged: {'PASS' if engaged else 'FAIL'}"]), engaged


def first_call_cost(s: Segmenters) -> str:
    """ms of the first graphed set_image + predict (empty graph cache: capture included), an eager one,
    and the same graphed call again (replayed); the fresh cache is dropped afterwards."""
    fresh = s.segmenter(head=True, graphed=True)
    times = []
    for segmenter in (fresh, s.eager, fresh):
        sync(s.device)
        start = time.perf_counter()
        s.mask(segmenter, 1)
        sync(s.device)
        times.append((time.perf_counter() - start) * 1e3)
    memory = fresh.graphs.memory_bytes / 2**20
    fresh.graphs.clear()
    return (f"first call (set_image + predict, 1 term): graphed with an empty cache {times[0]:.1f} ms "
            f"(captures {memory:.1f} MiB), eager {times[1]:.1f} ms, graphed once captured {times[2]:.1f} ms")


def timings(s: Segmenters, repeats: int) -> tuple[dict[str, list[float]], list[tuple[str, str, str, str]]]:
    """Interleaved timings; returns {label: seconds per run} and (what, numerator, denominator, target)."""
    naive = "naive pipeline: VAE + text + full UNet + LD-ZNet, 1 term"
    runs: dict[str, Callable[[], object]] = {naive: s.naive}
    for k in (1, 4):
        for which, segmenter in (("eager", s.eager), ("graphed", s.graphed)):
            runs[f"{which}: set_image + predict, {k} term(s)"] = lambda seg=segmenter, k=k: s.mask(seg, k)
    for batch in GALLERY_BATCHES:
        for which, segmenter in (("eager", s.eager), ("graphed", s.graphed)):
            runs[f"{which}: predict_images, batch {batch}"] = lambda seg=segmenter, b=batch: s.masks(seg, b)
    comparisons = [("(a) one mask: graphed / naive", "graphed: set_image + predict, 1 term(s)", naive,
                    f"<= {TARGET_NAIVE_RATIO}"),
                   ("(a) one mask: eager / naive", "eager: set_image + predict, 1 term(s)", naive, ""),
                   ("(a) one mask: graphed / eager", "graphed: set_image + predict, 1 term(s)",
                    "eager: set_image + predict, 1 term(s)", ""),
                   ("(b) 4 terms: graphed / eager", "graphed: set_image + predict, 4 term(s)",
                    "eager: set_image + predict, 4 term(s)", "")]
    comparisons += [(f"(c) gallery batch {b}: graphed / eager", f"graphed: predict_images, batch {b}",
                     f"eager: predict_images, batch {b}", "") for b in GALLERY_BATCHES]

    def report(round_number: int, times: dict[str, list[float]]) -> None:
        medians = ", ".join(f"{statistics.median(t) * 1e3:.0f}" for t in times.values())
        print(f"  round {round_number}/{repeats}, medians so far (ms): {medians}", file=sys.stderr, flush=True)

    return time_interleaved(runs, s.device, repeats, report), comparisons


def targets(times: dict[str, list[float]]) -> str:
    """The issue's goals against the medians (they are set for an H100 in fp16 at 384 px, SD v1 size)."""
    def ms(label: str) -> float:
        return statistics.median(times[label]) * 1e3

    one, four = ms("graphed: set_image + predict, 1 term(s)"), ms("graphed: set_image + predict, 4 term(s)")
    ratio = one / ms("naive pipeline: VAE + text + full UNet + LD-ZNet, 1 term")
    lines = ["| goal (H100 fp16, 384 px, sd-v1) | measured | target | met |", "|---|---|---|---|",
             f"| (a) graphed one mask, ms | {one:.1f} | <= {TARGET_ONE_MASK_MS:.0f} | {one <= TARGET_ONE_MASK_MS} |",
             f"| (a) graphed / naive | {ratio:.3f} | <= {TARGET_NAIVE_RATIO} | {ratio <= TARGET_NAIVE_RATIO} |",
             f"| (b) graphed 4 terms, ms | {four:.1f} | <= {TARGET_FOUR_TERMS_MS:.0f} | "
             f"{four <= TARGET_FOUR_TERMS_MS} |"]
    for batch in GALLERY_BATCHES:
        rates = {which: batch / (ms(f"{which}: predict_images, batch {batch}") / 1e3) for which in ("eager", "graphed")}
        target = f">= {TARGET_GALLERY_PER_S:.0f}" if batch == max(GALLERY_BATCHES) else ""
        met = str(rates["graphed"] >= TARGET_GALLERY_PER_S) if target else ""
        lines.append(f"| (c) gallery masks/s at batch {batch}, graphed (eager) | {rates['graphed']:.1f} "
                     f"({rates['eager']:.1f}) | {target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = mask_bench_parser(__doc__.splitlines()[0], 20, None, "default: fp16 on CUDA, else fp32")
    args = parser.parse_args(argv)
    check_mask_bench_args(parser, args)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    # The graph cache logs each capture (purpose, shapes, MiB) and each fallback to eager
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("ldznet_ext.graphs").setLevel(logging.INFO)

    print(f"{environment(args.device, dtype_name)}; {args.size} models with random weights, image "
          f"{args.resolution}x{args.resolution}, median of {args.repeats} rounds after 1 warm-up round; "
          f"{load_average()} at the start", flush=True)
    torch.set_flush_denormal(True)
    with torch.no_grad():  # what the Segmenter runs under
        s = Segmenters(args.size, args.resolution, device, DTYPES[dtype_name])
        passed = True
        for case, difference, ok in equality_checks(s):
            print(f"equality, {case}: max |graphed - eager| / max |eager| = {difference:.3e} "
                  f"(<= {AGREEMENT:g}) {'PASS' if ok else 'FAIL'}", flush=True)
            passed &= ok
        engaged_report, engaged = graphs_engaged(s)
        print(engaged_report, flush=True)
        print(first_call_cost(s), flush=True)
        times, comparisons = timings(s, args.repeats)
    print(markdown_tables(times, comparisons))
    print()
    print(targets(times))
    cache = s.graphed.graphs
    memory = (f"\ngraph cache after the timings (head segmenter): {len(cache)} captured calls, "
              f"{cache.memory_bytes / 2**20:.1f} MiB; {load_average()} at the end; peak RSS {peak_rss_mib():.0f} MiB")
    if device.type == "cuda":
        memory += f", peak GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    print(memory)
    ok = passed and engaged
    print(f"checks: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
