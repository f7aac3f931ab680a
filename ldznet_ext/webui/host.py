"""The one place that asks the host (A1111 or Forge) for its model, settings, lock and progress.

All ``modules`` imports are lazy, inside functions: this file imports without a WebUI.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

from ..backbones.base import Backbone
from ..images import ImageInput
from ..job import MaskJob
from ..segmenter import Segmenter
from .engine import NO_HEAD, EngineOptions, MaskEngine, MaskResult

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


def is_forge() -> bool:
    """True inside Forge (its model is a Forge engine, loaded lazily), False inside A1111."""
    return importlib.util.find_spec("modules_forge") is not None


def loaded_model():
    """The host's current model without loading one; None when none is loaded. Forge loads the
    selected checkpoint only when something asks for it: until then its ``sd_model`` is a
    placeholder, or the previous model after the checkpoint setting changed."""
    from modules import sd_models

    data = sd_models.model_data
    if is_forge():
        current = data.forge_hash == str(data.forge_loading_parameters)
        return data.sd_model if current and getattr(data.sd_model, "forge_objects", None) is not None else None
    return data.sd_model


def _check(sd_model) -> None:
    if is_forge():
        from ..backbones.forge import check_forge_model

        check_forge_model(sd_model)
    else:
        from modules import sd_unet

        from ..backbones.a1111 import check_a1111_model

        check_a1111_model(sd_model, sd_unet.current_unet)


def _backbone(sd_model) -> Backbone:
    """The Backbone adapter over a host model (nothing is loaded or moved)."""
    if is_forge():
        from backend import memory_management

        from ..backbones.forge import ForgeBackbone

        return ForgeBackbone(sd_model, memory_management.load_model_gpu)
    from modules import devices

    from ..backbones.a1111 import A1111Backbone

    return A1111Backbone(sd_model, devices)


def current_backbone() -> Backbone:
    """An adapter over the host's model, loading Forge's selected checkpoint first as its own
    generations do (the caller holds the GPU); CheckpointError when the model is not usable (SD2,
    SDXL, inpainting, TensorRT UNet)."""
    if is_forge():
        from modules import sd_models

        sd_model, _ = sd_models.forge_model_reload()  # a no-op when the selected model is loaded
    else:
        from modules import shared

        sd_model = shared.sd_model
    _check(sd_model)
    return _backbone(sd_model)


def compute(image: ImageInput, job: MaskJob, brush: np.ndarray | None = None) -> MaskResult:
    """A mask on the host's model with the current settings. The caller holds the GPU (a
    generation in progress, or :func:`gpu_job`). Images are read by ``load_image``, as in the CLI; the
    host's own images are already upright (it reads every image through ``images.read``/``fix_image``,
    which applies and drops the EXIF orientation), so masks stay aligned with its pixels."""
    return engine().predict(current_backbone(), image, job, engine_options(), brush)


def session(job: MaskJob) -> AbstractContextManager[Segmenter]:
    """A context manager yielding a Segmenter for ``job`` on the host's model, for several
    images in a row (the batch tab). The caller holds the GPU (:func:`gpu_job`)."""
    return engine().session(current_backbone(), job, engine_options())


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


def check_ready(job: MaskJob) -> None:
    """Cheap, non-blocking readiness check (API validation): the model already loaded, if any, is
    usable; the head exists unless zero-shot, and was made for that model. Never loads a model."""
    sd_model = loaded_model()
    backbone = None
    if sd_model is not None:
        _check(sd_model)
        backbone = _backbone(sd_model)
    engine().check(job, engine_options(), backbone)
