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
would not line up with them); an image list that is not a list of objects with integer image_id, width
and height refuses the data set. A task whose ``Polygons`` are not instances of polygons of [x, y]
points makes its image's example unreadable (LdznetError naming the file and task: skipped and listed,
as a bad RefCOCO annotation). The training crop, resize and prompt templates are the trainer's
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
from .files import DATA_ID, DATA_SIDE, parse_options, read_image, read_json
from .geometry import phrasecut_mask, polygon_points

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
        tasks_file = self.root / f"refer_{split}.json"
        tasks = read_json(tasks_file, "PhraseCut tasks (a list of objects with image_id, phrase and Polygons)")
        if not isinstance(tasks, list):
            raise LdznetError(f"{tasks_file}: expected a list of tasks")
        by_image: dict[int, list[tuple[int, dict]]] = {}
        for number, task in enumerate(tasks):
            try:
                by_image.setdefault(DATA_ID.check(task["image_id"], "image_id"), []).append((number, task))
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
        # A task whose polygons cannot be read fails its image's example, as a bad RefCOCO annotation does
        # (skipped and listed), rather than the whole data set: the reason by image index.
        self.unreadable: dict[int, str] = {}
        points: list[np.ndarray] = []
        count = 0
        for index, image_id in enumerate(self.image_ids.tolist()):
            for number, task in by_image[image_id]:
                where = f"{tasks_file} task {number} (image {image_id})"
                phrase = task["phrase"]
                self.phrases.append(phrase if isinstance(phrase, str) else "")
                try:
                    if not isinstance(phrase, str):  # str() would train on null as the text "None"
                        raise LdznetError(f"{where}: 'phrase' must be text, got {str(phrase)[:80]}")
                    polygons = _task_polygons(task["Polygons"], where)
                except LdznetError as error:
                    self.unreadable.setdefault(index, str(error))
                    polygons = []
                for polygon in polygons:
                    points.append(polygon)
                    count += len(polygon)
                    self.point_start.append(count)
                self.polygon_start.append(len(self.point_start) - 1)
            self.task_start.append(len(self.phrases))
        del by_image
        self.points = np.concatenate(points, dtype=np.float32) if points else np.zeros((0, 2), np.float32)
        # Arrays, not lists of ints: forked workers then share the pages instead of copying them.
        self.task_start, self.polygon_start, self.point_start = (
            np.asarray(a, np.int64) for a in (self.task_start, self.polygon_start, self.point_start))
        self.sizes = self._image_sizes()

    def _image_sizes(self) -> dict[int, tuple[int, int]]:
        """(width, height) by image id from the dataset's image list, when it is there; LdznetError naming the
        file for a list that is not of objects with integer image_id, width and height (sizes >= 1)."""
        for name in IMAGE_DATA:
            path = self.root / name
            if path.is_file():
                entries = read_json(path, "PhraseCut's image list")
                if not isinstance(entries, list):
                    raise LdznetError(f"{path}: expected PhraseCut's image list: a list of objects with image_id, "
                                      f"width and height, got a {type(entries).__name__}")
                wanted = set(self.image_ids.tolist())
                sizes = {}
                for number, entry in enumerate(entries):
                    size = _entry_size(entry)
                    if size is None:
                        raise LdznetError(f"{path}: entry {number}: expected an object with image_id, width and "
                                          f"height (integers, sizes >= 1), got {str(entry)[:120]}")
                    if size[0] in wanted:
                        sizes[size[0]] = size[1:]
                return sizes
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
        if index in self.unreadable:
            raise LdznetError(self.unreadable[index])
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


def _entry_size(entry: object) -> tuple[int, int, int] | None:
    """(image_id, width, height) of one entry of the image list, or None when it is not such an entry."""
    if not (isinstance(entry, dict) and DATA_ID.accepts(entry.get("image_id"))
            and all(DATA_SIDE.accepts(entry.get(k)) for k in ("width", "height"))):
        return None
    return entry["image_id"], entry["width"], entry["height"]


def _task_polygons(polygons: object, what: str) -> list[np.ndarray]:
    """A task's ``Polygons`` (per instance a list of polygons [[x, y], ...]) as float64 [K, 2] arrays,
    checked as every reader checks polygons (``geometry.polygon_points``); LdznetError naming ``what``."""
    if not isinstance(polygons, list) or not all(isinstance(instance, list) for instance in polygons):
        raise LdznetError(f"{what}: 'Polygons' must be a list of instances, each a list of polygons "
                          f"[[x, y], ...], got {str(polygons)[:80]}")
    return [polygon_points(polygon, what) for instance in polygons for polygon in instance]


def open_phrasecut(argument: str, options: dict[str, str]) -> PhraseCutSource:
    """``phrasecut:DIR:SPLIT[?images=DIR1,DIR2]`` (module docstring)."""
    root, _, split = argument.rpartition(":")
    if not root:
        raise LdznetError(f"data spec 'phrasecut:{argument}': expected phrasecut:DIR:SPLIT, e.g. "
                          "phrasecut:/data/VGPhraseCut_v0:test")
    parse_options(f"phrasecut:{argument}", options, {"images": "comma-separated image folders"})
    images = [p for p in options.get("images", "").split(",") if p]
    return PhraseCutSource(root, split, images or None)
