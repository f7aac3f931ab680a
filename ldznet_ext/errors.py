"""Errors that describe bad input; front ends (CLI, WebUI, API) show their message as is."""

from __future__ import annotations

import os
import stat


class LdznetError(ValueError):
    """Base class: the message says what was found and what is supported or expected."""


class CheckpointError(LdznetError):
    """A model file that is missing, corrupt, of an unsupported family or mismatched."""


class ImageError(LdznetError):
    """An image that cannot be read, is too large, or is not an image."""


class ExpressionError(LdznetError):
    """A malformed mask expression; ``position`` is the 0-based character offset."""

    def __init__(self, message: str, position: int | None = None):
        self.position = position
        where = f" at position {position}" if position is not None else ""
        super().__init__(f"{message}{where}")


def unexpected(error: BaseException) -> str:
    """An error that is not ours (out of memory, a host's failure) as the one line a front end shows:
    "RuntimeError: CUDA out of memory. ..."."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def special_file_kind(path: str | os.PathLike) -> str | None:
    """"a pipe", "a device" or "a socket" when ``path`` is one, else None (a regular file, a folder, or
    nothing there): an input named by a user that is none of these is refused before it is opened,
    because reading it could block forever (a pipe nobody writes to) or never end (``/dev/zero``)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable or a bad name: the reader says so
        return None
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return None
