"""The micro world: procedural scenes with captions and (phrase, mask) pairs.

A scene is sampled from a seed as a resolution-free ``SceneSpec`` (``sample_scene``) and
rendered at any size (``render``); ``make_scene`` does both. Scenes hold 1-5 objects (shape,
colour, size 8-45 % of the side, rotation, z-order; overlapping and cut by the border, several
instances of one shape in about a third of the scenes) over stuff: sky above a wavy horizon,
grass or sand below, often water split off by a shore line. Two domains: "cartoon" and
"photo" (``paint.py``).

Phrases (``VOCABULARY.phrase_forms``): for each (colour, shape) present the attribute phrase
"red star" (singular, all instances of it); for each shape present the class phrase
"stars" (plural, all colours); each stuff class present ("sky", "grass", "water", "sand");
then 1-2 phrases of things absent from the scene, with empty masks, drawn from hard
negatives (a present shape in another colour, a present colour on another shape), absent
shapes and absent stuff. There are no colour-only phrases: attribute phrases already need
colour, and every phrase names a thing the caption can name. A phrase mask is the visible
part of its things (objects occlude stuff and each other); stuff and object masks partition
the image. Captions read "a photo of two red stars and a blue circle on grass by the water
under the sky"; the sky is never called blue so that colour words refer to objects only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from ..errors import LdznetError
from .paint import paint
from .spec import (MAX_ROTATION, OBJECT_LABEL0, STUFF_LABEL, VOCABULARY, Curve, ObjectSpec, Region,
                   SceneSpec, Vocabulary, label_map, stuff_label_map)

__all__ = ["VOCABULARY", "Vocabulary", "Scene", "SceneSpec", "ObjectSpec", "Region", "Curve",
           "sample_scene", "render", "make_scene", "caption", "phrase_labels", "split_seeds"]

SPLIT_START = {"train": 0, "test": 1_000_000, "val": 2_000_000}
SPLIT_SIZE = 1_000_000  # seeds per split; the ranges are fixed forever

CHECK_SIZE = 64  # raster on which sampling checks visibility; independent of any render size
MIN_VISIBLE = 0.5  # an object keeps at least this fraction of its whole area visible
MIN_STUFF = 0.04  # each stuff class keeps at least this fraction of the image visible
SIZE_RANGE = (0.08, 0.45)
MULTI_INSTANCE_P = 0.38  # chance that a scene of 2+ objects repeats a shape: ~30 % of all scenes
OVERLAP_P = 0.35  # chance that an object is placed against an earlier one
MAX_SIZE = 4096

_COUNT_WORDS = ("a", "two", "three", "four", "five")


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene. ``image`` uint8 [S, S, 3] RGB; ``labels`` uint8 [S, S] (see
    ``world.spec.label_map``); ``phrases`` maps each phrase to a bool [S, S] mask, present phrases
    first, then ``spec.absent`` (empty masks); ``caption`` mentions every object and stuff."""

    spec: SceneSpec
    size: int
    image: np.ndarray
    labels: np.ndarray
    caption: str
    phrases: dict[str, np.ndarray]

    def present(self, phrase: str) -> bool:
        """Whether ``phrase`` names something in the scene (its mask may still be tiny)."""
        return phrase in self.phrases and phrase not in self.spec.absent


def split_seeds(split: str, count: int | None = None) -> range:
    """The first ``count`` seeds (all ``SPLIT_SIZE`` when None) of split "train", "val" or "test"."""
    if split not in SPLIT_START:
        raise LdznetError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_START)}")
    count = SPLIT_SIZE if count is None else count
    if not 0 <= count <= SPLIT_SIZE:
        raise LdznetError(f"split size {count} is out of range; expected 0..{SPLIT_SIZE}")
    return range(SPLIT_START[split], SPLIT_START[split] + count)


