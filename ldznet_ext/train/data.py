"""Where training and evaluation samples come from: a small interface that data sources plug into.

A source is a finite sequence of ``Example``s: one image with its referring phrases and their
masks (an absent phrase has an empty mask). Trainers and evaluators turn examples into
``Sample``s, one (image, phrase, mask) each; ``stream.iterate_examples`` reads them in worker
processes and skips unreadable ones. Sources are opened from a spec string::

    SPEC    = PREFIX ":" ARGUMENT [ "?" OPTION { "&" OPTION } ]  |  PATH ".jsonl"
    OPTION  = KEY "=" VALUE

- ``world:SPLIT:N``: the first N scenes of a micro-world split (train, val, test; the seed ranges
  are fixed, see ``world.scenes.split_seeds``), rendered once at the requested size into memory
  (about 65 KB a scene at 128 px), in parallel processes (so a script that opens one needs the
  ``if __name__ == "__main__":`` guard of multiprocessing); ``world:FILE.npz``: a saved scene set;
- ``jsonl:PATH`` or ``PATH.jsonl``: a manifest, one JSON object a line, ``{"image": "a.png",
  "phrase": "red star", "mask": "a_red_star.png"}`` (a mask is any image, non-zero = inside) or
  ``{"image": "a.png", "phrase": "red star", "polygons": [[x0, y0, x1, y1, ...], ...]}`` (pixel
  units, COCO's pixel-centre rule, ``sources.geometry``; ``[]`` = absent); paths are relative to
  the manifest; rows of one image form one example;
- ``phrasecut:DIR:SPLIT[?images=DIR1,DIR2]``: PhraseCut (``sources.phrasecut``);
- ``refcoco:DIR:SPLIT``, ``refcoco+:DIR:SPLIT``, ``refcocog:DIR:SPLIT``
  ``[?partition=unc|google|umd&images=DIR]``: the refer toolkit's layout (``sources.refcoco``);
- ``aigi:DIR`` (alias ``folder:DIR``): images/NAME.png with masks/NAME/PROMPT.png
  (``sources.folder``).

DIR may contain ':' (the split is what follows the last one); options follow the last '?'.
docs/datasets.md has the downloads and layouts.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import LdznetError
from ..world.data import SceneSet, render_scene_set
from ..world.scenes import VOCABULARY, make_scene, phrase_labels, split_seeds
from .sources.files import read_image, read_mask
from .sources.geometry import polygon_mask

PHRASECUT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a photograph of a {}.", "an image of a {}.", "{}.", "a cropped photo of a {}.",
    "a good photo of a {}.", "a photo of one {}.", "a bad photo of a {}.", "a photo of the {}.")
"""The prompt templates of the official training (CLIPSeg's PhraseCut loader), sampled uniformly."""

TEMPLATES: dict[str, tuple[str, ...]] = {"plain": ("{}",), "phrasecut": PHRASECUT_TEMPLATES}


@dataclass(frozen=True, eq=False)
class Sample:
    """One training or evaluation pair: ``image`` uint8 [H, W, 3], ``mask`` bool [H, W] (all False
    for an absent phrase); ``key`` names the pixels exactly (None when they are not reproducible,
    e.g. after a random crop) so that encodings can be cached by it."""

    image: np.ndarray
    phrase: str
    mask: np.ndarray
    key: str | None = None

    @property
    def present(self) -> bool:
        return bool(self.mask.any())


@dataclass(frozen=True, eq=False)
class Example:
    """One image and its phrases: ``pairs`` of (phrase, bool [H, W] mask); ``key`` is a stable id."""

    key: str
    image: np.ndarray
    pairs: tuple[tuple[str, np.ndarray], ...]

    def samples(self, include_absent: bool = True) -> list[Sample]:
        """The example's (image, phrase, mask) samples; absent phrases (empty masks) optionally dropped."""
        return [Sample(self.image, phrase, mask, self.key) for phrase, mask in self.pairs
                if include_absent or mask.any()]


@runtime_checkable
class Source(Protocol):
    """A finite, indexable set of examples; ``description`` says what it is (for logs and metadata)."""

    description: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


class WorldSource:
    """Micro-world scenes from a pre-rendered ``SceneSet`` (masks are rebuilt from its label maps).

    ``domain`` is the one domain the set was painted in (None: by seed parity, the default).
    """

    def __init__(self, scenes: SceneSet, description: str, domain: str | None = None):
        self.scenes = scenes
        self.description = description
        self.domain = domain

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> Example:
        seed = int(self.scenes.seeds[index])
        domain = self.domain or VOCABULARY.domains[seed % 2]
        pairs = tuple((phrase, self.scenes.mask(index, phrase)) for phrase in self.scenes.phrases[index])
        return Example(f"world:{seed}:{domain}:{self.scenes.size}", self.scenes.images[index], pairs)


def render_world(seeds: Sequence[int], size: int, domain: str | None = None, progress: bool = False) -> SceneSet:
    """Render micro-world scenes into a SceneSet: in parallel processes by seed parity, or in this
    process when all are painted in one ``domain``."""
    if domain is None:
        return render_scene_set(seeds, size, progress=progress)
    scenes = [make_scene(seed, size, domain) for seed in seeds]
    return SceneSet(size, np.asarray(seeds, np.int64), np.stack([s.image for s in scenes]),
                    np.stack([s.labels for s in scenes]), tuple(s.caption for s in scenes),
                    tuple(phrase_labels(s.spec) for s in scenes))


class ManifestSource:
    """Examples from a JSON-lines manifest of (image, phrase, mask file or polygons) rows; files are
    read on demand, and a missing or corrupt image or mask raises ImageError naming its path."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.description = f"jsonl:{self.path}"
        rows: dict[str, list[tuple[str, object]]] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise LdznetError(f"{self.path}: cannot read the manifest ({error})") from error
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, phrase = row["image"], row["phrase"]
                region = row["mask"] if "mask" in row else row["polygons"]
                if not isinstance(region, (str, list)) or not isinstance(image, str):
                    raise TypeError(region)
            except (ValueError, KeyError, TypeError) as error:
                raise LdznetError(f"{self.path}:{number}: expected a JSON object with 'image', 'phrase' and "
                                  f"'mask' (a file) or 'polygons' (a list), got {line[:120]!r}") from error
            rows.setdefault(image, []).append((str(phrase), region))
        if not rows:
            raise LdznetError(f"{self.path}: the manifest has no rows")
        self._items = list(rows.items())

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Example:
        image_file, rows = self._items[index]
        image = read_image(self.path.parent / image_file)
        height, width = image.shape[:2]
        pairs = []
        for phrase, region in rows:
            if isinstance(region, str):
                pairs.append((phrase, read_mask(self.path.parent / region, (height, width))))
            else:
                pairs.append((phrase, polygon_mask(region, height, width, f"{self.path} {image_file} {phrase!r}")))
        return Example(f"jsonl:{self.path}:{image_file}", image, tuple(pairs))


def _open_world(argument: str, size: int, domain: str | None, options: dict[str, str]) -> Source:
    if options:
        raise LdznetError(f"world data takes no options, got {', '.join(options)}")
    if argument.endswith(".npz"):
        if domain is not None:
            raise LdznetError("a saved scene set keeps the domains it was rendered with; drop the domain")
        return WorldSource(SceneSet.load(argument), f"world:{argument}")
    split, _, count = argument.partition(":")
    if not count.isdigit():
        raise LdznetError(f"world data spec 'world:{argument}': expected world:SPLIT:N (e.g. world:train:5000) "
                          "or world:FILE.npz (a saved scene set)")
    if domain is not None and domain not in VOCABULARY.domains:
        raise LdznetError(f"unknown domain {domain!r}; expected one of {', '.join(VOCABULARY.domains)}")
    scenes = render_world(split_seeds(split, int(count)), size, domain, progress=sys.stderr.isatty())
    return WorldSource(scenes, f"world:{argument}" + (f" ({domain})" if domain else ""), domain)


def _file_source(module: str, factory: str) -> Callable[[str, int, str | None, dict[str, str]], Source]:
    """A factory for a source of real files (no render size, no domain), imported when first used."""

    def open_files(argument: str, size: int, domain: str | None, options: dict[str, str]) -> Source:
        if domain is not None:
            raise LdznetError("a domain can only be chosen for micro-world data (world:...)")
        return getattr(importlib.import_module(module, __package__), factory)(argument, options)

    return open_files


def _open_manifest(argument: str, size: int, domain: str | None, options: dict[str, str]) -> Source:
    if domain is not None:
        raise LdznetError("a domain can only be chosen for micro-world data (world:...)")
    if options:
        raise LdznetError(f"a JSONL manifest takes no options, got {', '.join(options)}")
    return ManifestSource(argument)


SOURCES: dict[str, Callable[[str, int, str | None, dict[str, str]], Source]] = {
    "world": _open_world,
    "jsonl": _open_manifest,
    "phrasecut": _file_source(".sources.phrasecut", "open_phrasecut"),
    "refcoco": _file_source(".sources.refcoco", "open_refcoco"),
    "refcoco+": _file_source(".sources.refcoco", "open_refcoco_plus"),
    "refcocog": _file_source(".sources.refcoco", "open_refcocog"),
    "aigi": _file_source(".sources.folder", "open_folder"),
    "folder": _file_source(".sources.folder", "open_folder"),
}
"""Source factories by spec prefix: ``factory(argument after 'prefix:', render size, domain, options)``."""


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """(prefix, argument, options) of a spec (module docstring); a bare ``PATH.jsonl`` is ``jsonl``."""
    body, options = spec, {}
    if "?" in spec:
        body, _, query = spec.rpartition("?")
        for item in query.split("&"):
            key, equals, value = item.partition("=")
            if not key or not equals:
                raise LdznetError(f"data spec {spec!r}: options are KEY=VALUE joined by '&', got {item!r}")
            options[key] = value
    prefix, _, argument = body.partition(":")
    if prefix in SOURCES and argument:
        return prefix, argument, options
    if body.endswith(".jsonl"):
        return "jsonl", body, options
    raise LdznetError(f"unknown data spec {spec!r}; expected world:SPLIT:N, world:FILE.npz, jsonl:PATH, PATH.jsonl, "
                      "phrasecut:DIR:SPLIT, refcoco:DIR:SPLIT, refcoco+:DIR:SPLIT, refcocog:DIR:SPLIT or aigi:DIR")


def open_source(spec: str, size: int = 128, domain: str | None = None) -> Source:
    """Open a data source from its spec (see the module docstring); ``size`` is the render size of
    sources that render (the world), ``domain`` a micro-world domain."""
    prefix, argument, options = parse_spec(spec)
    return SOURCES[prefix](argument, size, domain, options)


def resize_square(example: Example, size: int) -> Example:
    """The whole example squashed to ``size`` x ``size``, as CLIPSeg's PhraseCut test loader does:
    the image bilinearly (align_corners=True, rounded to uint8), masks by nearest neighbour
    (torch's: source pixel floor(i * in / out)). Aspect ratio is not kept."""
    height, width = example.image.shape[:2]
    if height == width == size:
        return example
    pixels = torch.from_numpy(example.image).permute(2, 0, 1)[None].float()
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=True)
    image = pixels[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    pairs = []
    for phrase, mask in example.pairs:
        resized = F.interpolate(torch.from_numpy(mask)[None, None].to(torch.uint8), size=(size, size), mode="nearest")
        pairs.append((phrase, resized[0, 0].bool().numpy()))
    return Example(f"{example.key}@square{size}", image, tuple(pairs))


MIN_CROP_COVER = 0.05
CROP_TRIES = 50


def fit_square(sample: Sample, size: int, rng: np.random.Generator) -> Sample:
    """The sample as a ``size`` x ``size`` square, as the official PhraseCut training crops.

    A square of side min(H, W) is drawn up to 50 times; the first whose mask covers more than 5 %
    of the whole image's area is taken, else the one with most mask. Then the image is resized
    bilinearly and the mask by nearest neighbour. A sample already ``size`` square is returned as is.
    """
    height, width = sample.mask.shape
    if height == width == size:
        return sample
    side = min(height, width)
    best, best_cover = (0, 0), -1
    for _ in range(CROP_TRIES if height != width else 1):
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        cover = int(sample.mask[top:top + side, left:left + side].sum())
        if cover > best_cover:
            best, best_cover = (top, left), cover
        if cover > MIN_CROP_COVER * height * width:
            break
    top, left = best
    image = Image.fromarray(sample.image[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    mask = Image.fromarray(sample.mask[top:top + side, left:left + side]).resize((size, size), Image.NEAREST)
    key = sample.key if height == width and sample.key else None
    return Sample(np.asarray(image), sample.phrase, np.asarray(mask), f"{key}@{size}" if key else None)
