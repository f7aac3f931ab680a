"""Reading any user image safely, and the resizing both ways between it and the model.

Input images come in every mode PIL knows (RGBA, LA, P, L, 16-bit, CMYK), EXIF-rotated, huge,
truncated or not images at all. Everything becomes an 8-bit RGB array (a file upright, as viewers show
it) or a clear ImageError. The model works at a "working size" (area about resolution^2, aspect kept, sides
multiples of 64, as the official inference); masks come back at the image's own size.

An image more elongated than MAX_ASPECT (a 1 x 100000 strip) would otherwise get a working size
far over resolution^2, since no side can be under 64: such an image is letterboxed instead, i.e.
scaled into a working frame of MAX_ASPECT with mid-grey bands, and the maps are cropped back to
its box before they are upsampled to its size.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, special_file_kind
from .limits import PIXELS

MAX_PIXELS = 100_000_000
"""Default pixel limit: larger images are refused before decoding (decompression-bomb guard)."""
# How far float pixels in [0, 1] may overshoot it (a resampling filter's ringing, an 8-bit step): clipped.
FLOAT_OVERSHOOT = 1 / 255
SIDE_MULTIPLE = 64
MAX_ASPECT = 8.0
"""Longest side / shortest side of a working frame. Up to it panoramas keep the whole working area;
at 384 px it leaves the short side 128 px, two cells of the UNet's deepest level, and more
elongated frames would leave it one cell (at 64 px) or none."""
PAD_GREY = 128
"""What transparent pixels and letterbox bands become: mid-grey, 0 in the model's [-1, 1] range."""

Box = tuple[int, int, int, int]
"""(left, top, right, bottom) of an image inside its working frame, in working pixels."""

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray
_SOURCES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)


EXTERNAL_DECODERS = ("EPS",)
"""Pillow formats decoded by another program: EPS runs Ghostscript, an interpreter of PostScript, on the
file. Images come from the network too (the API), so such files are not images here."""


def open_image(source: str | os.PathLike | io.BytesIO) -> Image.Image:
    """``Image.open`` of every format Pillow reads by itself (not EXTERNAL_DECODERS); lazy, as it is.
    Pillow's decompression-bomb warning (at open, above 89M pixels) is not shown: our own pixel limits
    are the guard, and the caller's one-line refusal says what it is."""
    if isinstance(source, (str, os.PathLike)) and (kind := special_file_kind(source)):
        raise ImageError(f"{Path(source).name}: {kind}, not an image file")
    Image.init()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source, formats=[name for name in Image.OPEN if name not in EXTERNAL_DECODERS])


