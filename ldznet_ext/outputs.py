"""Writing results: mask, probability and overlay PNGs, each written atomically.

A file is written to a temporary name in the target's folder and renamed into place, so a reader
(or a resumed batch) sees either the old file, nothing, or the complete new file; never half a
PNG. Temporary files are named ``.{name}.{pid}-{random}.ldznet-tmp`` so they are hidden and can be
recognised after a crash, with the process that writes them (:func:`abandoned_target`).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

from .errors import LdznetError

TEMP_SUFFIX = ".ldznet-tmp"
OVERLAY_COLOR = (255, 0, 0)
OVERLAY_OPACITY = 0.5


_TEMPORARY = re.compile(rf"\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}")


def _temporary_name(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (ours included); True when that cannot be told."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: keep everything
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # a number no PID can be
        return False
    return True


def abandoned_target(name: str) -> str | None:
    """The file name that ``name``, a temporary file of :func:`save_png` whose process has ended, was to
    become; None for any other name, a temporary file of a running process (ours included) too."""
    match = _TEMPORARY.fullmatch(name)
    if match is None or process_alive(int(match.group("pid"))):
        return None
    return match.group("target")


def remove_abandoned_temporaries(folder: Path, names: set[str]) -> None:
    """Remove the temporary files that ended processes (a kill -9, a power cut) left in ``folder`` for the
    files ``names``. Those of running processes are theirs: another shard, or a second run on the same
    folder, is writing them."""
    for path in folder.iterdir():
        if abandoned_target(path.name) in names:
            path.unlink(missing_ok=True)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: through symlinks and hard links when both exist,
    else by their resolved paths (a symlink to a file not yet written is that file)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is missing (or unreadable)
        try:
            return Path(a).resolve() == Path(b).resolve()
        except RuntimeError:  # a symlink loop (Python < 3.13 raises RuntimeError for it, not OSError)
            return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


class WriteError(OSError):
    """An output that could not be written once the work was done (a full disk): a system error, not bad
    input (the CLI's exit status 1), whose message names the file."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised inside (a full disk, a folder made read-only meanwhile) into a WriteError
    naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(error.errno, error.strerror or str(error), str(path)) from error


@contextmanager
def _checking(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised while checking an output before the work into LdznetError naming ``path``:
    an output that cannot be written there is a bad argument."""
    try:
        yield
    except OSError as error:
        raise LdznetError(f"cannot write {path}: {error.strerror or error}") from error


def writable_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, its folder created; LdznetError naming it when it cannot be written there.

    Commands call it before their work starts, so an evaluation or a model load is not lost to an
    output path that was never usable (a file where a folder should be, a read-only folder).
    """
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise LdznetError(f"cannot write {path}: {path.parent} is a file, not a folder")
    if path.is_dir():
        raise LdznetError(f"cannot write {path}: it is a folder")
    with _checking(path):
        _try_creating_a_file(path.parent)
    return path


def check_outputs(outputs: Iterable[str | os.PathLike | None], inputs: Mapping[str | os.PathLike, str]) -> None:
    """LdznetError unless each output given (None: not asked for) is writable (``writable_path``) and is
    neither another output nor one of the run's ``inputs`` (path -> what it is). Commands call it before
    their work, so that no run overwrites a file it reads, or one output another."""
    seen = {Path(path): what for path, what in inputs.items()}
    for output in outputs:
        if output is None:
            continue
        for other, what in seen.items():
            if same_file(output, other):
                raise LdznetError(f"{output}: the same file as {what}; give each output its own name")
        seen[Path(output)] = f"the output {output}"
        writable_path(output)


def check_report_name(path: str | os.PathLike | None, suffixes: tuple[str, ...], option: str,
                      earlier: re.Pattern[str] | None = None, kind: str = "") -> None:
    """LdznetError unless a report's name (``option``'s value; None: not asked for) ends in one of
    ``suffixes``, and, with ``earlier``, an existing file there begins as an earlier report (``kind``)
    does: a data set's images and JSON files (PhraseCut's refer_*.json) are never overwritten by a
    report named after them by mistake."""
    if path is None:
        return
    if Path(path).suffix.lower() not in suffixes:
        raise LdznetError(f"{path}: {option} writes a {suffixes[0]} file; give a name ending in {suffixes[0]}")
    if earlier is None or not Path(path).is_file():
        return
    with open(path, "rb") as file:
        start = file.read(4096).decode("utf-8", "replace")
    if start.strip() and not earlier.match(start):
        raise LdznetError(f"{path}: exists and is not {kind}; give a new name, or remove the file first")


def writable_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path, created; LdznetError when it is a file or no file can be created in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LdznetError(f"{folder} is a file, not a folder")
    with _checking(f"to {folder}"):
        _try_creating_a_file(folder)
    return folder


_created_folders: ContextVar[list[Path] | None] = ContextVar("created_folders", default=None)


@contextmanager
def folders_removed_on_failure() -> Iterator[None]:
    """Folders that the body creates for its outputs (:func:`writable_path`, :func:`writable_folder`) are
    removed again when it fails or is interrupted, those left empty: a command that fails leaves no trace."""
    token = _created_folders.set([])
    try:
        yield
    except BaseException:
        for folder in sorted(_created_folders.get(), key=lambda f: len(f.parts), reverse=True):  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (it holds an output, or another process's file), or gone
                pass
        raise
    finally:
        _created_folders.reset(token)


def _try_creating_a_file(folder: Path) -> None:
    """Create ``folder`` and a file in it, then remove the file. Permissions alone do not tell: root
    passes every access check, yet /proc or a read-only mount take no file."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    finally:
        created = _created_folders.get()
        if created is not None:
            created.extend(f for f in missing if f.is_dir())
    trial = folder / _temporary_name(folder / "trial")
    os.close(os.open(trial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    trial.unlink()


def stage_file(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """A temporary file beside ``path``, written by ``write`` and synced, for the caller to rename onto
    ``path`` (``os.replace``) or remove. On any failure or interruption nothing is left."""
    path = Path(path)
    temporary = path.with_name(_temporary_name(path))
    # O_EXCL: never write into someone else's file; mode 0o666 lets the umask decide, as for any new file.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` for the body to write a file under (for writers that take a name:
    safetensors, torch.save); renamed onto ``path`` when the body ends, removed when it fails or is
    interrupted, so ``path`` is always the old file or the whole new one. The name is :func:`stage_file`'s,
    so that :func:`remove_abandoned_temporaries` recognises it after a crash."""
    path = Path(path)
    temporary = path.with_name(_temporary_name(path))
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_together(writers: Mapping[Path, Callable[[BinaryIO], object]]) -> None:
    """Write several files so that all of them are replaced or none: each is staged beside its target
    (:func:`stage_file`), then all are renamed in the given order; a failure while staging (a full disk)
    or an interruption leaves every target as it was."""
    staged: dict[Path, Path] = {}
    try:
        for path, write in writers.items():
            staged[path] = stage_file(path, write)
        for path, temporary in staged.items():
            os.replace(temporary, path)
    finally:
        for temporary in staged.values():  # those not renamed
            temporary.unlink(missing_ok=True)


def png_writer(image: Image.Image) -> Callable[[BinaryIO], object]:
    """A writer for :func:`write_together` that saves ``image`` as PNG."""
    return lambda stream: image.save(stream, format="PNG")


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as PNG to ``path`` atomically (temporary file in the same folder, fsync, rename).

    On any failure (a full disk raises OSError) or interruption the temporary file is removed and
    an existing ``path`` is left untouched.
    """
    write_together({Path(path): png_writer(image)})
    return Path(path)


def selected_share(mask: np.ndarray) -> float:
    """The share of the image a uint8 mask [H, W] selects (pixels >= 128: half or more repainted)."""
    return float((_check(mask, np.uint8, "mask") >= 128).mean())


def mask_image(mask: np.ndarray) -> Image.Image:
    """uint8 [H, W] (0/255, or soft when feathered) -> a mode "L" image, white = selected."""
    return Image.fromarray(_check(mask, np.uint8, "mask"))


def probability_image(probability: np.ndarray) -> Image.Image:
    """uint16 [H, W] in 0..65535 -> a 16-bit grey image (mode "I;16")."""
    return Image.fromarray(_check(probability, np.uint16, "probability").astype("<u2"))


def _check(array: np.ndarray, dtype: type, what: str) -> np.ndarray:
    if array.ndim != 2 or array.dtype != dtype:
        raise ValueError(f"{what} must be {np.dtype(dtype).name} [H, W], got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def outline_width(height: int, width: int) -> int:
    """Outline thickness in pixels: 1 up to 1024 px on the long side, then 1 more per 1024 px."""
    return max(1, round(max(height, width) / 1024))


def render_overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OVERLAY_COLOR,
                   opacity: float = OVERLAY_OPACITY) -> np.ndarray:
    """The image with the mask laid over it: uint8 [H, W, 3] RGB, mask uint8 [H, W] -> uint8 [H, W, 3].

    Each pixel moves towards ``color`` by ``opacity`` x mask/255 (soft masks blend softly); the
    outline of the mask (mask >= 128) is drawn in ``color`` at full strength, ``outline_width`` px
    thick, inside the selected region. The image border is not an outline.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2] or mask.dtype != np.uint8:
        raise ValueError(f"mask must be uint8 {image.shape[:2]}, got {mask.dtype} {mask.shape}")
    weight = (mask.astype(np.float32) / 255.0 * opacity)[..., None]
    blended = image.astype(np.float32) * (1.0 - weight) + np.asarray(color, np.float32) * weight
    out = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    selected = (mask >= 128).astype(np.uint8)
    size = 2 * outline_width(*mask.shape) + 1
    # cv2.erode pads with the maximum, so a region touching the image border keeps that edge un-outlined.
    inner = cv2.erode(selected, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    out[(selected > 0) & (inner == 0)] = color
    return out


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write a uint8 [H, W] mask as an 8-bit grey PNG, atomically."""
    return save_png(mask_image(mask), path)
