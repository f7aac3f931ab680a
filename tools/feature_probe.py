"""Do the micro SD's tapped features know WHAT an object is, beyond z? (issue #26)

For every object (not stuff) of micro-world scenes, one vector per source: the VAE latent z (the
mean) and the embedded LD-ZNet's tapped SD blocks at one timestep and one fixed noise, each pooled
over the object's own mask (the mask area-averaged onto the source's grid; a weighted mean). The
blocks are computed twice: conditioned on the empty caption and on the scene's caption. Linear
probes (multinomial logistic regression on standardised inputs, weight decay chosen on world:val)
then name each object's SHAPE and, as a sanity check, its COLOUR from each source; accuracy on
world:test, overall and by object area (tools/feature_ablation.py's bins).

Controls, so that a gain is read as knowledge of the object and not of the scene:

- "z window": the latent cells around the object (8 x 8, 64 px at f = 8) flattened, z's spatial
  detail that a mask-pooled z drops (the head reads z whole);
- "scene contents": which shapes and colours the scene holds (what its caption names);
- "... scene mean": the blocks pooled over the whole image (what the scene holds, not where).

    OMP_NUM_THREADS=1 .venv/bin/python tools/feature_probe.py --train 600 --val 150 --test 300 --json out.json

``--model FILE --size PX`` probes another micro SD (one trained at 256 px, say) on scenes rendered at
that size; the windows below keep their share of the image (half its side).

``--probe cnn`` asks the same of shape without pooling: a small CNN per source reads the WINDOW x WINDOW
cells around each object of z, of the finest level's blocks (those on z's own grid) stacked, conditioned
on the empty caption and on the scene's, of z with each, of the RGB pixels (each cell's 8 x 8 px as
channels, a reference that lost nothing) and of the pixels the VAE decodes from z (what z holds for a
decoder, which a CNN on z's few channels may fail to read).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # when imported by path, as the tests do

from feature_ablation import bin_names, size_bin  # noqa: E402
from ldznet_ext.defaults import DEFAULT_HEAD_NAME, DEFAULT_SD_NAME, WEIGHTS_DIR  # noqa: E402
from ldznet_ext.errors import LdznetError  # noqa: E402
from ldznet_ext.images import to_model_input  # noqa: E402
from ldznet_ext.limits import MICRO_IMAGE_SIZE, SEED, TIMESTEP, Limit, bounded_number  # noqa: E402
from ldznet_ext.loading import load_segmenter  # noqa: E402
from ldznet_ext.outputs import writable_path  # noqa: E402
from ldznet_ext.sd.schedule import noise_draws  # noqa: E402
from ldznet_ext.segmenter import Segmenter  # noqa: E402
from ldznet_ext.tap import sd_features  # noqa: E402
from ldznet_ext.world.scenes import Scene, make_scene, split_seeds  # noqa: E402
from ldznet_ext.world.spec import OBJECT_LABEL0, VOCABULARY, ObjectSpec  # noqa: E402
from ldznet_ext.zeroshot import blocks_at  # noqa: E402

SIZE = 128  # the default render side: the heads' and the shipped micro SD's training size
WINDOW = 8  # latent cells per side of the "z window" control at SIZE (half the image's side)
BATCH = 16
CONDITIONINGS = {"empty": lambda scene: "", "caption": lambda scene: scene.caption}
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FINEST = 1  # the CNN probe's blocks: those at 1 / FINEST of the latent's side, on z's own grid
RGB_SOURCES = ("RGB", "RGB decoded")  # windows of pixels, each cell's as channels
CNN_SOURCES = {"RGB (every pixel)": ("RGB",), "RGB decoded from z": ("RGB decoded",),
               "z": ("z",), "finest blocks, empty": ("finest blocks, empty",),
               "finest blocks, caption": ("finest blocks, caption",),
               "z + finest blocks, empty": ("z", "finest blocks, empty"),
               "z + finest blocks, caption": ("z", "finest blocks, caption")}
CNN_WIDTH = 64
CNN_BATCH = 128
CNN_RATE = 1e-3
CNN_DECAY = 1e-2
CNN_EPOCHS = 40
CNN_PATIENCE = 6
TARGETS = {"shape": VOCABULARY.shapes, "colour": VOCABULARY.colours}
SCENES = Limit(int, 1, 100_000)


@dataclass
class ObjectTable:
    """One row per object: ``features`` {source: [N, D], or windows [N, C, w, w]}, the ``shape`` /
    ``colour`` indices [N] (into TARGETS) and the visible ``area`` [N] in pixels of the ``size`` x ``size``
    render."""

    features: dict[str, np.ndarray]
    shape: np.ndarray
    colour: np.ndarray
    area: np.ndarray
    size: int = SIZE


def window_cells(size: int) -> int:
    """The side in latent cells of the window around an object at a ``size`` px render: the same share of
    the image (WINDOW cells at SIZE) at every size, so a window holds the same objects."""
    return WINDOW * size // SIZE


def mask_weights(mask: np.ndarray, grid: tuple[int, int]) -> Tensor:
    """bool [H, W] -> [h, w]: the fraction of each grid cell that the mask covers (area averaging)."""
    return F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], grid)[0, 0]


def pool_over_mask(grid: Tensor, mask: np.ndarray) -> Tensor:
    """grid [C, h, w] -> [C]: its mean over the mask, each cell weighted by the mask's share of it."""
    weights = mask_weights(mask, tuple(grid.shape[-2:])).to(grid)
    return (grid * weights).sum(dim=(1, 2)) / weights.sum()


