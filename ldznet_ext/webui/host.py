"""The one place that asks the host (A1111 or Forge) for its model, settings, lock and progress.

All ``modules`` imports are lazy, inside functions: this file imports without a WebUI.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import ImageInput
from ..sd.model import Backbone
from .engine import NO_HEAD, EngineOptions, MaskEngine, MaskResult
from .request import MaskRequest

HEADS_FOLDER = "ldznet"
_ENGINE: MaskEngine | None = None


def engine() -> MaskEngine:
    """The process-wide engine, heads in ``<models>/ldznet``."""
    global _ENGINE
    if _ENGINE is None:
        from modules import paths

        _ENGINE = MaskEngine(Path(paths.models_path) / HEADS_FOLDER)
    return _ENGINE


def release() -> None:
    """Drop the cached head (on model change, settings change, Reload UI)."""
    if _ENGINE is not None:
        _ENGINE.release()


def opt(key: str, default=None):
    """A value from ``shared.opts``, or ``default`` before the settings exist."""
    from modules import shared

    return shared.opts.data.get(key, default)


def engine_options() -> EngineOptions:
    timestep, resolution = int(opt("ldznet_timestep", -1)), int(opt("ldznet_resolution", 0))
    return EngineOptions(head=opt("ldznet_head", NO_HEAD) or NO_HEAD, timestep=None if timestep < 0 else timestep,
                         keep_on_gpu=bool(opt("ldznet_keep_on_gpu", True)), dtype=opt("ldznet_dtype", "auto"),
                         resolution=resolution or None)


def current_backbone() -> Backbone:
    """An adapter over the host's loaded model; CheckpointError when it is not usable (SD2, SDXL,
    inpainting, TensorRT UNet)."""
    from modules import shared

    sd_model = shared.sd_model
    if getattr(sd_model, "forge_objects", None) is not None:
        from backend import memory_management

        from .forge import ForgeBackbone, check_forge_model

        check_forge_model(sd_model)
        return ForgeBackbone(sd_model, memory_management.load_model_gpu)
    from modules import devices, sd_unet

    from .a1111 import A1111Backbone, check_a1111_model

    check_a1111_model(sd_model, sd_unet.current_unet)
    return A1111Backbone(sd_model, devices)


def check_model() -> None:
    """Raise CheckpointError when the loaded model cannot give LD-ZNet features."""
    current_backbone()


def compute(image: ImageInput, request: MaskRequest, brush: np.ndarray | None = None) -> MaskResult:
    """A mask on the host's model with the current settings. The caller holds the GPU (a
    generation in progress, or :func:`gpu_job`)."""
    if isinstance(image, Image.Image):
        # Pixels as the host uses them: no EXIF rotation (the host does not rotate API images either).
        image = np.asarray(image.convert("RGBA") if image.mode in ("RGBA", "LA", "P") else image.convert("RGB"))
    return engine().predict(current_backbone(), image, request, engine_options(), brush)


@contextmanager
def gpu_job(name: str) -> Iterator[object]:
    """Run GPU work from our own tab, button or API route: under the host's queue lock (one job at a
    time, in arrival order) and with ``shared.state`` begun, for progress and interruption."""
    from modules import call_queue, shared

    with call_queue.queue_lock:
        shared.state.begin(job=name)
        try:
            yield shared.state
        finally:
            shared.state.end()


def check_ready(request: MaskRequest) -> None:
    """Cheap, non-blocking readiness check (API validation): the head exists unless zero-shot and
    the model already loaded, if any, is usable. Never loads a model."""
    engine().check(request, engine_options())
    from modules import sd_models

    data = getattr(sd_models, "model_data", None)
    if getattr(data, "sd_model", None) is not None:
        current_backbone()
