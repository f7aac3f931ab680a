"""Zero-shot variants on the micro world, one after the other: mIoU / IoU_FG / AP (x 100, CLIPSeg
method, as `ldznet eval --zero-shot`) and seconds per image, and optionally the text binding.

    .venv/bin/python tools/zero_shot_sweep.py --data world:val:100                 # every variant
    .venv/bin/python tools/zero_shot_sweep.py --data world:test:100 --variants agreement,cross-1
    .venv/bin/python tools/zero_shot_sweep.py --data world:val:100 --variants cross-1 --binding

Choose on the validation split, then run the chosen variant and the baselines on test. ``--binding``
adds, per variant, the pixel AUC of a present phrase's map telling the named object's pixels from
those of the scene's other phrases, averaged over phrases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldznet_ext.data.spec import open_source  # noqa: E402
from ldznet_ext.defaults import WEIGHTS_DIR  # noqa: E402
from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.eval.evaluate import evaluate  # noqa: E402
from ldznet_ext.loading import load_segmenter  # noqa: E402
from ldznet_ext.outputs import writable_path  # noqa: E402
from ldznet_ext.world.binding import binding_auc  # noqa: E402
from ldznet_ext.zeroshot import ZeroShotSettings  # noqa: E402

ISEG = ((4, 0.7), (2, 0.3))  # iSeg's 16^2 / 32^2 weights at 512 px
DIFFSEGMENTER = ((8, 0.3), (4, 0.5), (2, 0.1), (1, 0.1))
EVERY = ((1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0))
FINEST = ((1, 1.0),)


def _attention(scales, timestep=100, steps=0, sharpen=1.0, draws=1) -> ZeroShotSettings:
    return ZeroShotSettings(score="attention", timestep=timestep, draws=draws, attention_scales=scales,
                            propagation_steps=steps, sharpen=sharpen)


VARIANTS: dict[str, ZeroShotSettings] = {
    "agreement": ZeroShotSettings(score="agreement", timestep=400, draws=4),
    "agreement+block14": ZeroShotSettings(score="agreement", timestep=400, draws=4, cross_attention=0.5,
                                          attention_blocks=(14,)),
    "daam-all": _attention(EVERY),
    "cross-iseg": _attention(ISEG),
    "cross-diffsegmenter": _attention(DIFFSEGMENTER),
    "cross-1": _attention(FINEST),
    "cross-1-t200": _attention(FINEST, timestep=200),
    "cross-1-t400": _attention(FINEST, timestep=400),
    "cross-1+2": _attention(((1, 0.7), (2, 0.3))),
    "cross-1-2draws": _attention(FINEST, draws=2),
    "iseg-x-self": _attention(ISEG, steps=1),
    "diffsegmenter-x-self": _attention(DIFFSEGMENTER, steps=1),
    "cross-1-x-self": _attention(FINEST, steps=1),
    "cross-1-x-self-t200": _attention(FINEST, timestep=200, steps=1),
    "cross-1-x-self-t400": _attention(FINEST, timestep=400, steps=1),
    "cross-1-x-sharp16": _attention(FINEST, steps=1, sharpen=16.0),
    "cross-1-x-sharp16-5": _attention(FINEST, steps=5, sharpen=16.0),
    "iseg-x-sharp16-5": _attention(ISEG, steps=5, sharpen=16.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="world:val:100")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names: " + ", ".join(VARIANTS))
    parser.add_argument("--binding", action="store_true", help="also the text-binding AUC")
    parser.add_argument("--output", help="JSON lines, one per variant")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    torch.set_num_threads(1)
    try:  # refused before the first variant's minutes of work
        if args.output:
            writable_path(args.output)
        base = load_segmenter(WEIGHTS_DIR / "micro-sd-v1.safetensors", None, device="cpu")
        source = open_source(args.data, size=base.resolution)
    except LdznetError as error:
        parser.error(str(error))
    header = f"| {args.data} variant | mIoU | IoU_FG | AP | s/image |" + (" binding AUC |" if args.binding else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in names:
        segmenter = base.with_settings(zero_shot=VARIANTS[name])
        start = time.perf_counter()
        result = evaluate(segmenter, source, name, progress=False)
        seconds = (time.perf_counter() - start) / result.examples
        s = result.summary
        row = {"variant": name, "data": args.data, "miou": 100 * s.miou, "iou_fg": 100 * s.iou_fg, "ap": 100 * s.ap,
               "seconds_per_image": seconds}
        if args.binding:
            row["binding_auc"] = binding_auc(segmenter, source)
        cells = [f"{row[k]:.1f}" for k in ("miou", "iou_fg", "ap")] + [f"{seconds:.2f}"]
        cells += [f"{row['binding_auc']:.3f}"] if args.binding else []
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        if args.output:
            with open(args.output, "a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
