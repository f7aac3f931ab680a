"""Where the embedded micro model lives: a small SD v1-architecture model and its LD-ZNet head,
trained on the procedural micro world and shipped inside the package, so that ``ldznet mask``
works without any download."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "world" / "weights"
DEFAULT_SD_NAME = "micro-sd-v1.safetensors"
DEFAULT_HEAD_NAME = "micro-ldznet.safetensors"


def default_model_paths() -> tuple[Path, Path]:
    """(SD checkpoint, LD-ZNet head) of the embedded micro model.

    The paths are returned whether or not the files exist (the training tools write them here);
    :func:`ldznet_ext.loading.resolve_model_paths` checks that they do.
    """
    return WEIGHTS_DIR / DEFAULT_SD_NAME, WEIGHTS_DIR / DEFAULT_HEAD_NAME
