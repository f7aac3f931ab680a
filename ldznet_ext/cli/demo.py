"""`ldznet demo`: the main job on the embedded micro model, with ground truth to compare against.

Renders a test scene of the micro world, masks an expression with the embedded SD + LD-ZNet
head, writes image, mask, probability and overlay PNGs and prints the IoU against the scene's own
ground truth, which the world knows exactly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import LdznetError
from ..limits import RENDER_SIZE, SCENE_INDEX, SEED, THRESHOLD, bounded_number
from ..loading import load_segmenter, resolve_model_paths
from ..masks.expression import parse
from ..masks.ops import MaskOptions
from ..masks.tree import Expression
from ..outputs import mask_image, png_writer, probability_image, render_overlay, writable_folder, write_together
from ..world.scenes import VOCABULARY, Scene, make_scene, split_seeds
from .common import add_device_argument
from .mask import report_missing

DEFAULT_SCENE = 7
"""Index into the test split of the scene the demo shows (one with an attribute phrase and grass)."""
FILES = ("image.png", "mask.png", "probability.png", "overlay.png")
RECORD = "demo.json"
"""What a demo writes into its folder: the PNGs, then a record of the run (seed, expression, the files),
which lets a later demo replace them; files of those names that no demo recorded are the user's."""


def default_expression(scene: Scene) -> str:
    """"<first object phrase> OR <first stuff phrase>" of a scene, e.g. "red star OR grass"."""
    present = [p for p in scene.phrases if scene.present(p)]
    objects = [p for p in present if " " in p]
    stuff = ([p for p in present if p in VOCABULARY.stuff and p != "sky"]
             or [p for p in present if p in VOCABULARY.stuff])
    return " OR ".join(p for p in (objects[:1] + stuff[:1]))


def ground_truth(scene: Scene, expression: Expression) -> np.ndarray | None:
    """The expression evaluated on the scene's exact phrase masks (bool [S, S]); None when a term is
    not a phrase the world knows."""
    maps = {}
    for term in expression.terms():
        if term in scene.phrases:
            maps[term] = torch.from_numpy(scene.phrases[term]).float()
        elif term in VOCABULARY.phrases():
            maps[term] = torch.zeros(scene.size, scene.size)
        else:
            return None
    return (expression.evaluate(maps) > 0.5).numpy()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _check_earlier_demo(out: Path) -> None:
    """LdznetError when ``out`` holds a file of a demo's names that no earlier demo there wrote."""
    recorded: set[str] = set()
    try:
        files = json.loads((out / RECORD).read_text(encoding="utf-8")).get("files")
        recorded = {name for name in files if name in FILES} if isinstance(files, list) else set()
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    replaceable = {*recorded, RECORD} if recorded else set()
    for name in (*FILES, RECORD):
        path = out / name
        if (path.exists() or path.is_symlink()) and name not in replaceable:
            raise LdznetError(f"{path}: exists and is no file of an earlier demo in {out}; choose another -o")


def _run(args: argparse.Namespace) -> int:
    seed = split_seeds("test")[args.scene] if args.seed is None else args.seed
    scene = make_scene(seed, size=args.size, domain=args.domain)
    text = default_expression(scene) if args.expression is None else args.expression
    expression = parse(text)
    out = writable_folder(args.output)  # before the model loads
    _check_earlier_demo(out)
    model, head = resolve_model_paths(None, None, zero_shot=args.zero_shot)
    segmenter = load_segmenter(model, head, device=args.device)
    start = time.perf_counter()
    segmenter.set_image(scene.image)
    prediction = segmenter.predict(expression, MaskOptions(threshold=args.threshold))
    seconds = time.perf_counter() - start
    report_missing(prediction)
    mask = prediction.mask_image()
    images = dict(zip(FILES, (Image.fromarray(scene.image), mask_image(mask),
                              probability_image(prediction.probability_image()),
                              Image.fromarray(render_overlay(scene.image, mask)))))
    record = (json.dumps({"seed": seed, "expression": str(expression), "files": list(FILES)}) + "\n").encode()
    write_together({**{out / name: png_writer(image) for name, image in images.items()},
                    out / RECORD: lambda stream: stream.write(record)})  # the record last
    print(f"scene {seed} ({scene.spec.domain}, {scene.size} px): {scene.caption}")
    print(f"expression: {expression}  [{'zero-shot' if head is None else 'LD-ZNet head'}, {seconds * 1000:.0f} ms]")
    truth = ground_truth(scene, expression)
    if truth is not None:
        print(f"IoU against the ground truth: {iou(mask > 127, truth):.3f}")
    print(f"wrote {out}/image.png, mask.png, probability.png, overlay.png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="mask a micro-world scene with the embedded model and score it")
    p.add_argument("expression", nargs="?", help="mask expression (default: an object OR a stuff phrase of the scene)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--scene", type=bounded_number(SCENE_INDEX), default=DEFAULT_SCENE,
                       help="index into the test split, 0..999999 (default %(default)s)")
    which.add_argument("--seed", type=bounded_number(SEED), help="any scene seed instead of --scene")
    p.add_argument("--domain", choices=VOCABULARY.domains, help="render the scene in this domain")
    p.add_argument("--size", type=bounded_number(RENDER_SIZE), default=256,
                   help="image side in pixels, 8..4096 (default %(default)s)")
    p.add_argument("--zero-shot", action="store_true", help="use zero-shot masks instead of the LD-ZNet head")
    p.add_argument("--threshold", type=bounded_number(THRESHOLD), default=0.5,
                   help="a pixel is selected when its probability is above T, 0 <= T < 1 (default 0.5)")
    add_device_argument(p)
    p.add_argument("-o", "--output", default="ldznet-demo", help="output folder (default %(default)s)")
    p.set_defaults(func=_run)