def latent_window(z: Tensor, mask: np.ndarray, size: int = WINDOW) -> Tensor:
    """z [C, h, w] -> [C * size * size]: the ``size`` x ``size`` cells centred on the mask's centroid,
    zero beyond the border."""
    factor = mask.shape[0] // z.shape[-2]
    rows, cols = np.nonzero(mask)
    top = int(round(rows.mean() / factor - size / 2)) + size
    left = int(round(cols.mean() / factor - size / 2)) + size
    return F.pad(z, (size, size, size, size))[:, top:top + size, left:left + size].flatten()


def scene_contents(scene: Scene) -> np.ndarray:
    """Multi-hot over shapes and colours: which ones the scene (and so its caption) holds."""
    shapes = {obj.shape for obj in scene.spec.objects}
    colours = {obj.colour for obj in scene.spec.objects}
    return np.array([s in shapes for s in VOCABULARY.shapes] + [c in colours for c in VOCABULARY.colours], np.float32)


def _batch_features(segmenter: Segmenter, scenes: Sequence[Scene], timestep: int, seed: int,
                    blocks: Sequence[int]) -> tuple[Tensor, Tensor, dict[str, dict[int, Tensor]]]:
    """One batch of scenes of one size S: the pixels [B, 3, S, S], z [B, C, h, w] and, per conditioning, the
    tapped ``blocks`` {block: [B, C', h', w']}."""
    backbone = segmenter.backbone
    side = scenes[0].size
    pixels = torch.cat([to_model_input(scene.image, (side, side)) for scene in scenes]).to(backbone.device)
    with torch.no_grad():
        z = backbone.encode_image(pixels).float()
        draw = noise_draws(seed, 1, (1, *z.shape[1:]), timestep)[0][1]  # the same for every batch
        timesteps = torch.full((len(scenes),), timestep, dtype=torch.long, device=z.device)
        tapped = {name: sd_features(backbone, z, backbone.encode_text([prompt(s) for s in scenes]), timesteps, draw,
                                    blocks) for name, prompt in CONDITIONINGS.items()}
    return pixels, z, tapped


def _visible_objects(scene: Scene) -> Iterator[tuple[ObjectSpec, np.ndarray]]:
    """Each object of the scene that shows, with its mask at the scene's size."""
    for k, obj in enumerate(scene.spec.objects):
        mask = scene.labels == OBJECT_LABEL0 + k
        if mask.any():
            yield obj, mask


def _labels(obj: ObjectSpec, mask: np.ndarray) -> dict:
    """An object table row's "shape", "colour" and "area"."""
    return {"shape": VOCABULARY.shapes.index(obj.shape), "colour": VOCABULARY.colours.index(obj.colour),
            "area": int(mask.sum())}


