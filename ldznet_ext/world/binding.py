"""How strongly a micro SD model binds text to image regions (issue #26, hypothesis 2).

The measures of one model file, each one of the project's own:

- the eps-MSE gap: :func:`train_sd.eps_probe` with each val scene's caption and with "", at
  t = 100, 400, 700; the gap is empty minus caption (positive: the caption helps the UNet denoise);
  and the word gaps: the caption with every object's shape (or colour) named wrongly minus the true
  caption (positive: the UNet denoises by what the word names, so it knows the shapes or colours),
  each with its standard error over the scenes;
- the word distances: how far apart the text tower keeps captions that differ in one shape word or
  one colour word (words the tower merges, no UNet can tell apart);
- the text-binding AUC of the zero-shot maps (default settings, ``tools/zero_shot_sweep.py
  --binding``): per present phrase with another phrase present, the pixel AUC of the phrase's map
  telling its own pixels from the other phrases' pixels, averaged over phrases;
- zero-shot mIoU / IoU_FG / AP (x 100, CLIPSeg method, as ``ldznet eval --zero-shot``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..data.examples import Source
from ..eval.evaluate import evaluate
from ..loading import load_segmenter
from ..sd.checkpoint import load_stable_diffusion
from ..sd.model import StableDiffusion
from ..sd.vae import SCALE_FACTOR
from ..segmenter import Segmenter
from .scenes import VOCABULARY, caption, sample_scene
from .spec import ObjectSpec, SceneSpec
from .train_sd import encode_means, eps_probe

SWAPPED_WORDS = ("shape", "colour")


def pixel_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive value > a negative one), ties counting half (Mann-Whitney)."""
    values = np.concatenate([positive, negative])
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]  # tied values share their mean rank
    return float((ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2)
                 / (len(positive) * len(negative)))


def binding_auc(segmenter: Segmenter, source: Source) -> float:
    """Mean over present phrases with another phrase present of the map's AUC, named vs other phrases' pixels."""
    aucs = []
    for index in range(len(source)):
        example = source[index]
        present = [(p, m) for p, m in example.pairs if m.any()]
        segmenter.set_image(example.image)
        maps = segmenter.predict_terms(list(dict.fromkeys(p for p, _ in present)))
        for phrase, mask in present:
            others = np.logical_or.reduce([m for p, m in present if p != phrase] or [np.zeros_like(mask)]) & ~mask
            if others.any():
                values = maps[phrase].float().cpu().numpy()
                aucs.append(pixel_auc(values[mask], values[others]))
    return float(np.mean(aucs)) if aucs else float("nan")


def swapped_caption(spec: SceneSpec, word: str) -> str:
    """``spec``'s caption with every object's ``word`` ("shape" or "colour") replaced by the next one in the
    vocabulary's order: a one-to-one swap, so that the object groups and their counts stay as they were
    and only what the words name is wrong."""
    if word not in SWAPPED_WORDS:
        raise ValueError(f"unknown word kind {word!r}; expected one of {SWAPPED_WORDS}")
    values = VOCABULARY.shapes if word == "shape" else VOCABULARY.colours
    following = dict(zip(values, values[1:] + values[:1]))
    objects = tuple(replace(obj, **{word: following[getattr(obj, word)]}) for obj in spec.objects)
    return caption(replace(spec, objects=objects))


@torch.no_grad()
def word_distances(model: StableDiffusion) -> dict[str, float]:
    """Mean L2 distance between the text tower's contexts [77, D] of the one-object captions "a cartoon of
    a red star on grass" ... that differ in the shape word alone (every colour, every pair of shapes),
    and in the colour word alone (every shape, every pair of colours): ``{"shape": d, "colour": d}``."""
    plain = replace(sample_scene(0, "cartoon"), ground="grass", regions=(), absent=())
    pairs = list(itertools.product(VOCABULARY.colours, VOCABULARY.shapes))
    texts = [caption(replace(plain, objects=(ObjectSpec(shape, colour, (0.5, 0.5), 0.2, 0.0, (0.0, 0.0, 0.0)),)))
             for colour, shape in pairs]
    contexts = dict(zip(pairs, model.encode_text(texts).context.float()))

    def distance(a: tuple[str, str], b: tuple[str, str]) -> float:
        return float((contexts[a] - contexts[b]).norm())

    shapes, colours = VOCABULARY.shapes, VOCABULARY.colours
    by_shape = [distance((c, a), (c, b)) for c in colours for a, b in itertools.combinations(shapes, 2)]
    by_colour = [distance((a, s), (b, s)) for s in shapes for a, b in itertools.combinations(colours, 2)]
    return {"shape": round(float(np.mean(by_shape)), 4), "colour": round(float(np.mean(by_colour)), 4)}


def eps_gaps(probe: dict[str, dict[str, float | list[float]]]) -> dict[str, dict[str, float]]:
    """:func:`eps_probe`'s result with, per timestep, ``gap`` (empty - caption), ``relative_gap`` (the gap
    over the empty-caption MSE) and, for each swapped word the probe holds (``"shape swapped"``...),
    ``shape_gap`` ... (swapped - caption). A probe ``per_sample`` gives the means, and each gap's
    standard error over the scenes (``gap_se``, ``shape_gap_se`` ...: of the paired differences, since
    every caption set sees the same noise)."""
    out = {}
    for t, row in probe.items():
        values = {name: np.asarray(v, dtype=np.float64) for name, v in row.items()}
        means = {name: round(float(v.mean()), 6) for name, v in values.items()}
        differences = {"gap": values["empty"] - values["caption"]}
        differences |= {f"{word}_gap": values[f"{word} swapped"] - values["caption"]
                        for word in SWAPPED_WORDS if f"{word} swapped" in row}
        out[t] = {**means, "relative_gap": round((means["empty"] - means["caption"]) / means["empty"], 6)}
        for name, difference in differences.items():
            out[t][name] = round(float(difference.mean()), 6)
            if difference.size > 1:
                out[t][f"{name}_se"] = round(float(difference.std(ddof=1) / np.sqrt(difference.size)), 6)
    return out


def measure_binding(path: Path, source: Source, probe_images: torch.Tensor, probe_specs: Sequence[SceneSpec],
                    device: torch.device) -> dict:
    """The measures (module docstring) of the micro SD file ``path``: eps and word gaps on uint8 scenes
    ``probe_images`` [N, S, S, 3] rendered from ``probe_specs``, word distances, binding AUC and zero-shot
    scores on ``source``."""
    model = load_stable_diffusion(path, device=device)
    latents = encode_means(model.vae, probe_images) * SCALE_FACTOR
    variants = {f"{word} swapped": [swapped_caption(spec, word) for spec in probe_specs] for word in SWAPPED_WORDS}
    eps = eps_gaps(eps_probe(model, latents, [caption(spec) for spec in probe_specs], variants=variants,
                             per_sample=True))
    distances = word_distances(model)
    del model
    segmenter = load_segmenter(path, None, device=device)
    summary = evaluate(segmenter, source, Path(path).name, progress=False).summary
    return {"eps": eps, "word_distances": distances, "binding_auc": round(binding_auc(segmenter, source), 4),
            "zero_shot": {"miou": round(100 * summary.miou, 2), "iou_fg": round(100 * summary.iou_fg, 2),
                          "ap": round(100 * summary.ap, 2)}}
