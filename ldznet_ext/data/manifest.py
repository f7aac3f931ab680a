"""JSON-lines manifests (spec ``jsonl:PATH`` or ``PATH.jsonl``): one (image, phrase, mask file or
polygons) row a line, paths relative to the manifest; rows of one image form one example."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LdznetError, special_file_kind
from .examples import Example
from .files import read_image, read_mask
from .geometry import polygon_mask


class ManifestSource:
    """Examples from a JSON-lines manifest of (image, phrase, mask file or polygons) rows; files are
    read on demand, and a missing or corrupt image or mask raises ImageError naming its path."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.description = f"jsonl:{self.path}"
        rows: dict[str, list[tuple[str, object]]] = {}
        if kind := special_file_kind(self.path):
            raise LdznetError(f"{self.path}: {kind}, not a manifest file")
        try:
            lines = self.path.read_text(encoding="utf-8-sig").splitlines()  # -sig: editors that start with a BOM
        except (OSError, UnicodeDecodeError) as error:
            raise LdznetError(f"{self.path}: cannot read the manifest ({error})") from error
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, phrase = row["image"], row["phrase"]
                region = row["mask"] if "mask" in row else row["polygons"]
                if not isinstance(region, (str, list)) or not isinstance(image, str) or not isinstance(phrase, str):
                    raise TypeError(region)  # a null or object phrase was trained on as the text "None"
            except (ValueError, KeyError, TypeError, RecursionError) as error:  # RecursionError: JSON nested 100k deep
                raise LdznetError(f"{self.path}:{number}: expected a JSON object with 'image', 'phrase' and "
                                  f"'mask' (a file) or 'polygons' (a list), got {line[:120]!r}") from error
            if not phrase.strip():  # trained on as a prompt of no words
                raise LdznetError(f"{self.path}:{number}: the phrase is blank")
            rows.setdefault(image, []).append((phrase, region))
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