def sample_scene(seed: int, domain: str | None = None) -> SceneSpec:
    """Scene description for ``seed`` (int >= 0). ``domain`` None picks "cartoon" for even
    and "photo" for odd seeds (so any seed range is balanced); naming a domain keeps the
    layout, objects and phrases of the seed and changes only how it is painted."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LdznetError(f"scene seed must be an integer >= 0, got {seed!r}")
    if domain is None:
        domain = VOCABULARY.domains[int(seed) % 2]
    elif domain not in VOCABULARY.domains:
        raise LdznetError(f"unknown domain {domain!r}; expected one of {', '.join(VOCABULARY.domains)}")
    rng = np.random.default_rng(int(seed))
    ground, regions = _sample_stuff(rng)
    light = float(rng.uniform(-0.8 * np.pi, -0.2 * np.pi))  # from above, left to right
    spec = SceneSpec(int(seed), domain, ground, regions, (), (), light)
    spec = replace(spec, objects=_sample_objects(rng, spec))
    return replace(spec, absent=_sample_absent(rng, spec))


def render(spec: SceneSpec, size: int = 128) -> Scene:
    """Render ``spec`` at ``size x size`` pixels (8..4096); geometry is the same at every size."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= MAX_SIZE:
        raise LdznetError(f"render size must be an integer in 8..{MAX_SIZE}, got {size!r}")
    size = int(size)
    labels = label_map(spec, size)
    masks = {}
    for phrase, ids in phrase_labels(spec).items():
        mask = np.zeros((size, size), dtype=bool)
        for i in ids:
            mask |= labels == i
        masks[phrase] = mask
    return Scene(spec, size, paint(spec, size), labels, caption(spec), masks)


def make_scene(seed: int, size: int = 128, domain: str | None = None) -> Scene:
    """``render(sample_scene(seed, domain), size)``."""
    return render(sample_scene(seed, domain), size)


def phrase_labels(spec: SceneSpec) -> dict[str, tuple[int, ...]]:
    """Each phrase of the scene -> the labels (see ``label_map``) its mask covers; () if absent."""
    out: dict[str, list[int]] = {}
    for k, obj in enumerate(spec.objects):
        out.setdefault(f"{obj.colour} {obj.shape}", []).append(OBJECT_LABEL0 + k)
    for k, obj in enumerate(spec.objects):
        out.setdefault(VOCABULARY.plural(obj.shape), []).append(OBJECT_LABEL0 + k)
    for stuff in spec.stuff_present():
        out[stuff] = [STUFF_LABEL[stuff]]
    for phrase in spec.absent:
        out[phrase] = []
    return {phrase: tuple(ids) for phrase, ids in out.items()}


def caption(spec: SceneSpec) -> str:
    """One-sentence description naming every object group (with counts) and every stuff class."""
    groups = Counter((obj.colour, obj.shape) for obj in spec.objects)
    parts = []
    for (colour, shape), n in groups.items():
        noun = shape if n == 1 else VOCABULARY.plural(shape)
        count = ("an" if colour[0] in "aeiou" else "a") if n == 1 else _COUNT_WORDS[n - 1]
        parts.append(f"{count} {colour} {noun}")
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    stuff = spec.stuff_present()
    where = f"on {spec.ground}"
    if "water" in stuff:
        where += " by the water"
    if "sky" in stuff:
        where += " under the sky"
    return f"a {spec.domain} of {things} {where}"


def _waves(rng: np.random.Generator, base: float, amp: float) -> Curve:
    """A gentle curve: one long wave of amplitude <= amp and one short of <= amp / 3."""
    return Curve(base, (float(rng.uniform(0, amp)), float(rng.uniform(0, amp / 3))),
                 (float(rng.uniform(0.4, 1.4)), float(rng.uniform(2.0, 4.0))),
                 tuple(float(p) for p in rng.uniform(0, 2 * np.pi, 2)))


def _sample_stuff(rng: np.random.Generator) -> tuple[str, tuple[Region, ...]]:
    has_sky = rng.random() < 0.85
    ground = ("grass", "sand")[int(rng.integers(2))]
    water = ("none", "far", "side")[int(rng.choice(3, p=(0.4, 0.3, 0.3)))]
    horizon = float(rng.uniform(0.22, 0.55)) if has_sky else 0.0
    regions = []
    if water == "far":  # a band of sea between the horizon and a shore line
        regions.append(Region("water", _waves(rng, horizon + float(rng.uniform(0.15, 0.3)), 0.04), "y", -1))
    elif water == "side":  # a lake or bay on the left or right
        side = 1 if rng.random() < 0.5 else -1
        width = float(rng.uniform(0.25, 0.42))
        regions.append(Region("water", _waves(rng, 1 - width if side > 0 else width, 0.08), "x", side))
    if has_sky:
        regions.append(Region("sky", _waves(rng, horizon, 0.03), "y", -1))
    return ground, tuple(regions)


