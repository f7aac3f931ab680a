"""Reading and writing tensor files without ever executing code from them.

``.safetensors`` is read as is. Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) go
through ``torch.load(weights_only=True)``; a PyTorch-Lightning checkpoint that also pickles
objects outside that allow-list (hyper-parameter namespaces, callbacks) is read with an unpickler
that rebuilds tensors and containers only and turns every other object into an inert
placeholder, so nothing from the file is imported or called.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import typing
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CheckpointError, special_file_kind
from .outputs import replacing

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE = "a single-file .safetensors or .ckpt"
_Config = TypeVar("_Config")


class _Inert:
    """Stands in for any pickled object outside the allow-list; accepts and ignores everything."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Globals a tensor checkpoint legitimately needs; everything else becomes _Inert.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    **{("torch", name): getattr(torch, name) for name in (
        "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage",
        "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage")},
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _ALLOWED_GLOBALS.get((module, name), _Inert)


class _AllowListPickleModule:
    """A ``pickle_module`` for torch.load whose unpicklers never resolve unknown globals."""

    Unpickler = _AllowListUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        # torch's legacy (non-zip) format reads its header pickles with ``load``: plain
        # pickle.load there would run whatever a crafted header asks for.
        return _AllowListUnpickler(file, **kwargs).load()


def _load_pickle(path: Path) -> Any:
    # torch warns about pickles it did not write (e.g. protocol 4) on stderr before the error we raise
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Lightning checkpoints pickle objects beside the tensors; read them inertly.
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_AllowListPickleModule)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a checkpoint file as {name: tensor} on the CPU.

    A Lightning/ldm ``.ckpt`` is unwrapped from its ``state_dict`` entry. Raises CheckpointError
    for a missing, unreadable, truncated or non-checkpoint file.
    """
    path = readable_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            # safetensors maps the file, so each tensor's data sits at its file offset, unaligned, and
            # CPU kernels take other paths for unaligned data (measured on AVX2: outputs 1 ulp away
            # from the same weights in memory). Owned copies also tie nothing to a file that may be
            # replaced or truncated later.
            return {k: v.clone() for k, v in load_file(str(path), device="cpu").items()}
        if suffix in PICKLE_SUFFIXES:
            data = _load_pickle(path)
        else:
            raise CheckpointError(f"{path.name}: unknown checkpoint format {suffix!r}; "
                                  f"supported: .safetensors, {', '.join(PICKLE_SUFFIXES)}")
    except CheckpointError:
        raise
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            KeyError, AttributeError, TypeError) as error:
        _check_named_by_format(path)
        raise CheckpointError(f"{path.name}: cannot read the file ({type(error).__name__}: {error}); "
                              "it may be truncated, corrupt or not a model checkpoint") from error
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path.name}: holds a {type(data).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if not tensors:
        if "string_to_param" in data:  # A1111's .pt embeddings keep their vectors one level down
            raise CheckpointError(f"{path.name}: a textual-inversion embedding (string_to_param), not a model")
        nested = sorted(str(k) for k, v in data.items() if isinstance(v, Mapping))[:5]
        raise CheckpointError(f"{path.name}: no tensors at its top level" + (
            f" (only under {', '.join(repr(k) for k in nested)}: a wrapper, a hypernetwork or training state, not "
            "a model's weights; only 'state_dict' is looked into)" if nested else ""))
    return tensors


def path_argument(value: object, what: str) -> Path:
    """A loader's path argument as a Path: text or an ``os.PathLike`` of text; CheckpointError naming
    ``what`` for anything else (None, a number, bytes, empty text)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text:
        found = repr(text) if isinstance(text, str) else type(value).__name__
        raise CheckpointError(f"{what} must be a file path (text or pathlib.Path), got {found}")
    return Path(text)


