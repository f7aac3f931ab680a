"""Reading dataset files with errors that name the whole path (a data set has many ``1.jpg``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageError, LdznetError, special_file_kind
from ..images import load_image, open_image
from ..limits import Limit


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as uint8 [H, W, 3]; a missing, unreadable or corrupt file raises
    ImageError whose message starts with the full path."""
    path = Path(path)
    try:
        return load_image(path)
    except ImageError as error:
        reason = str(error).removeprefix(f"{path.name}: ")
        raise ImageError(f"{path}: {reason}") from error


_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_AS_STORED = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB")


def mask_inside(image: Image.Image) -> np.ndarray:
    """bool [H, W] of a mask image: a pixel is inside when any of its stored values is not zero, alpha
    ignored; a palette image's values are its indices (index 0 is outside, whatever its colour, as in
    label maps). A dark colour, a faint grey or a float of 0.5 is inside: converted to an 8-bit grey
    first, (0, 0, 1) or 0.5 became 0. Other modes (CMYK, YCbCr, ...) are read as their RGB."""
    if image.mode not in _AS_STORED + _WITH_ALPHA:
        image = image.convert("RGB")
    values = np.asarray(image)
    if image.mode in _WITH_ALPHA:
        values = values[..., :-1]
    inside = values != 0
    return inside.any(axis=-1) if inside.ndim == 3 else inside


def read_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """The mask image at ``path`` as bool [H, W] (:func:`mask_inside`). It must be ``shape`` (its
    image's [H, W]); anything else, or a file that is missing or not an image, raises ImageError
    naming the path."""
    path = Path(path)
    try:
        with open_image(path) as image:  # never Ghostscript (images.EXTERNAL_DECODERS)
            # the header's size first: a mask of another size is not decoded (a small PNG can hold 400 M pixels)
            if image.size != (shape[1], shape[0]):
                raise ImageError(f"{path}: the mask is {image.width}x{image.height} but its image is "
                                 f"{shape[1]}x{shape[0]}")
            return mask_inside(image)
    except ImageError:
        raise
    except FileNotFoundError as error:
        raise ImageError(f"{path}: mask file not found") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # UnidentifiedImageError: OSError
        raise ImageError(f"{path}: cannot read the mask ({error})") from error


DATA_ID = Limit(int, 0, 2**63 - 1)
"""An id in a data set's JSON: an integer, not a bool, nor a float such as 1.9 (int() read it as 1) or 1e400
(int() raised OverflowError)."""
DATA_SIDE = Limit(int, 1, 2**31 - 1)
"""An image side in a data set's JSON."""


def read_json(path: str | os.PathLike, what: str) -> object:
    """A JSON file, or LdznetError naming ``what`` it should have been."""
    if kind := special_file_kind(path):
        raise LdznetError(f"{path}: {kind}, not a file; expected {what}")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError as error:
        raise LdznetError(f"{path}: not found; expected {what}") from error
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: arrays nested thousands deep
        raise LdznetError(f"{path}: cannot read {what} ({type(error).__name__}: {error})") from error


def parse_options(spec: str, options: dict[str, str], allowed: dict[str, str]) -> None:
    """Refuse options a source does not know; ``allowed`` maps each known option to its meaning."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in allowed.items()) or "none"
        raise LdznetError(f"data spec {spec!r}: unknown option {', '.join(unknown)} (options: {known})")
