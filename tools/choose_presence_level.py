"""Choose the level of a head's learned presence output on validation data and write it into a copy.

    .venv/bin/python tools/choose_presence_level.py HEAD.safetensors --data world:val:60 -o HEAD-calibrated.safetensors
    .venv/bin/python tools/choose_presence_level.py HEAD.safetensors --model sd-v1-5.safetensors \
        --data 'phrasecut:/data/VGPhraseCut_v0:val?negatives=1' --device cuda -o HEAD-calibrated.safetensors

The head's score (sigmoid of its presence logit) is collected for every phrase of ``--data``,
absent ones included, with each present phrase's CLIPSeg per-sample IoUs at the 49 thresholds;
the level kept is the one that returns the most absent phrases empty while present-phrase mIoU
drops by at most ``--max-drop`` points (``calibrate_presence.best_rule``, ties to the smaller
drop). The output is the same head with ``presence_level`` set. Report on test data with
``ldznet eval --presence --include-absent``, never choosing there.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate_presence import MAX_DROP, best_rule, measure, presence_rows  # noqa: E402
from ldznet_ext.checkpoint_io import read_metadata  # noqa: E402
from ldznet_ext.data.spec import open_source  # noqa: E402
from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.heads import load_head, read_head_config, save_head  # noqa: E402
from ldznet_ext.limits import DEVICE_NAMES, bounded_number, device_name  # noqa: E402
from ldznet_ext.devices import resolve_device  # noqa: E402
from ldznet_ext.loading import load_segmenter, resolve_model_paths  # noqa: E402
from ldznet_ext.outputs import same_file, writable_path  # noqa: E402

LEVELS = np.round(np.arange(0.01, 1.0, 0.01), 2)


def collect(head_path: str, data: str, model: str | None = None, device: str = "auto") -> list[dict]:
    """``calibrate_presence.presence_rows`` with the head's presence score, on the SD ``model`` the head
    was trained on (None: the embedded micro model)."""
    model, _ = resolve_model_paths(model, head_path, False)
    segmenter = load_segmenter(model, head_path, device=resolve_device(device))
    source = open_source(data, size=segmenter.resolution)
    return presence_rows(segmenter, source, lambda maps: {
        phrase: [decision.score] for phrase, decision in segmenter.decide_presence(maps).items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("head", help="a head file with a presence output (ldznet train --presence-weight)")
    parser.add_argument("--data", default="world:val:60", help="validation data (default world:val:60)")
    parser.add_argument("--max-drop", type=bounded_number(MAX_DROP), default=1.0,
                        help="allowed present mIoU drop, points (default 1)")
    parser.add_argument("--model", help="the SD model the head was trained on (default: the embedded micro model)")
    parser.add_argument("--device", type=device_name, default="auto", help=f"{DEVICE_NAMES} (default auto)")
    parser.add_argument("-o", "--output", required=True, help="the head with the chosen level (a new file)")
    args = parser.parse_args()
    try:
        choose(args)
    except LdznetError as error:  # a bad head, data spec or --max-drop: one line, as the ldznet commands
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def choose(args: argparse.Namespace) -> None:
    """Collect, choose the level and write the head (see the module docstring)."""
    if not read_head_config(args.head).presence:
        raise LdznetError(f"{Path(args.head).name}: the head has no presence output to choose a level for; "
                          "train one with ldznet train --presence-weight")
    if same_file(args.head, args.output):
        raise LdznetError(f"{args.output}: the same file as the head {args.head}; give the output another name")
    writable_path(args.output)  # before the evaluation, which takes minutes
    rows = collect(args.head, args.data, args.model, args.device)
    if all(row["present"] for row in rows):  # every level would return all of nothing empty: none is better
        raise LdznetError(f"{args.data} names no absent phrase, so no presence level can be chosen on it; use data "
                          "that does (the micro world, a manifest or folder with empty masks) or add ?negatives=1 to "
                          "its spec")
    chosen = best_rule(rows, 1, LEVELS, args.max_drop)
    if chosen is None:
        raise LdznetError(f"no level keeps the present phrases' mIoU within --max-drop {args.max_drop:g} points of "
                          f"{measure(rows, None, 0)['miou']:.2f}; allow a larger drop")
    _, level, after = chosen
    head, config = load_head(args.head)
    save_head(head, replace(config, presence_level=level), args.output,
              training={**read_metadata(args.head).get("training", {}), "presence_level_data": args.data})
    print(json.dumps({"data": args.data, "level": level, "before": measure(rows, None, 0), "after": after}))


if __name__ == "__main__":
    main()
