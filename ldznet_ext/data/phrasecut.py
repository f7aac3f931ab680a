"""PhraseCut (VGPhraseCut_v0): ``refer_{split}.json`` and the Visual Genome images it refers to.

Spec ``phrasecut:DIR:SPLIT[?images=DIR1,DIR2]``: DIR holds ``refer_SPLIT.json`` (SPLIT = train,
val, test or miniv); images are ``{image_id}.jpg`` in ``DIR/images`` or in the listed folders
(e.g. Visual Genome's own ``VG_100K,VG_100K_2``). A task is one phrase with its instances'
polygons (``Polygons``: per instance a list of polygons, each a list of [x, y]); the phrase's mask
is the union of all its polygons, drawn as PhraseCut's evaluator draws them
(``geometry.phrasecut_mask``) at the image's full resolution. One example is one image with
all its tasks, in file order; images in increasing id order.

When ``image_data_split3000.json`` (the dataset's image list with width and height) is in DIR, an
image whose size differs from it raises ImageError (CLIPSeg drops the 17 such images; polygons
would not line up with them). The training crop, resize and prompt templates are the trainer's
(``train.augment.fit_square``, ``train.augment.PHRASECUT_TEMPLATES``); evaluation resizes the
whole image to a square (``examples.resize_square``) as CLIPSeg's test loader does.

The annotations are kept compact (one float32 array of all polygon points) so that worker
processes share them; loading ``refer_train.json`` (400 MB) needs a few GB of memory briefly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ImageError, LdznetError
from .examples import Example
from .files import parse_options, read_image, read_json
from .geometry import phrasecut_mask

SPLITS = ("train", "val", "test", "miniv")
IMAGE_DATA = ("image_data_split3000.json", "image_data_split.json")


class PhraseCutSource:
    """PhraseCut examples of one split; ``images`` are the folders searched for ``{image_id}.jpg``."""

    def __init__(self, root: str | os.PathLike, split: str, images: list[str | os.PathLike] | None = None):
        self.root = Path(root)
        if split not in SPLITS:
            raise LdznetError(f"PhraseCut split {split!r}: expected one of {', '.join(SPLITS)}")
        self.images = [Path(p) for p in images] if images else [self.root / "images"]
        self.description = f"phrasecut:{self.root}:{split}"
        tasks = read_json(self.root / f"refer_{split}.json", "PhraseCut tasks (a list of objects with "
                          "image_id, phrase and Polygons)")
        if not isinstance(tasks, list):
            raise LdznetError(f"{self.root / f'refer_{split}.json'}: expected a list of tasks")
        by_image: dict[int, list[dict]] = {}
        for number, task in enumerate(tasks):
            try:
                by_image.setdefault(int(task["image_id"]), []).append(task)
                _ = task["phrase"], task["Polygons"]
            except (KeyError, TypeError, ValueError) as error:
                raise LdznetError(f"refer_{split}.json task {number}: expected image_id, phrase and Polygons, "
                                  f"got {str(task)[:120]}") from error
        del tasks
        self.image_ids = np.array(sorted(by_image), np.int64)
        self.phrases: list[str] = []
        self.task_start = [0]     # tasks of image i: task_start[i] .. task_start[i + 1]
        self.polygon_start = [0]  # polygons of task t: polygon_start[t] .. polygon_start[t + 1]
        self.point_start = [0]    # points of polygon p: point_start[p] .. point_start[p + 1]
        points: list[list[float]] = []
        for image_id in self.image_ids.tolist():
            for task in by_image[image_id]:
                self.phrases.append(str(task["phrase"]))
                for instance in task["Polygons"]:
                    for polygon in instance:
                        points.extend(polygon)
                        self.point_start.append(len(points))
                self.polygon_start.append(len(self.point_start) - 1)
            self.task_start.append(len(self.phrases))
        del by_image
        try:
            self.points = np.asarray(points, np.float32).reshape(-1, 2)
        except (TypeError, ValueError) as error:
            raise LdznetError(f"refer_{split}.json: a polygon point is not [x, y] ({error})") from error
        # Arrays, not lists of ints: forked workers then share the pages instead of copying them.
        self.task_start, self.polygon_start, self.point_start = (
            np.asarray(a, np.int64) for a in (self.task_start, self.polygon_start, self.point_start))
        self.sizes = self._image_sizes()

    def _image_sizes(self) -> dict[int, tuple[int, int]]:
        """(width, height) by image id from the dataset's image list, when it is there."""
        for name in IMAGE_DATA:
            if (self.root / name).is_file():
                entries = read_json(self.root / name, "PhraseCut's image list")
                wanted = set(self.image_ids.tolist())
                return {int(e["image_id"]): (int(e["width"]), int(e["height"])) for e in entries
                        if int(e["image_id"]) in wanted}
        return {}

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        """Where the image is: the first folder that has it (the first folder if none has)."""
        for folder in self.images:
            if (folder / f"{image_id}.jpg").is_file():
                return folder / f"{image_id}.jpg"
        return self.images[0] / f"{image_id}.jpg"

    def __getitem__(self, index: int) -> Example:
        image_id = int(self.image_ids[index])
        path = self.image_path(image_id)
        image = read_image(path)
        height, width = image.shape[:2]
        expected = self.sizes.get(image_id)
        if expected and expected != (width, height):
            raise ImageError(f"{path}: the image is {width}x{height} but PhraseCut's image list says "
                             f"{expected[0]}x{expected[1]}; its polygons would not line up")
        pairs = []
        for task in range(self.task_start[index], self.task_start[index + 1]):
            polygons = [self.points[self.point_start[p]:self.point_start[p + 1]]
                        for p in range(self.polygon_start[task], self.polygon_start[task + 1])]
            mask = phrasecut_mask(polygons, height, width, f"{self.description} image {image_id}")
            pairs.append((self.phrases[task], mask))
        return Example(f"phrasecut:{image_id}", image, tuple(pairs))


def open_phrasecut(argument: str, options: dict[str, str]) -> PhraseCutSource:
    """``phrasecut:DIR:SPLIT[?images=DIR1,DIR2]`` (module docstring)."""
    root, _, split = argument.rpartition(":")
    if not root:
        raise LdznetError(f"data spec 'phrasecut:{argument}': expected phrasecut:DIR:SPLIT, e.g. "
                          "phrasecut:/data/VGPhraseCut_v0:test")
    parse_options(f"phrasecut:{argument}", options, {"images": "comma-separated image folders"})
    images = [p for p in options.get("images", "").split(",") if p]
    return PhraseCutSource(root, split, images or None)