def _batch_rows(segmenter: Segmenter, scenes: Sequence[Scene], timestep: int, seed: int,
                blocks: Sequence[int]) -> list[dict]:
    """Each object's {source: vector, "shape", "colour", "area"} for one batch of scenes."""
    _, z, tapped = _batch_features(segmenter, scenes, timestep, seed, blocks)
    rows = []
    for i, scene in enumerate(scenes):
        whole = np.ones(scene.labels.shape, bool)
        for obj, mask in _visible_objects(scene):
            row = {"z": pool_over_mask(z[i], mask), "z window": latent_window(z[i], mask, window_cells(scene.size)),
                   "scene contents": torch.from_numpy(scene_contents(scene))}
            for name, features in tapped.items():
                pooled = [pool_over_mask(f[i].float(), mask) for f in features.values()]
                row.update({f"block {b}, {name}": p for b, p in zip(features, pooled)})
                row[f"all blocks, {name}"] = torch.cat(pooled)
                row[f"all blocks scene mean, {name}"] = torch.cat([pool_over_mask(f[i].float(), whole)
                                                                   for f in features.values()])
                row[f"z + all blocks, {name}"] = torch.cat([row["z"], row[f"all blocks, {name}"]])
                row[f"z window + all blocks, {name}"] = torch.cat([row["z window"], row[f"all blocks, {name}"]])
            rows.append(row | _labels(obj, mask))
    return rows


def _batch_windows(segmenter: Segmenter, scenes: Sequence[Scene], timestep: int, seed: int,
                   blocks: Sequence[int]) -> list[dict]:
    """Each object's {source: [C, w, w] (``window_cells``), "shape", "colour", "area"} for one batch of scenes: the
    windows around it of "RGB" (every pixel, each latent cell's pixels as channels), "RGB decoded" (the
    same of the VAE's decoding of z), "z" and, per conditioning, ``blocks`` (which must run on z's grid)
    stacked."""
    pixels, z, tapped = _batch_features(segmenter, scenes, timestep, seed, blocks)
    factor = pixels.shape[-1] // z.shape[-1]
    with torch.no_grad():
        decoded = segmenter.backbone.decode_latent(z).float().clamp(-1, 1)
    grids = {"RGB": F.pixel_unshuffle(pixels, factor), "RGB decoded": F.pixel_unshuffle(decoded, factor), "z": z}
    grids |= {f"finest blocks, {name}": torch.cat([f.float() for f in features.values()], dim=1)
              for name, features in tapped.items()}
    if any(grid.shape[-2:] != z.shape[-2:] for grid in grids.values()):
        raise LdznetError(f"the CNN probe reads windows on z's {tuple(z.shape[-2:])} grid; blocks {list(blocks)} "
                          f"run on {sorted({tuple(g.shape[-2:]) for g in grids.values()})}")
    rows, window = [], window_cells(scenes[0].size)
    for i, scene in enumerate(scenes):
        for obj, mask in _visible_objects(scene):
            row = {name: latent_window(grid[i], mask, window).view(-1, window, window) for name, grid in grids.items()}
            rows.append(row | _labels(obj, mask))
    return rows


def object_table(segmenter: Segmenter, seeds: Sequence[int], timestep: int = 400, seed: int = 0,
                 blocks: Sequence[int] | None = None, windows: bool = False, size: int = SIZE) -> ObjectTable:
    """Every object of the scenes ``seeds`` (rendered at ``size`` px), with the features at ``timestep`` and the
    noise of ``seed`` (the same noise for every scene, as ``Segmenter`` does) on ``blocks`` (None: its
    head's); ``windows``: the CNN probe's windows (``_batch_windows``) instead of vectors."""
    blocks = segmenter.head_config.sd_blocks if blocks is None else blocks
    batch_rows = _batch_windows if windows else _batch_rows
    rows: list[dict] = []
    for start in range(0, len(seeds), BATCH):
        rows += batch_rows(segmenter, [make_scene(s, size) for s in seeds[start:start + BATCH]], timestep, seed,
                            blocks)
    if not rows:
        raise LdznetError(f"scenes {seeds[0]}..{seeds[-1]} hold no visible object")
    sources = [key for key in rows[0] if key not in ("shape", "colour", "area")]
    return ObjectTable({s: torch.stack([r[s] for r in rows]).numpy() for s in sources},
                       *(np.array([r[key] for r in rows]) for key in ("shape", "colour", "area")), size)