def named_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute (not resolved), so that a folder given as ``.`` or ``..`` has a name for
    messages and records (``named_path(path).name``)."""
    return Path(os.path.abspath(path))


def _check_named_by_format(path: Path) -> None:
    """CheckpointError saying what to rename when a file that could not be read is of the other format than
    its suffix says (the suffix decides how a file is read)."""
    found = _format_by_content(path)
    if found is not None and found != ("safetensors" if path.suffix.lower() == ".safetensors" else "pickle"):
        right = ".safetensors" if found == "safetensors" else ".ckpt"
        raise CheckpointError(f"{path.name}: a {found} file named {path.suffix}; rename it to {path.stem}{right}, "
                              "the suffix that says how it is read")


def _format_by_content(path: Path) -> str | None:
    """"safetensors" or "pickle" by a file's first bytes (a safetensors header length then "{"; a zip
    archive, as torch.save writes, or a pickle protocol mark), None otherwise."""
    with open(path, "rb") as f:
        start = f.read(9)
    if len(start) == 9 and start[8:] == b"{" and 0 < int.from_bytes(start[:8], "little") <= 100 * 2**20:
        return "safetensors"
    return "pickle" if start.startswith((b"PK\x03\x04", b"\x80")) else None


def readable_file(path: str | os.PathLike, what: str = "checkpoint", expected: str = SINGLE_FILE) -> Path:
    """``path`` once it is known to be a readable regular file; CheckpointError saying what it is
    otherwise (missing, a folder, a pipe or device, unreadable). ``expected`` ends the folder message."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder; expected {expected}")
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if kind := special_file_kind(path):
        raise CheckpointError(f"{what} {path} is {kind}, not a file; expected {expected}")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise CheckpointError(f"cannot read {what} {path}: {(error.strerror or str(error)).lower()}") from error
    if path.suffix.lower() == ".safetensors":
        try:
            os.fsencode(path).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{what} {ascii(path.name)}: its path is not valid UTF-8, which the safetensors "
                                  "library cannot open; rename it (or its folder)") from None
    return path


def json_kind(value: Any) -> str:
    """How an error message names the JSON type of ``value``."""
    return {dict: "a JSON object", list: "a JSON list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets, ``__metadata__``)."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if not 0 < header_size <= 100 * 2**20:
                raise ValueError(f"implausible header size {header_size}")
            header = json.loads(f.read(header_size))
    except (OSError, ValueError, RecursionError) as error:
        _check_named_by_format(path)
        raise CheckpointError(f"{path.name}: cannot read the safetensors header ({error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: the safetensors header is {json_kind(header)}, not a JSON object")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON-decoded ``ldznet.*`` metadata of a safetensors file ({} for other files or none).

    Only the JSON is checked here; :func:`parse_config` checks a field against what it describes.
    """
    path = readable_file(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    raw = safetensors_header(path).get("__metadata__") or {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path.name}: the safetensors '__metadata__' is {json_kind(raw)}, "
                              "not a JSON object of strings")
    metadata = {}
    for key, text in raw.items():
        if key.startswith("ldznet."):
            try:
                metadata[key[len("ldznet."):]] = json.loads(text)
            except (TypeError, ValueError, RecursionError) as error:
                raise CheckpointError(f"{path.name}: metadata field {key!r} is not valid JSON ({error})") from error
    return metadata


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of every tensor in a safetensors file, from its header alone (no tensor data is
    read); None for pickle-based files, whose shapes cannot be known without unpickling them."""
    path = readable_file(path)
    if path.suffix.lower() != ".safetensors":
        return None
    shapes = {}
    header, data_size = safetensors_header(path), _data_size(path)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or any(type(n) is not int or n < 0 for n in shape):
            raise CheckpointError(f"{path.name}: tensor {name[:80]!r} has no valid 'shape' in the safetensors header")
        _check_extent(path, name, entry, data_size)
        shapes[name] = tuple(shape)
    return shapes


# Bytes per element of the safetensors dtypes.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _data_size(path: Path) -> int:
    """The bytes after a safetensors file's header (its header already read, so its size is plausible)."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def _check_extent(path: Path, name: str, entry: dict, data_size: int) -> None:
    """CheckpointError unless the header entry's bytes lie within the file and fit its shape and dtype: what
    safetensors checks when it opens the file, here before a header's shapes build anything (a huge claimed
    shape overflowed torch's size computation) or a file is offered as usable (a partial download)."""
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path.name}: tensor {name[:80]!r} has no valid 'data_offsets' in the safetensors "
                              "header")
    if offsets[1] > data_size:
        raise CheckpointError(f"{path.name}: tensor {name[:80]!r} ends at byte {offsets[1]} of the data, but the file "
                              f"holds {data_size}: it is truncated (an unfinished download or copy?)")
    size = _DTYPE_BYTES.get(entry.get("dtype"))
    if size is not None and math.prod(entry["shape"]) * size != offsets[1] - offsets[0]:
        raise CheckpointError(f"{path.name}: tensor {name[:80]!r} of shape {entry['shape']} ({entry['dtype']}) does "
                              f"not fit its {offsets[1] - offsets[0]} bytes; the safetensors header is corrupt")