def _to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode -> RGB; transparency (an alpha channel, or a PNG's transparent colour) is composited
    over mid-grey so hidden pixels can't leak in. Float images (mode F) in [0, 1] are read as float
    arrays are (``load_image``); F and 32-bit (I) images in 0..255 or 0..65535 by that range; values
    below 0 or above 65535 are refused, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():  # as in float arrays: NaN would pass as black, with a numpy warning
            raise ImageError(f"{name}: contains NaN or infinite values")
        unit = image.mode == "F" and array.size and array.max() <= 1 + FLOAT_OVERSHOOT  # [0, 1], as float arrays
        if array.size and (array.min() < (-FLOAT_OVERSHOOT if unit else 0) or array.max() > 65535):
            raise ImageError(f"{name}: a {image.mode} image with values from {array.min():g} to {array.max():g}; "
                             "expected values in [0, 1], 0..255 or 0..65535")  # no pixel range: clipping hides them
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if unit:
            top = 1.0
        key = image.info.get("transparency")  # a 16-bit grey PNG's transparent value
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        if isinstance(key, int):
            image = Image.merge("LA", (image, Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8), "L")))
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied; Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (PAD_GREY, PAD_GREY, PAD_GREY, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3]: a file's or bytes' upright (turned by its EXIF orientation, as
    viewers show it), a PIL image's or an array's as its pixels are (a pipeline that holds a decoded image
    inpaints those pixels, so the mask must fit them).

    ``source``: a path, encoded bytes, a PIL image or an array ([H, W] grey, [H, W, 3] RGB or
    [H, W, 4] RGBA; uint8, uint16 or float in [0, 1]). Raises ImageError for any other type, and for
    unreadable, corrupt, empty or over-limit (``max_pixels``) input.
    """
    if not isinstance(source, _SOURCES):
        raise ImageError(_unsupported_source(source))
    PIXELS.check(max_pixels, "max_pixels")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if not isinstance(text, str) or not text or "\0" in text:
            raise ImageError(f"image path {text!r} is not a file name (empty, bytes or holding a NUL character)")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    name = (Path(source).name or str(source)) if isinstance(source, (str, os.PathLike)) else "image"
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            is_path = isinstance(source, (str, os.PathLike))
            image = open_image(source if is_path else io.BytesIO(source))
        _check_size(image.width, image.height, max_pixels, name)
        frames = getattr(image, "n_frames", 1)
        if frames > 1:  # an animation or a multi-page TIFF: say which one the mask is of
            warnings.warn(f"{name} holds {frames} frames; masking the first", UserWarning, stacklevel=2)
        if image is not source:  # a decoded PIL image's pixels are what its holder masks and inpaints
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image, name)
        rgb.load()
    except ImageError:
        raise
    except FileNotFoundError as error:
        raise ImageError(f"{name}: file not found") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"{name}: not an image, or a format Pillow cannot read") from error
    except Image.DecompressionBombError as error:  # Pillow refuses twice its MAX_IMAGE_PIXELS at open
        raise ImageError(f"{name}: too large, refused by Pillow before our pixel limit applies ({error})") from error
    except MemoryError as error:
        raise ImageError(f"{name}: too large to decode in the memory available; downscale it") from error
    except OSError as error:
        if error.errno is not None:  # the file system's refusal (a folder, no permission, a name too long)
            raise ImageError(f"{name}: cannot read the file ({error.strerror})") from error
        raise ImageError(_undecodable(name, error)) from error  # Pillow's decoders: OSError without errno
    except Exception as error:  # corrupt data makes Pillow's decoders raise almost anything (TypeError, struct.error)
        raise ImageError(_undecodable(name, error)) from error
    return np.asarray(rgb, dtype=np.uint8).copy()


def type_name(value: object) -> str:
    """A value's type as users write it: "None", "list", "torch.Tensor", "numpy.ndarray"."""
    kind = type(value)
    return "None" if value is None else f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")


def _undecodable(name: str, error: Exception) -> str:
    return f"{name}: cannot decode the image ({type(error).__name__}: {error}); the file may be truncated or corrupt"


def _unsupported_source(source: object) -> str:
    hint = ""
    if isinstance(source, torch.Tensor):
        # A tensor's layout ([3, H, W] or [H, W, 3]) and range ([0, 1] or [-1, 1]) can't be told apart reliably.
        hint = ("; convert it to [H, W, 3] in [0, 1], e.g. a [3, H, W] one: x.detach().float().permute(1, 2, 0)"
                ".cpu().numpy() (a batch [N, 3, H, W]: x[0] first; a VAE decode's [-1, 1]: (x + 1) / 2 first)")
    return f"expected a path, bytes, PIL image or numpy array as the image, got {type_name(source)}{hint}"


def _check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
                         f"{max_pixels:,}; downscale it, or raise the limit (mask and batch: --max-pixels)")


def _array_to_rgb(array: np.ndarray, max_pixels: int) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"image array of shape {array.shape}: expected [H, W], [H, W, 3] or [H, W, 4]")
    _check_size(array.shape[1], array.shape[0], max_pixels, "image array")
    if not array.dtype.isnative:  # big-endian data from a file or another machine
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("image array contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        # Clipping would turn 0..255 data white and [-1, 1] data half black; FLOAT_OVERSHOOT is clipped.
        if low < -FLOAT_OVERSHOOT or high > 1 + FLOAT_OVERSHOOT:
            raise ImageError(f"image array of floats in [{low:g}, {high:g}]: expected floats in [0, 1] (for 0..255 "
                             "data divide by 255, for [-1, 1] data use (x + 1) / 2)")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageError(f"image array of dtype {array.dtype}: expected uint8, uint16 or float in [0, 1]")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[2] if array.ndim == 3 else 2]
    return np.asarray(_to_rgb(Image.fromarray(np.ascontiguousarray(array), mode)), dtype=np.uint8).copy()


