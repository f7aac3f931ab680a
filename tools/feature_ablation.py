"""Do the micro LD-ZNet's SD features matter, and for which object sizes? (issue #26, hypothesis 1)

Evaluates the embedded ZNet and LD-ZNet heads as ``ldznet eval`` does (CLIPSeg method, present
phrases, edge refinement on) and LD-ZNet with its tapped SD features replaced:

- noise: Gaussian noise with each feature's own mean and std (per image and block);
- zeros: all zero;
- spatial mean: each channel's mean over the grid at every cell (keeps *what*, drops *where*).

Each method's per-sample IoU is taken at its own best global threshold (the one its mIoU uses) and
averaged per bin: stuff phrases, and the other phrases by mask area in pixels at 128 px (areas at
another render size are scaled to 128 px).

    .venv/bin/python tools/feature_ablation.py --data world:test:100
    .venv/bin/python tools/feature_ablation.py --data world:test:100 --resolution 256 --json out.json
    .venv/bin/python tools/feature_ablation.py --model RUN/micro-sd-v1.safetensors --ldznet-head HEAD.safetensors

``--model`` and the head options evaluate another micro SD and heads (a head trained on that SD) in place of
the embedded ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldznet_ext.checkpoint_io import readable_file  # noqa: E402
from ldznet_ext.data.examples import Example, Source  # noqa: E402
from ldznet_ext.data.spec import open_source  # noqa: E402
from ldznet_ext.defaults import WEIGHTS_DIR  # noqa: E402
from ldznet_ext.eval.evaluate import evaluate  # noqa: E402
from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.eval.metrics import THRESHOLDS, SegmentationMetrics  # noqa: E402
from ldznet_ext.heads import read_head_config  # noqa: E402
from ldznet_ext.limits import RESOLUTION, SEED, bounded_number  # noqa: E402
from ldznet_ext.loading import load_segmenter  # noqa: E402
from ldznet_ext.outputs import writable_path  # noqa: E402
from ldznet_ext.segmenter import Segmenter  # noqa: E402
from ldznet_ext.world.scenes import VOCABULARY  # noqa: E402

REFERENCE_SIZE = 128
AREA_EDGES = (100, 400, 1600)  # pixels at REFERENCE_SIZE
STUFF = "stuff"
REPLACEMENTS = ("noise", "zeros", "spatial mean")


def bin_names(edges: Sequence[int] = AREA_EDGES) -> list[str]:
    """The area bins' names, smallest first, then the stuff bin."""
    inner = [f"{a}-{b} px" for a, b in zip(edges, edges[1:])]
    return [f"< {edges[0]} px", *inner, f">= {edges[-1]} px", STUFF]


def size_bin(phrase: str, area: int, size: int, edges: Sequence[int] = AREA_EDGES) -> str:
    """The bin of a present phrase whose mask covers ``area`` pixels of a ``size`` x ``size`` render."""
    if phrase in VOCABULARY.stuff:
        return STUFF
    scaled = area * (REFERENCE_SIZE / size) ** 2
    return bin_names(edges)[int(np.searchsorted(edges, scaled, side="right"))]


def replace_feature(feature: Tensor, how: str, generator: torch.Generator) -> Tensor:
    """``feature`` [B, C, h, w] replaced as ``how`` (one of REPLACEMENTS) says (module docstring)."""
    if how == "zeros":
        return torch.zeros_like(feature)
    if how == "spatial mean":
        return feature.mean(dim=(2, 3), keepdim=True).expand_as(feature).clone()
    if how == "noise":
        flat = feature.flatten(1)
        mean, std = flat.mean(1), flat.std(1)
        noise = torch.randn(feature.shape, generator=generator, dtype=torch.float32).to(feature)
        return mean.view(-1, 1, 1, 1) + std.view(-1, 1, 1, 1) * noise
    raise ValueError(f"unknown replacement {how!r}; expected one of {REPLACEMENTS}")


def with_replaced_features(segmenter: Segmenter, how: str, seed: int = 0) -> Segmenter:
    """``segmenter`` (an LD-ZNet) whose head gets its tapped SD features replaced as ``how`` says."""
    tapped: Callable[..., dict[int, Tensor]] = segmenter.head_features
    generator = torch.Generator().manual_seed(seed)

    def replaced(*args) -> dict[int, Tensor]:
        return {block: replace_feature(f, how, generator) for block, f in tapped(*args).items()}

    segmenter.head_features = replaced  # the instance's own: every head prediction calls self.head_features
    return segmenter


def per_bin_iou(metrics: SegmentationMetrics, bins: Sequence[str],
                threshold: float | None = None) -> tuple[float, dict[str, tuple[int, float]]]:
    """(the threshold, {bin: (samples, mean per-sample IoU at that threshold)}) for samples in ``metrics``
    order whose bins are ``bins``; the threshold is ``threshold`` or else the one the mIoU uses."""
    ious = metrics.sample_ious()
    best = int(np.argmax(ious.mean(axis=0))) if threshold is None else int(np.argmin(abs(THRESHOLDS - threshold)))
    labels = np.asarray(bins)
    return float(THRESHOLDS[best]), {name: (int((labels == name).sum()), float(ious[labels == name, best].mean()))
                                     for name in dict.fromkeys(bins)}


def sample_bins(source: Source, metrics: SegmentationMetrics, size: int) -> list[str]:
    """Each scored sample's bin, from its key (example index, phrase position) and mask area."""
    examples: dict[int, Example] = {}
    bins = []
    for (index, position), counts in zip(metrics.keys, metrics.counts):
        example = examples.setdefault(index, source[index])
        phrase = example.pairs[position][0]
        bins.append(size_bin(phrase, int(counts[0, 0] + counts[0, 2]), size))
    return bins