def _object_plan(rng: np.random.Generator) -> list[tuple[str, str]]:
    """(shape, colour) of each object, in z-order; one shape repeats in MULTI_INSTANCE_P of scenes."""
    n = int(rng.integers(1, 6))
    shapes, colours = VOCABULARY.shapes, VOCABULARY.colours
    repeats = int(rng.integers(2, min(n, 3) + 1)) if n >= 2 and rng.random() < MULTI_INSTANCE_P else 1
    chosen = [shapes[i] for i in rng.choice(len(shapes), n - repeats + 1, replace=False)]
    plan = [(s, colours[int(rng.integers(len(colours)))]) for s in chosen]
    if repeats > 1:
        same_colour = rng.random() < 0.5
        for _ in range(repeats - 1):
            colour = plan[0][1] if same_colour else colours[int(rng.integers(len(colours)))]
            plan.append((plan[0][0], colour))
    return [plan[i] for i in rng.permutation(len(plan))]


def _sample_objects(rng: np.random.Generator, spec: SceneSpec) -> tuple[ObjectSpec, ...]:
    objects: list[ObjectSpec] = []
    stuff = stuff_label_map(spec, CHECK_SIZE)
    lo, hi = np.log(SIZE_RANGE[0]), np.log(SIZE_RANGE[1])
    for shape, colour in _object_plan(rng):
        for _ in range(40):  # placements that hide too much of something are redrawn
            size = float(np.exp(rng.uniform(lo, hi)))
            centre = rng.uniform(0, 1, 2)
            if objects and rng.random() < OVERLAP_P:  # lean on an earlier object
                other = objects[int(rng.integers(len(objects)))]
                angle = rng.uniform(0, 2 * np.pi)
                reach = (other.size + size) / 2 * rng.uniform(0.5, 0.9)
                centre = np.asarray(other.centre) + reach * np.array([np.cos(angle), np.sin(angle)])
            obj = ObjectSpec(shape, colour, (float(centre[0]), float(centre[1])), size,
                             float(rng.uniform(-1, 1) * MAX_ROTATION[shape]),
                             tuple(float(t) for t in rng.uniform(-1, 1, 3)))
            if _all_visible(replace(spec, objects=(*objects, obj)), stuff):
                objects.append(obj)
                break
    return tuple(objects)


def _all_visible(spec: SceneSpec, stuff: np.ndarray) -> bool:
    labels = label_map(spec, CHECK_SIZE, stuff)
    counts = np.bincount(labels.ravel(), minlength=OBJECT_LABEL0 + len(spec.objects))
    pixels = CHECK_SIZE * CHECK_SIZE
    if any(counts[STUFF_LABEL[s]] < MIN_STUFF * pixels for s in spec.stuff_present()):
        return False
    return all(counts[OBJECT_LABEL0 + k] >= MIN_VISIBLE * obj.area() * pixels
               for k, obj in enumerate(spec.objects))


def _sample_absent(rng: np.random.Generator, spec: SceneSpec) -> tuple[str, ...]:
    pairs = {(o.colour, o.shape) for o in spec.objects}
    shapes = {o.shape for o in spec.objects}
    colours = {o.colour for o in spec.objects}
    pools = [
        [f"{c} {s}" for s in VOCABULARY.shapes for c in VOCABULARY.colours
         if (c, s) not in pairs and (s in shapes or c in colours)],
        [VOCABULARY.plural(s) for s in VOCABULARY.shapes if s not in shapes],
        [s for s in VOCABULARY.stuff if s not in spec.stuff_present()],
    ]
    absent = []
    for _ in range(int(rng.integers(1, 3))):
        pool = [p for p in pools if p]
        choice = pool[int(rng.integers(len(pool)))]
        absent.append(choice.pop(int(rng.integers(len(choice)))))
    return tuple(absent)