def working_size(width: int, height: int, resolution: int = 384, multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """(width, height) with area about ``resolution``^2, the aspect ratio kept up to MAX_ASPECT (more
    elongated images are letterboxed, see ``image_box``), sides multiples of ``multiple``."""
    aspect = min(max(width / height, 1.0 / MAX_ASPECT), MAX_ASPECT)
    return (max(multiple, round(resolution * math.sqrt(aspect) / multiple) * multiple),
            max(multiple, round(resolution / math.sqrt(aspect) / multiple) * multiple))


def image_box(width: int, height: int, size: tuple[int, int], cell: int = 8) -> Box:
    """Where a ``width`` x ``height`` image lies in its working frame ``size`` = (w, h): the whole frame
    (stretched a little, as the sides are rounded), or for an image more elongated than MAX_ASPECT a
    centred band: the long side fills the frame, the short side is scaled alike. Its edges are on
    multiples of ``cell`` (the latent's downsampling), so maps at the latent's size crop exactly."""
    frame_w, frame_h = size
    if max(width / height, height / width) <= MAX_ASPECT:
        return 0, 0, frame_w, frame_h

    def band(extent: float, frame: int) -> tuple[int, int]:
        length = min(frame, max(cell, round(extent / cell) * cell))
        start = (frame - length) // 2 // cell * cell
        return start, start + length

    if width > height:
        top, bottom = band(frame_w * height / width, frame_h)
        return 0, top, frame_w, bottom
    left, right = band(frame_h * width / height, frame_w)
    return left, 0, right, frame_h


def to_model_input(image: np.ndarray, size: tuple[int, int], box: Box | None = None) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, h, w] in [-1, 1] at ``size`` = (w, h), the image inside ``box``
    (None: the whole frame) and mid-grey around it.

    Resized in 8-bit by Pillow's antialiased bicubic, so a huge image never becomes a huge float tensor.
    """
    left, top, right, bottom = box or (0, 0, *size)
    if (image.shape[1], image.shape[0]) != (right - left, bottom - top):
        image = np.asarray(Image.fromarray(image).resize((right - left, bottom - top), Image.BICUBIC))
    if (right - left, bottom - top) != tuple(size):
        frame = np.full((size[1], size[0], 3), PAD_GREY, np.uint8)
        frame[top:bottom, left:right] = image
        image = frame
    # astype copies: read-only inputs (views of PIL images) are fine, and torch gets its own memory
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0


def crop_to_box(maps: torch.Tensor, box: Box, size: tuple[int, int]) -> torch.Tensor:
    """The part over ``box`` of maps [..., m_h, m_w] that cover the working frame ``size`` = (w, h) on a
    grid of their own (the latent's, the frame's, or finer: a head's logits are 8x the latent, which is
    more than the frame for a model with f < 8); a view."""
    if tuple(box) == (0, 0, *size):
        return maps
    scale = Fraction(maps.shape[-1], size[0])  # map pixels per frame pixel
    edges = [edge * scale for edge in box]
    if Fraction(maps.shape[-2], size[1]) != scale or any(edge.denominator != 1 for edge in edges):
        raise ValueError(f"box {box} of frame {size} is not on the grid of {maps.shape[-1]}x{maps.shape[-2]} maps")
    left, top, right, bottom = (int(edge) for edge in edges)
    return maps[..., top:bottom, left:right]


def resize_probability(probability: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., h, w] probabilities -> [..., H, W] at ``size`` = (H, W), bilinear, clamped to [0, 1]; always
    a new float32 tensor (the input may be a cache that a caller must not reach)."""
    if tuple(probability.shape[-2:]) == tuple(size):
        return probability.float().clamp(0.0, 1.0)
    lead = probability.shape[:-2]
    flat = probability.reshape(-1, 1, *probability.shape[-2:]).float()
    resized = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return resized.reshape(*lead, *size).clamp(0.0, 1.0)
