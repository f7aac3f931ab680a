"""The absent phrases of a micro-world evaluation by kind, and how many of them z can decide (issue #24).

    .venv/bin/ldznet eval --data world:test:100 --presence --include-absent --json EVAL.json
    .venv/bin/python tools/absent_phrases.py EVAL.json [--shape-px 400]

The kinds are those the world draws absent phrases from: absent stuff (``sand``), an absent shape (a plural,
``squares``), a present shape in another colour (``blue star`` beside a red star) and, failing that, a
present colour on another shape (``red circle`` beside a red star). To return a phrase empty a model must
know that none of the objects it could name is there: for a plural every object's shape, for a colour and
a shape the shape of every object of that colour (the others differ in colour). A phrase is *decidable* when every such
object covers at least ``--shape-px`` pixels (counted at 128 px): the micro VAE's decoder restores the
shape of objects from about 400 px, not of smaller ones (docs/micro-world-experiments.md, "Does z hold the
shape for a decoder?"). An undecidable phrase can still come back empty by a guess, but only by the same
guess that empties the present phrases it looks like (a plural whose objects, or an attribute phrase
among objects of its colour, all under ``--shape-px``); their share of present-phrase mIoU, at the
evaluation's best threshold, is what that guess can cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldznet_ext.data.spec import open_source  # noqa: E402
from ldznet_ext.data.world import WorldSource  # noqa: E402
from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.eval.evaluate import EvalResult, absent_summary  # noqa: E402
from ldznet_ext.eval.metrics import THRESHOLDS  # noqa: E402
from ldznet_ext.world.data import SceneSet  # noqa: E402
from ldznet_ext.world.scenes import sample_scene  # noqa: E402
from ldznet_ext.world.spec import OBJECT_LABEL0, VOCABULARY, SceneSpec  # noqa: E402

KINDS = ("absent stuff", "absent shape", "present shape, other colour", "present colour, other shape")
REFERENCE_SIDE = 128  # --shape-px counts pixels of a 128 px scene, the micro models' side


def absent_kind(spec: SceneSpec, phrase: str) -> tuple[str, tuple[int, ...]]:
    """The kind of absent ``phrase`` and the objects whose shape decides it (indices into ``spec.objects``)."""
    if phrase in VOCABULARY.stuff:
        return KINDS[0], ()
    words = phrase.split()
    if len(words) == 1:
        return KINDS[1], tuple(range(len(spec.objects)))
    colour, shape = words
    same_colour = tuple(k for k, o in enumerate(spec.objects) if o.colour == colour)
    kind = KINDS[2] if any(o.shape == shape for o in spec.objects) else KINDS[3]
    return kind, same_colour


def lookalike_objects(spec: SceneSpec, phrase: str) -> tuple[int, ...] | None:
    """For a present object phrase that an absent one could be mistaken for: the objects whose shape tells
    them apart (a plural: its own objects; an attribute phrase: those of its colour, when another shape has
    that colour too). None for stuff, and for an attribute phrase that its colour alone decides."""
    if phrase in VOCABULARY.stuff:
        return None
    words = phrase.split()
    if len(words) == 1:
        return tuple(k for k, o in enumerate(spec.objects) if VOCABULARY.plural(o.shape) == phrase)
    colour, shape = words
    same_colour = tuple(k for k, o in enumerate(spec.objects) if o.colour == colour)
    if all(spec.objects[k].shape == shape for k in same_colour):
        return None
    return same_colour


def report(result: EvalResult, specs: Sequence[SceneSpec], scenes: SceneSet, shape_px: float) -> dict:
    """Counts by kind (absent, empty, decidable, empty among decidable) and the look-alike present phrases;
    example i of the evaluation is scene i of ``scenes``, drawn from ``specs[i]``."""
    metrics = result.metrics
    iou = metrics.sample_ious()  # CLIPSeg's per-sample IoU [N, 49], as the evaluation's mIoU
    summary = absent_summary(metrics)
    best = int(np.argmin(np.abs(THRESHOLDS - summary.present_miou_threshold)))
    scored_present = np.array([c[0, 0] + c[0, 2] > 0 for c in metrics.counts])
    row = {key: i for i, key in enumerate(metrics.keys)}
    if any(len(key) != 2 or not 0 <= key[0] < len(scenes) or not 0 <= key[1] < len(scenes.phrases[key[0]])
           for key in row):
        raise LdznetError(f"{result.data}: the result's samples are not this micro world's phrases")
    kinds = {kind: {"absent": 0, "empty": 0, "decidable": 0, "decidable_empty": 0} for kind in KINDS}
    lookalikes, lookalike_iou, present = 0, 0.0, 0
    scale = (REFERENCE_SIDE / scenes.size) ** 2
    for example, spec in enumerate(specs):
        labels = scenes.labels[example]
        areas = np.bincount(labels.ravel(), minlength=OBJECT_LABEL0 + len(spec.objects))[OBJECT_LABEL0:] * scale
        for index, phrase in enumerate(scenes.phrases[example]):
            if (example, index) not in row:
                continue  # a shard's evaluation or an unreadable example: not scored
            r = row[(example, index)]
            if (phrase in spec.absent) == scored_present[r]:
                raise LdznetError(f"scene {spec.seed}, {phrase!r}: present in one of the result and this micro world, "
                                  "absent in the other; was the result made by another version of the world?")
            if phrase in spec.absent:
                kind, deciding = absent_kind(spec, phrase)
                empty = metrics.unions[r] == 0
                decidable = all(areas[k] >= shape_px for k in deciding)
                entry = kinds[kind]
                entry["absent"] += 1
                entry["empty"] += empty
                entry["decidable"] += decidable
                entry["decidable_empty"] += decidable and empty
                continue
            present += 1
            deciding = lookalike_objects(spec, phrase)
            if deciding is not None and all(areas[k] < shape_px for k in deciding):
                lookalikes += 1
                lookalike_iou += iou[r, best]
    return {"data": result.data, "name": result.name, "shape_px": shape_px, "kinds": kinds,
            "present": present, "present_miou": summary.present_miou,
            "lookalikes": lookalikes, "lookalike_miou_points": 100 * lookalike_iou / max(present, 1),
            "threshold": float(THRESHOLDS[best])}


def markdown(rep: dict) -> str:
    """The report as a markdown table and one line on the look-alikes."""
    px = f"{rep['shape_px']:g}"
    lines = [f"{rep['name']} on {rep['data']}: absent phrases returned empty, decidable = every object whose "
             f"shape decides the phrase covers >= {px} px", "",
             "| kind | absent | empty | decidable | empty among decidable |", "|---|---:|---:|---:|---:|"]
    total = {"absent": 0, "empty": 0, "decidable": 0, "decidable_empty": 0}
    for kind, entry in rep["kinds"].items():
        lines.append(f"| {kind} | {entry['absent']} | {entry['empty']} | {entry['decidable']} | "
                     f"{entry['decidable_empty']} |")
        total = {k: total[k] + entry[k] for k in total}
    lines.append(f"| all | {total['absent']} | {total['empty']} | {total['decidable']} | "
                 f"{total['decidable_empty']} |")
    lines += ["", f"present phrases that the undecidable ones look like (shape objects all under {px} px): "
              f"{rep['lookalikes']} of {rep['present']}, {rep['lookalike_miou_points']:.2f} points of the present "
              f"mIoU ({100 * rep['present_miou']:.2f}) at t = {rep['threshold']:.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", metavar="EVAL.json", help="ldznet eval --include-absent --json output, world data")
    parser.add_argument("--shape-px", type=float, default=400.0,
                        help="smallest object area (pixels at 128 px) whose shape counts as known (default 400)")
    args = parser.parse_args(argv)
    try:
        if not 0 <= args.shape_px <= REFERENCE_SIDE ** 2:
            raise LdznetError(f"--shape-px {args.shape_px:g}: expected 0..{REFERENCE_SIDE ** 2}")
        try:
            data = json.loads(Path(args.result).read_text(encoding="utf-8"))
            results = data["results"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise LdznetError(f"{args.result}: not an ldznet eval result ({error})") from error
        if not isinstance(results, list) or len(results) != 1:
            raise LdznetError(f"{args.result}: expected the result of one evaluation")
        result = EvalResult.from_dict(results[0], args.result)
        if not result.include_absent:
            raise LdznetError(f"{args.result}: evaluated without absent phrases; run ldznet eval --include-absent")
        if not result.data.startswith("world:"):
            raise LdznetError(f"{args.result}: data {result.data!r}; expected micro-world data (world:...)")
        if not len(result.metrics):
            raise LdznetError(f"{args.result}: no sample was scored")
        side = int(round(np.sqrt(result.metrics.counts[0][0].sum())))
        source = open_source(result.data.split(" (")[0], side)  # a domain changes the paint, not the layout
        if not isinstance(source, WorldSource):
            raise LdznetError(f"{args.result}: data {result.data!r} names phrases the world did not draw; evaluate "
                              "on world:SPLIT:N without ?negatives")
        specs = [sample_scene(int(seed)) for seed in source.scenes.seeds]
        rep = report(result, specs, source.scenes, args.shape_px)
    except LdznetError as error:
        print(f"absent_phrases: error: {error}", file=sys.stderr)
        return 2
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
