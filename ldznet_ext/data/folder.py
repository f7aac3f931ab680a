"""AIGI-style folders: images, and for each image one mask file per prompt.

Spec ``aigi:DIR`` (or ``folder:DIR``). Layout::

    DIR/images/NAME.png            any of .png .jpg .jpeg .webp .bmp .tif .tiff
    DIR/masks/NAME/PROMPT.png      one mask per prompt, same size as the image, non-zero = inside
    DIR/prompts.json               optional: {"NAME/FILE.png": "prompt text", ...}

A mask's prompt is its file name without the extension, underscores read as spaces
(``masks/castle/red_roof.png`` -> "red roof"); ``prompts.json`` gives the prompt of files whose
prompt cannot be a file name. An all-zero mask is a prompt that is absent from the image. Images
are taken in name order and prompts in file-name order; an image without masks, or masks without
an image, is an error when the source is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LdznetError
from .examples import Example
from .files import parse_options, read_image, read_json, read_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def prompt_of(mask_file: Path) -> str:
    """The prompt a mask file name stands for: the stem, underscores as spaces."""
    return mask_file.stem.replace("_", " ").strip()


class FolderSource:
    """Examples from a folder in the layout of the module docstring."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.description = f"aigi:{self.root}"
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise LdznetError(f"{self.root}: expected the folders images/ (NAME.png) and masks/ (NAME/PROMPT.png)")
        images = {}
        for path in sorted(images_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if path.stem in images:  # masks/NAME/ names an image by its stem
                    raise LdznetError(f"{images[path.stem]} and {path.name} share the name {path.stem!r}, which "
                                      f"masks/{path.stem}/ stands for; keep one")
                images[path.stem] = path
        masks = {p.name: sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                 for p in sorted(masks_dir.iterdir()) if p.is_dir()}
        lonely = sorted(name for name in images if not masks.get(name))
        orphans = sorted(set(masks) - set(images))
        if lonely or orphans:
            raise LdznetError(f"{self.root}: " + "; ".join(
                [f"images without masks/NAME/*.png: {', '.join(lonely[:5])}"] * bool(lonely)
                + [f"masks/ folders without an image: {', '.join(orphans[:5])}"] * bool(orphans)))
        if not images:
            raise LdznetError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        overrides = {}
        if (self.root / "prompts.json").is_file():
            overrides = read_json(self.root / "prompts.json", 'a JSON object {"NAME/FILE.png": "prompt"}')
            if not isinstance(overrides, dict):
                raise LdznetError(f"{self.root / 'prompts.json'}: expected an object {{\"NAME/FILE.png\": \"prompt\"}}")
        self._items = [(images[name], [(self._prompt(overrides, name, f), f) for f in masks[name]])
                       for name in sorted(images)]

    def _prompt(self, overrides: dict, name: str, mask: Path) -> str:
        """The prompt of ``mask`` (masks/NAME/FILE): prompts.json's text for it, else its file name's."""
        key = f"{name}/{mask.name}"
        prompt = overrides.get(key, prompt_of(mask))
        if not isinstance(prompt, str) or not prompt.strip():
            where = f"{self.root / 'prompts.json'}: {key!r}" if key in overrides else str(mask)
            raise LdznetError(f"{where}: gives no prompt (blank, or not text: {prompt!r}); name the mask after its "
                              "prompt, or give the prompt as text in prompts.json")
        return prompt

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Example:
        image_path, prompts = self._items[index]
        image = read_image(image_path)
        pairs = tuple((prompt, read_mask(mask, image.shape[:2])) for prompt, mask in prompts)
        return Example(f"aigi:{image_path}", image, pairs)


def open_folder(argument: str, options: dict[str, str]) -> FolderSource:
    """``aigi:DIR`` (module docstring)."""
    parse_options(f"aigi:{argument}", options, {})
    return FolderSource(argument)
