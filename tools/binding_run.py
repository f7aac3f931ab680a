"""Text binding of the micro SD against its UNet's training length (issue #26, hypothesis 2).

(a) Trains stage unet of the micro SD recipe from a micro SD file's VAE and text tower (default the
shipped micro-sd-v1.safetensors; both kept as they are), with a random UNet or, with --init-unet, the
file's UNet, writing EMA snapshots (`ldznet world train-sd --init-model --snapshot-every`); (b) measures
every snapshot, the final model and the starting file ("reference") by `ldznet_ext.world.binding`:
eps-MSE gap (empty caption minus caption), text-binding AUC of the zero-shot maps and zero-shot
mIoU / IoU_FG / AP on world:val:N; (c) writes OUTPUT/binding.json and OUTPUT/binding.md (one row per
model, by steps), rewritten after each model, with the run's train_sd_log.json and final model.

--measure RUN skips (a) and measures an existing `ldznet world train-sd` run folder instead (its
snapshots, final model and the model it started from, or --init-model when it started from none).

--unet-steps auto times a few steps first (random latents) and plans the most steps that fit the
time budget, so that the cosine schedule ends inside it. --time-budget-s bounds the whole tool:
training stops at the budget minus --measure-reserve-s; models are measured in the order final,
reference, then by steps, the final one always, the others while the budget lasts (the rest are
listed as not measured).

    # CPU, seconds (what the tests run):
    .venv/bin/python tools/binding_run.py -o /tmp/binding --recipe smoke --unet-steps 4 --snapshots 2 \
        --eval-scenes 2 --device cpu
    # the prepared GPU run: docs/micro-world-experiments.md, "Prepared GPU run"
    # an existing run:
    .venv/bin/python tools/binding_run.py -o /tmp/binding --measure RUN --device cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldznet_ext.checkpoint_io import readable_file  # noqa: E402
from ldznet_ext.data.spec import open_source  # noqa: E402
from ldznet_ext.defaults import WEIGHTS_DIR  # noqa: E402
from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.devices import resolve_device  # noqa: E402
from ldznet_ext.outputs import writable_folder  # noqa: E402
from ldznet_ext.sd.tokenizer import tokenize  # noqa: E402
from ldznet_ext.train.logs import StageLog  # noqa: E402
from ldznet_ext.world.binding import SWAPPED_WORDS, measure_binding  # noqa: E402
from ldznet_ext.world.micro import MicroRecipe, micro_recipe  # noqa: E402
from ldznet_ext.world.scenes import make_scene, split_seeds  # noqa: E402
from ldznet_ext.world.train_sd import (LOG_FILE, SD_FILE, TEXT_TOWERS, UNetOptions, load_micro_sd,  # noqa: E402
                                       stage_dtype, train_sd, train_unet)

JSON_FILE, TABLE_FILE = "binding.json", "binding.md"
MARGIN = 0.9  # planned steps use this share of the time left: the per-step time drifts
TIMESTEPS = ("100", "400", "700")


def seconds_per_step(recipe: MicroRecipe, init: Path, device: torch.device, dtype: torch.dtype,
                     steps: int = 30, text_tower: str = "keep") -> float:
    """Seconds per stage-unet step at the recipe's batch, on random latents and captions, timed over
    the last two thirds of ``steps`` (the first third warms the kernels up), with the text tower that
    ``text_tower`` (train-sd's option) names."""
    third = max(1, steps // 3)
    timing = replace(recipe, unet_steps=3 * third, log_every=third)
    side = recipe.image_size // 8
    latents = torch.randn((max(recipe.unet_batch, 16), 4, side, side), generator=torch.Generator().manual_seed(0))
    tokens = tokenize(["a red star on grass"]).expand(len(latents), -1)
    with tempfile.TemporaryDirectory() as scratch:
        log = StageLog(Path(scratch) / LOG_FILE, {})
        train_unet(latents.to(device), tokens.to(device), timing, device, dtype, log,
                   text=load_micro_sd(init).text_encoder if text_tower == "keep" else None,
                   train_text=text_tower != "random")
    entries = log.data["stages"]["unet"]["log"]
    return (entries[-1]["seconds"] - entries[0]["seconds"]) / (entries[-1]["step"] - entries[0]["step"])


def planned_steps(seconds_left: float, step_seconds: float, snapshots: int) -> int:
    """The most steps that fit in ``MARGIN`` of ``seconds_left``, a multiple of ``snapshots`` (at least
    one step per snapshot)."""
    steps = int(MARGIN * seconds_left / step_seconds)
    return max(snapshots, steps - steps % snapshots)


def models_to_measure(work: Path, init: Path, log: dict) -> list[dict]:
    """The rows (model, steps, file) in measuring order: final, reference, then the snapshots by steps."""
    unet = log["stages"]["unet"]
    final = unet.get("stopped_at_step", log["recipe"]["unet_steps"])
    snapshots = [{"model": f"step {s['step']}", "steps": s["step"], "file": str(work / s["file"])}
                 for s in log["snapshots"] if s["step"] != final]
    return [{"model": "final", "steps": final, "file": str(work / SD_FILE)},
            {"model": "reference", "steps": 0 if log["init"]["unet"] else None, "file": str(init)}, *snapshots]


def read_run(run: Path) -> tuple[dict, MicroRecipe]:
    """The train-sd log of the run folder ``run`` (once its final model is there too) and its recipe."""
    for name in (LOG_FILE, SD_FILE):
        readable_file(run / name, f"the run's {name}", "a train-sd run's file")
    try:
        log = json.loads((run / LOG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LdznetError(f"{run / LOG_FILE} is not a train-sd log: {error}") from None
    if not isinstance(log, dict) or "unet" not in log.get("stages", {}) or "recipe" not in log:
        raise LdznetError(f"{run / LOG_FILE} is not the log of a finished train-sd run")
    try:
        return log, MicroRecipe(**log["recipe"])
    except TypeError as error:  # a field this version does not know, or one missing
        raise LdznetError(f"{run / LOG_FILE} holds a recipe this version cannot read: {error}") from None


def run_reference(log: dict, default: Path) -> Path:
    """The model a run's UNet stage started from (its VAE and text tower), else ``default``."""
    init = (log.get("init") or {}).get("model")
    return Path(init) if init else default


def word_gap_cell(row: dict, word: str) -> str:
    """A word gap to the sixth decimal (they are 1e-5 to 1e-3), with its standard error where measured."""
    gap, se = row[f"{word}_gap"], row.get(f"{word}_gap_se")
    return f"{gap:.6f}" if se is None else f"{gap:.6f} ± {se:.6f}"


def table(result: dict) -> str:
    """binding.md: one row per measured model, the reference first, then by steps."""
    batch = result["recipe"]["unet_batch"]
    lines = [f"Micro SD binding against UNet steps (batch {batch}; {result['data']}; eps on "
             f"{result['recipe']['probe_scenes']} val scenes; x 100 for zero-shot)", "",
             "| model | steps | samples | eps gap t=100 | t=400 | t=700 | rel. gap t=400 | shape gap t=400 "
             "| colour gap t=400 | word distance shape / colour | binding AUC | zero-shot mIoU | IoU_FG | AP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(result["rows"], key=lambda r: (r["model"] != "reference", r["steps"] or 0))
    for row in rows:
        eps, shot = row["eps"], row["zero_shot"]
        samples = "" if row["steps"] is None else f"{row['steps'] * batch:,}"
        cells = [row["model"], "" if row["steps"] is None else str(row["steps"]), samples,
                 *(f"{eps[t]['gap']:.4f}" for t in TIMESTEPS), f"{100 * eps['400']['relative_gap']:.1f} %",
                 *(word_gap_cell(eps["400"], word) for word in SWAPPED_WORDS),
                 " / ".join(f"{row['word_distances'][word]:.2f}" for word in SWAPPED_WORDS),
                 f"{row['binding_auc']:.3f}", *(f"{shot[k]:.1f}" for k in ("miou", "iou_fg", "ap"))]
        lines.append("| " + " | ".join(cells) + " |")
    if result["unmeasured"]:
        lines += ["", "Not measured within the time budget: " + ", ".join(result["unmeasured"])]
    return "\n".join(lines) + "\n"


def write_result(out: Path, result: dict) -> None:
    (out / JSON_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / TABLE_FILE).write_text(table(result), encoding="utf-8")


def train(args: argparse.Namespace, recipe: MicroRecipe, device: torch.device, work: Path, start: float) -> dict:
    """Stage unet into ``work`` by the arguments; returns its log and the planning figures."""
    budget = None if args.time_budget_s is None else args.time_budget_s - args.measure_reserve_s
    plan: dict = {}
    if args.unet_steps == "auto":
        if budget is None:
            raise LdznetError("--unet-steps auto needs --time-budget-s")
        plan["seconds_per_step"] = seconds_per_step(recipe, args.init_model, device,
                                                    stage_dtype(device, args.dtype, "unet"), args.calibration_steps,
                                                    args.text_tower)
        left = budget - (time.perf_counter() - start) - args.setup_s
        recipe = replace(recipe, unet_steps=planned_steps(left, plan["seconds_per_step"], args.snapshots))
    else:
        recipe = replace(recipe, unet_steps=int(args.unet_steps))
    plan["unet_steps"] = recipe.unet_steps
    options = UNetOptions(args.init_model, args.init_unet, max(1, recipe.unet_steps // args.snapshots),
                          None if budget is None else budget - (time.perf_counter() - start), args.text_tower)
    log = train_sd(work, recipe, device, args.dtype, workers=args.workers, options=options)
    return {"log": log, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="folder for binding.json, binding.md and the run's log")
    parser.add_argument("--work", help="folder for the training run and its snapshots (default: a new temporary one)")
    parser.add_argument("--measure", metavar="RUN", help="measure this existing train-sd run folder; train nothing")
    parser.add_argument("--recipe", default="full", help="micro SD recipe: full (default), clip or smoke")
    parser.add_argument("--init-model", type=Path, default=WEIGHTS_DIR / SD_FILE,
                        help="micro SD file whose VAE is kept, and its text tower with --text-tower keep "
                             "(default: the shipped one)")
    parser.add_argument("--init-unet", action="store_true", help="start from its UNet too (default: a random UNet)")
    parser.add_argument("--text-tower", choices=TEXT_TOWERS, default="keep",
                        help="keep (default) the file's text tower, frozen; train a random one with the UNet; "
                             "or random: that random tower, frozen (train-sd --text-tower)")
    parser.add_argument("--unet-steps", default="auto", help="an integer, or auto (fit the time budget; default)")
    parser.add_argument("--unet-batch", type=int, help="stage unet's batch (default: the recipe's)")
    parser.add_argument("--unet-min-snr-gamma", type=float, metavar="G",
                        help="stage unet's min-SNR loss weighting, 0..10000 (default: the recipe's, 0: plain eps MSE)")
    parser.add_argument("--image-size", type=int,
                        help="side of the training and measuring scenes, a multiple of 64 (default: the recipe's)")
    parser.add_argument("--snapshots", type=int, default=8, help="snapshots over the planned steps (default 8)")
    parser.add_argument("--eval-scenes", type=int, default=50, help="world:val scenes for AUC and mIoU (default 50)")
    parser.add_argument("--time-budget-s", type=float, help="seconds for the whole tool (default: no limit)")
    parser.add_argument("--measure-reserve-s", type=float, default=120.0,
                        help="seconds of the budget kept for measuring (default 120)")
    parser.add_argument("--setup-s", type=float, default=30.0,
                        help="seconds --unet-steps auto allows for rendering and encoding the scenes (default 30)")
    parser.add_argument("--calibration-steps", type=int, default=30, help="steps timed by --unet-steps auto")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--workers", type=int, help="scene-rendering processes (default: the usable cores)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.unet_steps != "auto" and not args.unet_steps.isdigit():
        parser.error(f"--unet-steps: expected an integer or auto, got {args.unet_steps!r}")
    for option, value in (("--snapshots", args.snapshots), ("--eval-scenes", args.eval_scenes),
                          ("--calibration-steps", args.calibration_steps), ("--unet-batch", args.unet_batch)):
        if value is not None and value < 1:  # refused now, not after the training
            parser.error(f"{option} must be at least 1, got {value}")
    out = Path(args.output)
    try:
        device = resolve_device(args.device)
        if not args.measure:
            readable_file(args.init_model, "--init-model")
        recipe = micro_recipe(args.recipe).with_overrides(unet_batch=args.unet_batch, image_size=args.image_size,
                                                          unet_min_snr_gamma=args.unet_min_snr_gamma)
    except LdznetError as error:
        parser.error(str(error))
    if args.unet_steps == "auto" and args.time_budget_s is None and not args.measure:
        parser.error("--unet-steps auto (the default) fits the steps to --time-budget-s: give one, or an integer")
    if args.measure and args.work:
        parser.error("--measure measures an existing run; --work names where a new one trains")
    try:
        if args.measure:  # the run's own files stay where they are
            log, recipe = read_run(Path(args.measure))
            reference = readable_file(run_reference(log, args.init_model), "the run's starting model")
        writable_folder(out)  # after every other check, before the training
    except LdznetError as error:
        parser.error(str(error))
    if args.measure:
        work, plan = Path(args.measure), {}
    else:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="binding_run-"))
        trained = train(args, recipe, device, work, start)
        log, plan, reference = trained["log"], trained["plan"], args.init_model
        for name in (LOG_FILE, SD_FILE):
            shutil.copyfile(work / name, out / name)
    unet = log["stages"]["unet"]
    result = {"device": str(device), "init": log["init"], "recipe": log["recipe"], "plan": plan,
              "train": {k: unet.get(k) for k in ("seconds", "seconds_per_step", "stopped_at_step")}
              | {"final_loss": unet["log"][-1]["loss"], "seconds_total": round(time.perf_counter() - start, 2)},
              "data": f"world:val:{args.eval_scenes}", "rows": [], "unmeasured": []}
    probe = [make_scene(seed, recipe.image_size) for seed in split_seeds("val", recipe.probe_scenes)]
    probe_images = torch.from_numpy(np.stack([scene.image for scene in probe]))
    for row in models_to_measure(work, reference, log):
        late = args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s
        if late and row["model"] != "final":  # the final model is measured whatever the time
            result["unmeasured"].append(row["model"])
        else:
            source = open_source(result["data"], size=recipe.image_size)
            row.update(measure_binding(Path(row["file"]), source, probe_images, [s.spec for s in probe], device))
            result["rows"].append(row)
        result["seconds"] = round(time.perf_counter() - start, 2)
        write_result(out, result)
    print(table(result), end="")


if __name__ == "__main__":
    main()
