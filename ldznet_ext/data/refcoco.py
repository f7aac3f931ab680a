"""RefCOCO, RefCOCO+ and G-Ref (RefCOCOg) in the layout of the ``refer`` toolkit, refs as JSON.

Spec ``refcoco:DIR:SPLIT``, ``refcoco+:DIR:SPLIT`` or ``refcocog:DIR:SPLIT``, options
``?partition=unc|google|umd&images=FOLDER``. DIR is the data set's folder of the refer toolkit
(e.g. ``refer/data/refcoco``) with

- ``instances.json``: COCO-style ``images`` (id, file_name, height, width) and ``annotations``
  (id, image_id, ``segmentation`` as polygons ``[[x0, y0, x1, y1, ...], ...]`` or RLE);
- ``refs(PARTITION).json``: the refs, a list of objects with ref_id, ann_id, image_id, split and
  ``sentences`` (each with ``sent``). The toolkit ships them as a pickle, ``refs(PARTITION).p``;
  pickles can run code when loaded, so this reader never opens one: convert your trusted copy
  once with ``python -c "import json, pickle; json.dump(pickle.load(open('refs(unc).p', 'rb')),
  open('refs(unc).json', 'w'))"`` (docs/datasets.md).

The partition defaults to the paper's: UNC for RefCOCO and RefCOCO+, UMD for G-Ref. Splits as
the toolkit: train and val exactly; testA, testB, testC every split containing that letter; test
every test split. Images: ``FOLDER/file_name`` with FOLDER from ``images=``, else ``DIR/images``
if it exists, else the toolkit's ``DIR/../images/mscoco/images/train2014``.

One example is one image with every sentence of every ref of the split on it, each paired with
its object's mask (the union of the object's polygons; pycocotools rasterises them when it is
installed, else ``geometry.polygon_mask``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ImageError, LdznetError
from .examples import Example
from .files import DATA_ID, DATA_SIDE, parse_options, read_image, read_json
from .geometry import decode_rle, polygon_mask, polygon_points

DEFAULT_PARTITION = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
PARTITIONS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}

try:  # the official rasteriser when it is there; ours otherwise (module docstring)
    from pycocotools import mask as coco_mask
except ImportError:
    coco_mask = None


def in_split(ref_split: str, split: str) -> bool:
    """Whether a ref of ``ref_split`` belongs to the requested ``split`` (the toolkit's rules)."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def segmentation_mask(segmentation: object, height: int, width: int, what: str) -> np.ndarray:
    """A COCO ``segmentation`` (polygons or RLE) as bool [height, width]."""
    if isinstance(segmentation, dict):
        return decode_rle(segmentation, what, (height, width))
    if not isinstance(segmentation, list):
        raise LdznetError(f"{what}: expected polygons or an RLE, got {str(segmentation)[:80]}")
    if coco_mask is not None:
        polygons = [polygon_points(p, what).ravel().tolist() for p in segmentation]  # checked as without it
        rles = coco_mask.frPyObjects([p for p in polygons if len(p) >= 6], height, width)
        return coco_mask.decode(rles).any(axis=2) if rles else np.zeros((height, width), bool)
    return polygon_mask(segmentation, height, width, what)


class RefCocoSource:
    """Referring expressions of one RefCOCO-family ``dataset`` ('refcoco', 'refcoco+', 'refcocog')."""

    def __init__(self, dataset: str, root: str | os.PathLike, split: str, partition: str | None = None,
                 images: str | os.PathLike | None = None):
        self.root = Path(root)
        partition = partition or DEFAULT_PARTITION[dataset]
        if partition not in PARTITIONS[dataset]:
            raise LdznetError(f"{dataset} has the partitions {', '.join(PARTITIONS[dataset])}, not {partition!r}")
        self.description = f"{dataset}:{self.root}:{split} ({partition})"
        refs_file = self.root / f"refs({partition}).json"
        if not refs_file.is_file() and refs_file.with_suffix(".p").is_file():
            raise LdznetError(f"{refs_file.with_suffix('.p')} is a pickle, which is never loaded here (loading one can "
                              f"run code); convert your copy to {refs_file.name} once (docs/datasets.md)")
        refs = read_json(refs_file, "the refs: a list of objects with ann_id, image_id, split and sentences")
        chosen: dict[int, list[tuple[str, int]]] = {}
        try:
            for ref in refs:
                if in_split(str(ref["split"]), split):
                    chosen.setdefault(DATA_ID.check(ref["image_id"], "image_id"), []).extend(
                        (_text(s["sent"]), DATA_ID.check(ref["ann_id"], "ann_id")) for s in ref["sentences"])
        except (KeyError, TypeError, ValueError) as error:
            raise LdznetError(f"{refs_file}: expected refs with ann_id, image_id, split and sentences[].sent "
                              f"({error!r})") from error
        if not chosen:
            splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
            raise LdznetError(f"{refs_file}: no refs in split {split!r} (splits there: {', '.join(splits)})")
        instances = read_json(self.root / "instances.json", "COCO-style images and annotations")
        wanted = {ann for pairs in chosen.values() for _, ann in pairs}
        try:
            self.annotations = {DATA_ID.check(a["id"], "id"): a["segmentation"] for a in instances["annotations"]
                                if DATA_ID.check(a["id"], "id") in wanted}
            self.image_info = {}
            for info in instances["images"]:
                image_id = DATA_ID.check(info["id"], "id")
                if image_id in chosen:
                    self.image_info[image_id] = (str(info["file_name"]), DATA_SIDE.check(info["height"], "height"),
                                                 DATA_SIDE.check(info["width"], "width"))
        except (KeyError, TypeError, ValueError) as error:
            raise LdznetError(f"{self.root / 'instances.json'}: expected images (id, file_name, height, width) and "
                              f"annotations (id, segmentation) ({error!r})") from error
        missing = sorted(wanted - set(self.annotations))[:5] + sorted(set(chosen) - set(self.image_info))[:5]
        if missing:
            raise LdznetError(f"{self.root / 'instances.json'}: refs point at annotations or images it lacks "
                              f"(ids {missing})")
        self.image_ids = sorted(chosen)
        self.pairs = chosen
        if images is None:
            images = self.root / "images"
            if not images.is_dir():
                images = self.root.parent / "images" / "mscoco" / "images" / "train2014"
        self.images = Path(images)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Example:
        image_id = self.image_ids[index]
        file_name, height, width = self.image_info[image_id]
        path = self.images / file_name
        image = read_image(path)
        if image.shape[:2] != (height, width):
            raise ImageError(f"{path}: the image is {image.shape[1]}x{image.shape[0]} but instances.json says "
                             f"{width}x{height}")
        masks: dict[int, np.ndarray] = {}
        pairs = []
        for sentence, ann_id in self.pairs[image_id]:
            if ann_id not in masks:
                masks[ann_id] = segmentation_mask(self.annotations[ann_id], height, width,
                                                  f"{self.description} annotation {ann_id}")
            pairs.append((sentence, masks[ann_id]))
        return Example(f"{self.description.split(':')[0]}:{image_id}", image, tuple(pairs))


def opener(dataset: str):
    """The spec factory of one RefCOCO-family data set (module docstring)."""

    def open_refcoco(argument: str, options: dict[str, str]) -> RefCocoSource:
        root, _, split = argument.rpartition(":")
        if not root:
            raise LdznetError(f"data spec '{dataset}:{argument}': expected {dataset}:DIR:SPLIT, e.g. "
                              f"{dataset}:/data/refer/data/{dataset}:val")
        parse_options(f"{dataset}:{argument}", options, {"partition": "/".join(PARTITIONS[dataset]),
                                                         "images": "the COCO train2014 image folder"})
        return RefCocoSource(dataset, root, split, options.get("partition"), options.get("images"))

    return open_refcoco


open_refcoco = opener("refcoco")
open_refcoco_plus = opener("refcoco+")
open_refcocog = opener("refcocog")


def _text(sentence: object) -> str:
    """A sentence as a phrase; TypeError for one that is not text (str() made null the phrase "None")."""
    if not isinstance(sentence, str):
        raise TypeError(f"a sentence is {sentence!r}, not text")
    return sentence
