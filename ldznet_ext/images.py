"""Reading any user image safely, and the resizing both ways between it and the model.

Input images come in every mode PIL knows (RGBA, LA, P, L, 16-bit, CMYK), EXIF-rotated, huge,
truncated or not images at all. Everything becomes an upright 8-bit RGB array or a clear
ImageError. The model works at a "working size" (area about resolution^2, aspect kept, sides
multiples of 64, as the official inference); masks come back at the image's own size.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_PIXELS = 100_000_000
"""Default pixel limit: larger images are refused before decoding (decompression-bomb guard)."""
SIDE_MULTIPLE = 64

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited over mid-grey so hidden pixels can't leak in."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An upright RGB image as uint8 [H, W, 3].

    ``source``: a path, encoded bytes, a PIL image or an array ([H, W] grey, [H, W, 3] RGB or
    [H, W, 4] RGBA; uint8, uint16 or float in [0, 1]). Raises ImageError for unreadable, corrupt,
    empty or over-limit (``max_pixels``) input.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    name = Path(source).name if isinstance(source, (str, os.PathLike)) else "image"
    try:
        # Our own pixel limit is the guard; Pillow's bomb warning (at open, above 89M pixels) is noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                image = source
            else:
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            _check_size(image.width, image.height, max_pixels, name)
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
            rgb.load()
    except ImageError:
        raise
    except FileNotFoundError as error:
        raise ImageError(f"{name}: file not found") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{name}: not an image, or a format Pillow cannot read") from error
    except Image.DecompressionBombError as error:  # Pillow refuses twice its MAX_IMAGE_PIXELS at open
        raise ImageError(f"{name}: too large, refused by Pillow before our pixel limit applies ({error})") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"{name}: cannot decode the image ({error}); the file may be truncated or corrupt") from error
    return np.asarray(rgb, dtype=np.uint8).copy()


def _check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
                         f"{max_pixels:,}; downscale it or raise the pixel limit")


def _array_to_rgb(array: np.ndarray, max_pixels: int) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"image array of shape {array.shape}: expected [H, W], [H, W, 3] or [H, W, 4]")
    _check_size(array.shape[1], array.shape[0], max_pixels, "image array")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("image array contains NaN or infinite values")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageError(f"image array of dtype {array.dtype}: expected uint8, uint16 or float in [0, 1]")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[2] if array.ndim == 3 else 2]
    return np.asarray(_to_rgb(Image.fromarray(np.ascontiguousarray(array), mode)), dtype=np.uint8).copy()


def working_size(width: int, height: int, resolution: int = 384, multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """(width, height) with area about ``resolution``^2, the aspect ratio kept, sides multiples of ``multiple``."""
    scale = math.sqrt(resolution * resolution / (width * height))
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def to_model_input(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, h, w] in [-1, 1] at ``size`` = (w, h).

    Resized in 8-bit by Pillow's antialiased bicubic, so a huge image never becomes a huge float tensor.
    """
    if (image.shape[1], image.shape[0]) != tuple(size):
        image = np.asarray(Image.fromarray(image).resize(tuple(size), Image.BICUBIC))
    # astype copies: read-only inputs (views of PIL images) are fine, and torch gets its own memory
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0


def resize_probability(probability: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., h, w] probabilities -> [..., H, W] at ``size`` = (H, W), bilinear, clamped to [0, 1]."""
    if tuple(probability.shape[-2:]) == tuple(size):
        return probability
    lead = probability.shape[:-2]
    flat = probability.reshape(-1, 1, *probability.shape[-2:]).float()
    resized = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return resized.reshape(*lead, *size).clamp(0.0, 1.0)