def read_tensors(path: str | os.PathLike, names: Iterable[str]) -> dict[str, Tensor]:
    """The named tensors of a safetensors file, read one by one (the others are never read), as owned
    CPU copies (see :func:`read_state_dict`)."""
    path = readable_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            return {name: file.get_tensor(name).clone() for name in names}
    except (SafetensorError, RuntimeError, OSError, ValueError) as error:
        raise CheckpointError(f"{path.name}: cannot read the file ({type(error).__name__}: {error}); "
                              "it may be truncated, corrupt or not a model checkpoint") from error


def parse_config(cls: type[_Config], value: Any, where: str, required: tuple[str, ...] = ()) -> _Config:
    """Build the dataclass ``cls`` from a JSON ``value``, or raise CheckpointError starting with
    ``where`` (e.g. "model.safetensors: field 'ldznet.unet'") that says what is wrong and expected.

    Keys must be fields of ``cls``; fields without a default and those in ``required`` must be
    present. int fields take integers >= 0, ``tuple[int, ...]`` fields lists of them, bool fields
    true/false, str fields strings, dataclass fields nested objects. A value the dataclass refuses
    (its ValueError) is reported the same way.
    """
    return _parse_value(cls, value, where, (), required)


def _parse_value(hint: Any, value: Any, where: str, keys: tuple[str, ...], required: tuple[str, ...] = ()) -> Any:
    at = f"{where}, key '{'.'.join(keys)}'" if keys else where

    def refuse(expected: str) -> CheckpointError:
        shown = json.dumps(value)
        return CheckpointError(f"{at} is {shown if len(shown) <= 40 else json_kind(value)}; expected {expected}")

    if dataclasses.is_dataclass(hint):
        fields = {f.name: f for f in dataclasses.fields(hint)}
        if not isinstance(value, dict):
            raise refuse(f"a JSON object with keys {', '.join(fields)}")
        unknown = sorted(set(value) - set(fields))
        missing = [k for k, f in fields.items() if k not in value and (k in required or (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING))]
        if unknown or missing:
            problem = f"unknown key(s) {', '.join(unknown)}" if unknown else f"no key {', '.join(missing)}"
            raise CheckpointError(f"{at} has {problem}; expected keys among {', '.join(fields)}")
        hints = typing.get_type_hints(hint)
        parsed = {k: _parse_value(hints[k], v, where, (*keys, k)) for k, v in value.items()}
        try:
            return hint(**parsed)
        except ValueError as error:
            raise CheckpointError(f"{at}: {error}") from error
    if hint is int:
        if type(value) is not int or value < 0:
            raise refuse("an integer >= 0")
        return value
    if hint is bool:
        if type(value) is not bool:
            raise refuse("true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise refuse("a string")
        return value
    if hint is float:
        if type(value) not in (int, float):
            raise refuse("a number")
        if abs(value) >= 2**1024 or not math.isfinite(value):  # a JSON integer may be too large for a float
            raise refuse("a finite number")
        return float(value)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or any(type(v) is not int or v < 0 for v in value):
            raise refuse("a list of integers >= 0")
        return tuple(value)
    raise TypeError(f"parse_config cannot check a field of type {hint}")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> None:
    """Write tensors with JSON metadata under ``ldznet.<key>``, atomically (``outputs.replacing``)."""
    with replacing(path) as temporary:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary),
                  metadata={f"ldznet.{k}": json.dumps(v) for k, v in metadata.items()})
        # safetensors creates its file 0600: a head another user's WebUI should read, as every file we write
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