@dataclass
class LinearProbe:
    """Multinomial logistic regression on inputs standardised by the training set's mean and std."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices [N] for inputs [N, D]."""
        standard = (torch.from_numpy(x).double() - self.mean) / self.std
        return (standard @ self.weight + self.bias).argmax(dim=1).numpy()


def fit_probe(x: np.ndarray, y: np.ndarray, classes: int, weight_decay: float, steps: int = 300) -> LinearProbe:
    """The probe minimising mean cross-entropy + weight_decay / 2 * |W|^2 on (x [N, D], y [N]); full-batch
    L-BFGS from zero weights, so the result depends on nothing but the data."""
    inputs = torch.from_numpy(x).double()
    mean, std = inputs.mean(0), inputs.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant input stays zero, not NaN
    standard, labels = (inputs - mean) / std, torch.from_numpy(y).long()
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(standard @ weight + bias, labels) + weight_decay / 2 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def select_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], classes: int,
                 decays: Sequence[float] = WEIGHT_DECAYS) -> tuple[float, LinearProbe]:
    """(weight decay, probe) of the decay whose probe is most accurate on ``val``; ties go to the
    stronger decay."""
    best = None
    for decay in sorted(decays, reverse=True):
        probe = fit_probe(*train, classes, decay)
        accuracy = float((probe.predict(val[0]) == val[1]).mean())
        if best is None or accuracy > best[0]:
            best = (accuracy, decay, probe)
    return best[1], best[2]


