"""Choose and measure the presence rule (ldznet_ext/masks/presence.py) on the micro world.

The rule: a term is found when its score, the probability that the top ``area`` share of the image
reaches (the ``ceil(area * pixels)``-th largest value of its map), exceeds ``level``. Two steps:

    .venv/bin/python tools/calibrate_presence.py collect --data world:val:60 [--zero-shot] -o val.json
    .venv/bin/python tools/calibrate_presence.py choose val.json [--report test.json]

``collect`` runs the embedded model (and its head, or zero-shot) on every phrase of the data, absent
ones included, and stores each phrase's scores for a grid of ``area`` values and, for present
phrases, the CLIPSeg per-sample IoU at the 49 thresholds. ``choose`` picks (area, level) on those
features only: the most absent phrases rejected while present-phrase mIoU drops by at most
``--max-drop`` points, ties to the smaller drop; ``--report`` applies the chosen rule to features
collected on another split (test) and prints the numbers, never choosing on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldznet_ext.data.examples import Source  # noqa: E402
from ldznet_ext.data.files import read_json  # noqa: E402
from ldznet_ext.data.spec import open_source  # noqa: E402
from ldznet_ext.data.stream import iterate_examples  # noqa: E402
from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.eval.metrics import sample_iou, threshold_counts  # noqa: E402
from ldznet_ext.limits import DEVICE_NAMES, Limit, bounded_number, device_name  # noqa: E402
from ldznet_ext.loading import load_segmenter, resolve_model_paths  # noqa: E402
from ldznet_ext.masks.presence import presence_score  # noqa: E402
from ldznet_ext.outputs import writable_path  # noqa: E402
from ldznet_ext.segmenter import Segmenter  # noqa: E402

AREAS = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)  # 0.0: the peak
LEVELS = np.round(np.arange(0.05, 0.96, 0.01), 2)
EMPTY_AT = 0.5  # an absent phrase "comes back empty" when no pixel exceeds eval's binary threshold
MAX_DROP = Limit(float, 0, 100)  # mIoU points


@torch.no_grad()
def presence_rows(segmenter: Segmenter, source: Source, scores: Callable[[dict[str, torch.Tensor]], dict[str, list]],
                  progress: bool = False) -> list[dict]:
    """One row per phrase of ``source``, absent ones included: its example, the phrase, present, the
    ``scores`` of its map (``scores`` gets one image's maps, by phrase), empty (no pixel above EMPTY_AT)
    and, for a present phrase, the CLIPSeg per-sample IoUs at the 49 thresholds."""
    rows = []
    for index, example in iterate_examples(source, range(len(source))):
        segmenter.set_image(example.image)
        maps = segmenter.predict_terms(list(dict.fromkeys(phrase for phrase, _ in example.pairs)))
        scored = scores(maps)
        for phrase, truth in example.pairs:
            p = maps[phrase].float()
            truth = torch.as_tensor(truth, dtype=torch.bool)
            row = {"example": index, "phrase": phrase, "present": bool(truth.any()), "scores": scored[phrase],
                   "empty": bool((p <= EMPTY_AT).all())}
            if row["present"]:
                row["iou"] = sample_iou(threshold_counts(p, truth)).tolist()
            rows.append(row)
        if progress:
            print(f"{index + 1}/{len(source)}", file=sys.stderr)
    return rows


def collect(args: argparse.Namespace) -> None:
    """Per-phrase scores (and per-threshold IoUs of present phrases) of the embedded model on --data."""
    writable_path(args.output)  # before the collection's minutes of work
    model, head = resolve_model_paths(None, None, args.zero_shot)
    segmenter = load_segmenter(model, head, device=args.device)
    source = open_source(args.data, size=segmenter.resolution)
    rows = presence_rows(segmenter, source, lambda maps: {
        phrase: [presence_score(p.float(), area) for area in AREAS] for phrase, p in maps.items()}, progress=True)
    Path(args.output).write_text(json.dumps({"data": args.data, "zero_shot": args.zero_shot, "areas": AREAS,
                                             "rows": rows}) + "\n", encoding="utf-8")


def measure(rows: list[dict], area_index: int | None, level: float) -> dict:
    """Absent phrases returned empty and present-phrase mIoU (best t), with the rule or without (None)."""
    absent = [r for r in rows if not r["present"]]
    present = [r for r in rows if r["present"]]

    def found(r: dict) -> bool:
        return area_index is None or r["scores"][area_index] > level

    empty = sum(r["empty"] or not found(r) for r in absent) / max(1, len(absent))
    iou = np.array([r["iou"] for r in present]) * np.array([[found(r)] for r in present])
    return {"absent": len(absent), "absent_empty": 100 * empty, "present": len(present),
            "present_found": 100 * float(np.mean([found(r) for r in present])),
            "miou": 100 * float(iou.mean(0).max())}


def best_rule(rows: list[dict], areas: int, levels: Iterable[float], max_drop: float) -> tuple[int, float, dict] | None:
    """The (score index, level) that returns the most absent phrases empty while present-phrase mIoU
    drops by at most ``max_drop`` points from no rule's (ties to the smaller drop), with its measures;
    None when no rule keeps within the drop."""
    base, best = measure(rows, None, 0)["miou"], None
    for a in range(areas):
        for level in levels:
            m = measure(rows, a, float(level))
            key = (m["absent_empty"], -(base - m["miou"]))
            if base - m["miou"] <= max_drop and (best is None or key > best[0]):
                best = (key, a, float(level), m)
    return None if best is None else best[1:]


def features(path: str) -> dict:
    """A features file that ``collect`` wrote; LdznetError otherwise."""
    data = read_json(path, "a features file of calibrate_presence.py collect")
    if not isinstance(data, dict) or not {"data", "zero_shot", "areas", "rows"} <= data.keys():
        raise LdznetError(f"{path}: not a features file of calibrate_presence.py collect")
    return data


def choose(args: argparse.Namespace) -> None:
    """Pick (area, level) on the validation features; optionally report it on test features."""
    val = features(args.features)
    chosen = best_rule(val["rows"], len(val["areas"]), LEVELS, args.max_drop)
    if chosen is None:
        raise LdznetError(f"no rule keeps the present phrases' mIoU within --max-drop {args.max_drop:g} points")
    a, level, m = chosen
    area = val["areas"][a]
    print(json.dumps({"data": val["data"], "zero_shot": val["zero_shot"], "area": area, "level": level,
                      "before": measure(val["rows"], None, 0), "after": m}))
    if args.report:
        test = features(args.report)
        if test["zero_shot"] != val["zero_shot"]:
            kinds = ["zero-shot" if f["zero_shot"] else "head" for f in (test, val)]
            raise LdznetError(f"{args.report}: features of {kinds[0]} maps; the rule was chosen on {kinds[1]} maps")
        a = test["areas"].index(area)
        print(json.dumps({"data": test["data"], "zero_shot": test["zero_shot"], "area": area, "level": level,
                          "before": measure(test["rows"], None, 0), "after": measure(test["rows"], a, level)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("collect", help="per-phrase presence features of the embedded model")
    p.add_argument("--data", required=True, help="e.g. world:val:60 (choose) or world:test:100 (report)")
    p.add_argument("--zero-shot", action="store_true", help="zero-shot maps instead of the embedded head")
    p.add_argument("--device", type=device_name, default="cpu", help=f"{DEVICE_NAMES} (default cpu)")
    p.add_argument("-o", "--output", required=True, help="features JSON")
    p = commands.add_parser("choose", help="pick the rule on validation features")
    p.add_argument("features", help="features JSON of a validation split")
    p.add_argument("--report", help="features JSON of the test split: apply the chosen rule, print the numbers")
    p.add_argument("--max-drop", type=bounded_number(MAX_DROP), default=0.5,
                   help="allowed present mIoU drop on val, points (default 0.5)")
    args = parser.parse_args()
    try:
        (collect if args.command == "collect" else choose)(args)
    except LdznetError as error:  # a bad spec, device or file: one line, as the ldznet commands
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