def run(data: str, resolution: int, seed: int, model: Path | None = None, ldznet_head: Path | None = None,
        znet_head: Path | None = None) -> dict:
    """Every method's threshold and per-bin (count, IoU) on ``data`` at ``resolution``; ``model`` and the heads
    default to the embedded micro SD and heads."""
    sd = model or WEIGHTS_DIR / "micro-sd-v1.safetensors"
    for given, what, arch in ((model, "model", None), (ldznet_head, "LD-ZNet head", "ldznet"),
                              (znet_head, "ZNet head", "znet")):
        if given is not None:  # refused before the first method's minutes of work, not after
            readable_file(given, what)
            # another architecture would read no SD features: every replacement "changes nothing"
            if arch is not None and (found := read_head_config(given).arch) != arch:
                raise LdznetError(f"{given}: a {found} head given as the {what}")
    methods: dict[str, Callable[[], Segmenter]] = {
        "ZNet": lambda: load_segmenter(sd, znet_head or WEIGHTS_DIR / "micro-znet.safetensors", device="cpu",
                                       resolution=resolution),
        "LD-ZNet": lambda: load_segmenter(sd, ldznet_head or WEIGHTS_DIR / "micro-ldznet.safetensors", device="cpu",
                                          resolution=resolution)}
    for how in REPLACEMENTS:
        methods[f"LD-ZNet, {how}"] = lambda how=how: with_replaced_features(methods["LD-ZNet"](), how, seed)
    source = open_source(data, size=resolution)
    report: dict = {"data": data, "resolution": resolution, "seed": seed, "model": str(sd),
                    "heads": {"LD-ZNet": str(ldznet_head or "embedded"), "ZNet": str(znet_head or "embedded")},
                    "methods": {}}
    results = {name: evaluate(make(), source, name, progress=False) for name, make in methods.items()}
    bins = sample_bins(source, results["ZNet"].metrics, resolution)  # every method scores the same samples
    ldznet_threshold = results["LD-ZNet"].summary.miou_threshold
    for name, result in results.items():
        if result.metrics.keys != results["ZNet"].metrics.keys:
            raise RuntimeError(f"{name} scored other samples than ZNet")
        threshold, per_bin = per_bin_iou(result.metrics, bins)
        report["methods"][name] = {"threshold": threshold, "miou": result.summary.miou, "bins": per_bin,
                                   "bins_at_ldznet_threshold": per_bin_iou(result.metrics, bins, ldznet_threshold)[1],
                                   "seconds": result.seconds}
        print(f"{name}: mIoU {100 * result.summary.miou:.2f} at t = {threshold:.2f}, {result.seconds:.0f} s",
              file=sys.stderr)
    return report


def markdown(report: dict, key: str = "bins") -> str:
    """The report as a table: a row per bin (with its count), a column per method, and the LD-ZNet - ZNet
    gap and each replacement's drop; ``key`` "bins_at_ldznet_threshold" scores every method at LD-ZNet's."""
    methods = report["methods"]
    names = list(methods)
    header = ["bin (area at 128 px)", "n", *names, "LD - Z", *(f"drop: {how}" for how in REPLACEMENTS)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    present = [b for b in bin_names() if b in methods["ZNet"][key]]
    for name in [*present, "all"]:
        if name == "all":
            count = sum(methods["ZNet"][key][b][0] for b in present)
            values = [sum(n * v for n, v in methods[m][key].values()) / count for m in names]
        else:
            count, values = methods["ZNet"][key][name][0], [methods[m][key][name][1] for m in names]
        cells = dict(zip(names, values))
        derived = [cells["LD-ZNet"] - cells["ZNet"], *(cells["LD-ZNet"] - cells[f"LD-ZNet, {h}"] for h in REPLACEMENTS)]
        lines.append(f"| {name} | {count} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " | "
                     + " | ".join(f"{100 * v:+.1f}" for v in derived) + " |")
    if key != "bins":
        return "\n".join(lines) + f"\n\nAll at LD-ZNet's threshold {methods['LD-ZNet']['threshold']:.2f}."
    thresholds = ", ".join(f"{m} {methods[m]['threshold']:.2f}" for m in names)
    return "\n".join(lines) + f"\n\nEach at its own best global threshold: {thresholds}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="world:test:100", help="micro-world data spec (default world:test:100)")
    parser.add_argument("--resolution", type=bounded_number(RESOLUTION), default=REFERENCE_SIZE,
                        help="working and render size (default 128, the heads' training size)")
    parser.add_argument("--seed", type=bounded_number(SEED), default=0,
                        help="seed of the replacement noise (default 0)")
    parser.add_argument("--model", metavar="FILE", type=Path, help="micro SD v1 file (default: the embedded one)")
    parser.add_argument("--ldznet-head", metavar="FILE", type=Path, help="LD-ZNet head (default: the embedded one)")
    parser.add_argument("--znet-head", metavar="FILE", type=Path, help="ZNet head (default: the embedded one)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        if args.json:  # before the work, so that none of it is lost to a bad path
            writable_path(args.json)
        report = run(args.data, args.resolution, args.seed, args.model, args.ldznet_head, args.znet_head)
    except LdznetError as error:  # a bad data spec or resolution: one line, as the ldznet commands
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(markdown(report) + "\n\n" + markdown(report, "bins_at_ldznet_threshold"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