def window_cnn(channels: int, classes: int, cell: int = 1) -> nn.Sequential:
    """Two 3 x 3 convolutions of CNN_WIDTH channels, a global average pool and a linear layer: it can read
    where in a window something lies, which a pooled linear probe cannot. ``cell`` > 1 (a power of 2):
    the channels are RGB pixels, cell x cell per window cell, put back in place and read by 3 x 3
    convolutions and 2 x 2 max pools down to the window's grid first (a linear map of a cell's pixels
    would not see a shape move by a pixel)."""
    stages = cell.bit_length() - 1
    layers: list[nn.Module] = [nn.PixelShuffle(cell)] if stages else []
    width = channels // cell ** 2
    for stage in range(stages):
        layers += [nn.Conv2d(width, CNN_WIDTH >> (stages - 1 - stage), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        width = CNN_WIDTH >> (stages - 1 - stage)
    return nn.Sequential(*layers, nn.Conv2d(width, CNN_WIDTH, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(CNN_WIDTH, CNN_WIDTH, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CNN_WIDTH, classes))


@dataclass
class CNNProbe:
    """A ``window_cnn`` on windows standardised per channel by the training set's mean and std [C], as it
    was after ``epochs`` epochs, the last of those most accurate on val."""

    mean: Tensor
    std: Tensor
    model: nn.Module
    epochs: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices [N] for windows [N, C, h, w]."""
        standard = (torch.from_numpy(x).float() - self.mean[:, None, None]) / self.std[:, None, None]
        with torch.no_grad():
            return torch.cat([self.model(part).argmax(dim=1) for part in standard.split(1024)]).numpy()


def fit_cnn(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], classes: int,
            epochs: int = CNN_EPOCHS, patience: int = CNN_PATIENCE, seed: int = 0, cell: int = 1) -> CNNProbe:
    """A ``window_cnn`` trained on (windows [N, C, h, w], labels [N]) by AdamW in shuffled batches of
    CNN_BATCH for up to ``epochs``, stopping ``patience`` epochs after val's last best; initial weights and
    order from ``seed``, so the result depends on nothing but the data and the seed; ``cell``: see
    ``window_cnn``."""
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(train[0]).float()
    mean, std = inputs.mean(dim=(0, 2, 3)), inputs.std(dim=(0, 2, 3))
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant channel stays zero, not NaN
    standard, labels = (inputs - mean[:, None, None]) / std[:, None, None], torch.from_numpy(train[1]).long()
    probe = CNNProbe(mean, std, window_cnn(inputs.shape[1], classes, cell), 0)
    optimizer = torch.optim.AdamW(probe.model.parameters(), lr=CNN_RATE, weight_decay=CNN_DECAY)
    best = (-1.0, None)
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(labels), generator=order).split(CNN_BATCH):
            optimizer.zero_grad()
            F.cross_entropy(probe.model(standard[batch]), labels[batch]).backward()
            optimizer.step()
        accuracy = float((probe.predict(val[0]) == val[1]).mean())
        if accuracy >= best[0]:  # a tie goes to the longer-trained net
            best, probe.epochs = (accuracy, copy.deepcopy(probe.model.state_dict())), epoch
        elif epoch - probe.epochs >= patience:
            break
    probe.model.load_state_dict(best[1])
    return probe


def _test_bins(tables: dict[str, ObjectTable]) -> tuple[np.ndarray, dict]:
    """The area bin of each test object, and a report holding the bins' counts."""
    bins = np.array([size_bin(VOCABULARY.shapes[0], int(a), tables["test"].size) for a in tables["test"].area])
    return bins, {"bins": {b: int((bins == b).sum()) for b in bin_names() if (bins == b).any()}, "targets": {}}


def _chance(labels: dict[str, np.ndarray], classes: int, bins: np.ndarray) -> dict:
    """The scores of always naming train's commonest class."""
    majority = int(np.bincount(labels["train"], minlength=classes).argmax())
    return _scores(labels["test"] == majority, bins) | {"dims": 0}


def cnn_report(tables: dict[str, ObjectTable]) -> dict:
    """Shape only, per CNN_SOURCES (windows stacked along channels): test accuracy, per area bin, the
    channels and the epochs kept."""
    bins, report = _test_bins(tables)
    names = TARGETS["shape"]
    labels = {split: table.shape for split, table in tables.items()}
    results = {"chance (majority class)": _chance(labels, len(names), bins)}
    for source, parts in CNN_SOURCES.items():
        data = {split: (np.concatenate([table.features[part] for part in parts], axis=1), labels[split])
                for split, table in tables.items()}
        started = time.perf_counter()
        channels = data["train"][0].shape[1]
        cell = round((channels / 3) ** 0.5) if parts[0] in RGB_SOURCES else 1  # an RGB window's pixels per cell
        probe = fit_cnn(data["train"], data["val"], len(names), cell=cell)
        correct = probe.predict(data["test"][0]) == labels["test"]
        results[source] = _scores(correct, bins) | {"dims": int(channels), "epochs": probe.epochs,
                                                    "seconds": time.perf_counter() - started}
        print(f"{source}: {100 * correct.mean():.1f} % ({results[source]['seconds']:.0f} s)", file=sys.stderr)
    report["targets"]["shape"] = results
    return report


def probe_report(tables: dict[str, ObjectTable]) -> dict:
    """Per target and source: the chosen decay, test accuracy, and test accuracy per area bin."""
    bins, report = _test_bins(tables)
    for target, names in TARGETS.items():
        labels = {split: getattr(table, target) for split, table in tables.items()}
        results = {"chance (majority class)": _chance(labels, len(names), bins) | {"decay": None}}
        for source in tables["train"].features:
            data = {split: (table.features[source], labels[split]) for split, table in tables.items()}
            decay, probe = select_probe(data["train"], data["val"], len(names))
            correct = probe.predict(data["test"][0]) == labels["test"]
            results[source] = _scores(correct, bins) | {"dims": int(data["train"][0].shape[1]), "decay": decay}
        report["targets"][target] = results
    return report


def _scores(correct: np.ndarray, bins: np.ndarray) -> dict:
    """Accuracy overall and per bin of boolean ``correct`` [N]."""
    return {"accuracy": float(correct.mean()),
            "bins": {b: float(correct[bins == b].mean()) for b in bin_names() if (bins == b).any()}}


def run(train: int, val: int, test: int, timestep: int, seed: int, blocks: Sequence[int] | None = None,
        probe: str = "linear", model: Path | None = None, size: int = SIZE) -> dict:
    """The object tables of the three splits and the ``probe`` ("linear" or "cnn") report on the SD
    ``model`` (None: the embedded one) with scenes rendered at ``size`` px; ``blocks``: None, the head's
    for the linear probe, the finest level's (1 / FINEST of z's side) for the CNN."""
    started = time.perf_counter()
    segmenter = load_segmenter(model or WEIGHTS_DIR / DEFAULT_SD_NAME, WEIGHTS_DIR / DEFAULT_HEAD_NAME,
                               device="cpu", resolution=size)
    if blocks is None:
        blocks = blocks_at(segmenter.backbone.layout, (FINEST,)) if probe == "cnn" else segmenter.head_config.sd_blocks
    blocks = tuple(blocks)
    tables = {split: object_table(segmenter, split_seeds(split, count), timestep, seed, blocks, probe == "cnn",
                                  size) for split, count in (("train", train), ("val", val), ("test", test))}
    extracted = time.perf_counter() - started
    print(f"features of {sum(len(t.area) for t in tables.values())} objects: {extracted:.0f} s", file=sys.stderr)
    report = cnn_report(tables) if probe == "cnn" else probe_report(tables)
    report.update(probe=probe, scenes={"train": train, "val": val, "test": test},
                  objects={split: len(t.area) for split, t in tables.items()}, timestep=timestep, seed=seed,
                  model=str(model or DEFAULT_SD_NAME), size=size,
                  blocks=list(blocks), seconds_features=extracted,
                  seconds=time.perf_counter() - started)
    return report


def markdown(report: dict) -> str:
    """A row per source: its dims (the CNN's: channels, and the epochs kept), shape accuracy overall and
    per area bin, colour accuracy where probed (x 100)."""
    bins, cnn = list(report["bins"]), report.get("probe") == "cnn"
    shape, colour = report["targets"]["shape"], report["targets"].get("colour")
    header = ["source", "channels, epochs" if cnn else "dims", "shape",
              *(f"shape {b} (n {report['bins'][b]})" for b in bins), *(["colour"] if colour else [])]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for source, result in shape.items():
        size = f"{result['dims']}, {result['epochs']}" if cnn and "epochs" in result else str(result["dims"])
        cells = [size, f"{100 * result['accuracy']:.1f}", *(f"{100 * result['bins'][b]:.1f}" for b in bins),
                 *([f"{100 * colour[source]['accuracy']:.1f}"] if colour else [])]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def block_list(text: str) -> tuple[int, ...]:
    """An argparse type: "6,7,8" -> (6, 7, 8)."""
    try:
        blocks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers such as 6,7,8, got {text!r}") from None
    if not blocks or min(blocks) < 1:
        raise argparse.ArgumentTypeError(f"expected block numbers >= 1, got {text!r}")
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for split, count in (("train", 600), ("val", 150), ("test", 300)):
        parser.add_argument(f"--{split}", type=bounded_number(SCENES), default=count,
                            help=f"world:{split} scenes (default {count})")
    parser.add_argument("--timestep", type=bounded_number(TIMESTEP), default=400, help="SD timestep (default 400)")
    parser.add_argument("--seed", type=bounded_number(SEED), default=0, help="seed of the fixed noise (default 0)")
    parser.add_argument("--blocks", type=block_list, metavar="B,B,...",
                        help="spatial-transformer blocks to probe, numbered from 1 (default: the head's, 6-10; "
                             "with --probe cnn the finest level's)")
    parser.add_argument("--probe", choices=("linear", "cnn"), default="linear",
                        help="linear: logistic regression on mask-pooled features, shape and colour (default); "
                             "cnn: a small CNN on the WINDOW x WINDOW cells around each object, shape only")
    parser.add_argument("--model", metavar="FILE", type=Path,
                        help="the micro SD v1 file to probe (default: the embedded one)")
    parser.add_argument("--size", type=bounded_number(MICRO_IMAGE_SIZE), default=SIZE, metavar="PX",
                        help=f"render side in pixels, a multiple of 64 (default {SIZE}); the z window grows "
                             "with it to keep its share of the image")
    parser.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    args = parser.parse_args()
    if args.size % 64:
        parser.error(f"argument --size: expected a multiple of 64, got {args.size}")
    torch.set_num_threads(1)
    try:
        if args.json:  # before the work, so that none of it is lost to a bad path
            writable_path(args.json)
        report = run(args.train, args.val, args.test, args.timestep, args.seed, args.blocks, args.probe,
                     args.model, args.size)
    except (LdznetError, ValueError) as error:  # ValueError: a block number this UNet lacks
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(markdown(report))
    print(f"\n{report['objects']} objects; {report['seconds']:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
