"""The one place that asks the host (A1111 or Forge) for its model, settings, lock and progress.

All ``modules`` imports are lazy, inside functions: this file imports without a WebUI.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone
from ..backbones.family import host_family
from ..errors import CheckpointError, LdznetError
from ..images import ImageInput
from ..job import HEAD_MODE, MaskJob
from ..sd.checkpoint import ZERO_SHOT_ONLY
from ..segmenter import Segmenter
from . import mask_model, settings
from .engine import EngineOptions, MaskEngine, MaskResult

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
    """Drop the cached head (on model change, settings change)."""
    if _ENGINE is not None:
        _ENGINE.release()


def unload() -> None:
    """Drop the cached head and the separate SD 1.x mask model (Reload UI, the Unload button)."""
    release()
    unload_mask_model()


def model_loaded(sd_model) -> None:
    """on_model_loaded: drop the cached head, and the separate SD 1.x mask model when the new model
    serves heads itself (it would only hold memory)."""
    release()
    if _refusal(sd_model) is None:
        unload_mask_model()


def unload_mask_model() -> None:
    """Drop the separate SD 1.x mask model (its setting changed)."""
    if _ENGINE is not None:
        _ENGINE.mask_model.unload()


def opt(key: str, default=None):
    """A value from ``shared.opts``, or ``default`` before the settings exist."""
    from modules import shared

    return shared.opts.data.get(key, default)


def setting(key: str, overrides: Mapping[str, object] = MappingProxyType({})):
    """The value of LD-ZNet setting ``key`` (its default before the settings exist), or the one
    ``overrides`` gives it (a request's override_settings, which the host sets only for its job);
    LdznetError naming the setting when it holds a value the extension cannot use (:func:`settings.checked`)."""
    return settings.checked(key, overrides[key] if key in overrides else opt(key, settings.DEFAULTS[key]))


def control_default(key: str):
    """:func:`setting` for a control's starting value: the UI is built whatever the settings hold, so a
    bad value is reported in one line on stderr and the setting's default is used instead."""
    try:
        return setting(key)
    except LdznetError as error:
        print(f"LD-ZNet: {error}; the controls start at its default, {settings.DEFAULTS[key]!r}", file=sys.stderr)
        return settings.DEFAULTS[key]


def engine_options(overrides: Mapping[str, object] = MappingProxyType({})) -> EngineOptions:
    """The settings that shape a mask, checked (:func:`setting`, with ``overrides``)."""
    def get(key: str):
        return setting(key, overrides)

    timestep, resolution = get("ldznet_timestep"), get("ldznet_resolution")
    return EngineOptions(head=get("ldznet_head"), timestep=None if timestep < 0 else timestep,
                         keep_on_gpu=get("ldznet_keep_on_gpu"), dtype=get("ldznet_dtype"),
                         resolution=resolution or None, cuda_graphs=get("ldznet_cuda_graphs"))


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


def _backbone(sd_model, family: str = "sd-v1") -> Backbone:
    """The Backbone adapter over a host model of ``family`` ("sd-v1", "sd2" or "sdxl"; nothing is loaded
    or moved): one adapter per host for SD 1.x and SD 2.x, one for the SDXL family."""
    # The hosts' condition for sampling with zero terminal SNR (modules/processing.py; only Forge reads
    # the file's marker)
    zero_terminal_snr = opt("sd_noise_schedule") == "Zero Terminal SNR" \
        or bool(getattr(getattr(sd_model, "model_config", None), "ztsnr", False))
    if is_forge():
        from backend import memory_management

        from ..backbones.forge import ForgeBackbone
        from ..backbones.forge_sdxl import ForgeSDXLBackbone

        adapter = ForgeSDXLBackbone if family == "sdxl" else ForgeBackbone
        return adapter(sd_model, memory_management.load_model_gpu, zero_terminal_snr)
    from modules import devices

    from ..backbones.a1111 import A1111Backbone
    from ..backbones.a1111_sdxl import A1111SDXLBackbone

    return (A1111SDXLBackbone if family == "sdxl" else A1111Backbone)(sd_model, devices, zero_terminal_snr)


def _check_zero_shot(sd_model, family: str) -> None:
    """CheckpointError unless the host's model of ``family`` (one of ``sd.checkpoint.ZERO_SHOT_ONLY``) can serve
    zero-shot masks itself."""
    if is_forge():
        from ..backbones.forge import check_forge_sd2_model
        from ..backbones.forge_sdxl import check_forge_sdxl_model

        (check_forge_sdxl_model if family == "sdxl" else check_forge_sd2_model)(sd_model)
    else:
        from modules import sd_unet

        from ..backbones.a1111 import check_a1111_sd2_model
        from ..backbones.a1111_sdxl import check_a1111_sdxl_model

        check = check_a1111_sdxl_model if family == "sdxl" else check_a1111_sd2_model
        check(sd_model, sd_unet.current_unet)


def _zero_shot_backbone(sd_model, refusal: CheckpointError) -> Backbone:
    """The adapter over the host's SDXL-family or SD 2.x model for zero-shot masks (no extra download),
    where the SD 1.x path refused it (``refusal``); otherwise CheckpointError pointing to head mode."""
    family = host_family(sd_model) if sd_model is not None else None
    if family in ZERO_SHOT_ONLY:
        try:
            _check_zero_shot(sd_model, family)
        except CheckpointError as error:
            refusal = error
        else:
            return _backbone(sd_model, family)
    raise _zero_shot_refused(refusal)


def _host_model():
    """The host's model, loading Forge's selected checkpoint first as its own generations do."""
    if is_forge():
        from modules import sd_models

        sd_model, _ = sd_models.forge_model_reload()  # a no-op when the selected model is loaded
        return sd_model
    from modules import shared

    return shared.sd_model


def _refusal(sd_model) -> CheckpointError | None:
    """Why the host's model cannot serve LD-ZNet (None: it can)."""
    try:
        _check(sd_model)
    except CheckpointError as error:
        return error
    return None


def _zero_shot_refused(refusal: CheckpointError) -> CheckpointError:
    return CheckpointError(f"{refusal}. Zero-shot masks read the loaded model's own features; mode "
                           f"{HEAD_MODE!r} works with any loaded model: it runs on the SD 1.x model set in "
                           f"Settings > LD-ZNet > '{mask_model.SETTING_LABEL}'")


def _reason(refusal: CheckpointError) -> str:
    return f"the loaded model cannot serve the LD-ZNet head ({str(refusal).split(';')[0]})"


def mask_model_path(refusal: CheckpointError, overrides: Mapping[str, object] = MappingProxyType({})) -> Path:
    """The SD 1.x file the head runs on when the host's model cannot serve it (``refusal`` says why):
    the setting's choice among the host's SD 1.x checkpoints; CheckpointError saying what to put
    where when there is none. Cheap: checkpoint headers and the head's metadata only."""
    from modules import paths, sd_models

    head = engine().head_path(engine_options(overrides))
    return mask_model.choose(setting(mask_model.SETTING, overrides),
                             mask_model.sd1_checkpoints(sd_models.checkpoints_list), mask_model.head_sd_model(head),
                             Path(paths.models_path) / mask_model.CHECKPOINT_FOLDER, _reason(refusal))


def _placement(sd_model) -> tuple[torch.device, torch.dtype, mask_model.MakeRoom | None]:
    """Where the separate model runs: the host UNet's device and precision, and, in Forge, its
    memory manager's way to make room on the GPU (as its own models ask before loading). The precision
    is the one the host computes in, never its storage type (Forge's --unet-in-fp8-e4m3fn stores fp8)."""
    if is_forge():
        from backend import memory_management

        patcher = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
        if patcher is not None:
            device, dtype = torch.device(patcher.load_device), patcher.model.computation_dtype
        else:
            device = torch.device(memory_management.get_torch_device())
            dtype = memory_management.get_computation_dtype(device)

        def make_room(size: int, device: torch.device) -> None:
            memory_management.free_memory(size + memory_management.minimum_inference_memory(), device)

        return device, dtype, make_room
    from modules import devices

    return devices.device, devices.dtype_unet, None


@contextmanager
def job_backbone(job: MaskJob) -> Iterator[Backbone]:
    """The backbone for ``job``: an adapter over the host's model when it can serve LD-ZNet, and for
    zero-shot also over an SDXL-family or SD 2.x host model; else, for head mode, the separate SD 1.x mask model
    (loaded on first use; back on the CPU after the job unless kept on the GPU); zero-shot on other
    families is refused with a pointer to head mode. The host's model serves as its checkpoint alone
    (:func:`checkpoint_only`). The caller holds the GPU."""
    sd_model = _host_model()
    with checkpoint_only(sd_model):
        refusal = _refusal(sd_model)
        if refusal is None:
            yield _backbone(sd_model)
            return
        if job.zero_shot:
            yield _zero_shot_backbone(sd_model, refusal)
            return
        device, dtype, make_room = _placement(sd_model)
        separate = engine().mask_model
        try:
            yield separate.get(mask_model_path(refusal), device, dtype, make_room)
        finally:
            from modules import shared

            family = host_family(sd_model) if sd_model is not None else "unknown"
            if mask_model.rests_on_cpu(engine_options().keep_on_gpu, shared.cmd_opts, family):
                separate.rest()


# A1111's built-in Lora extension: its folder is on sys.path and its scripts ``import networks``.
A1111_LORA_MODULE = "networks"


@contextmanager
def checkpoint_only(sd_model) -> Iterator[None]:
    """The host's model without the LoRAs and hypernetworks of an earlier generation, while the block runs.

    Both hosts apply a prompt's networks only after the scripts' ``process`` (where a ``mask:`` line is
    masked) and leave them applied after the generation, so masks (also the API's and the tab's) would
    depend on whichever prompt ran last. Inside the block A1111's lists of loaded networks are empty and
    its layers hold their checkpoint weights, put back by the Lora extension's own
    ``network_apply_weights`` (which applies the networks again on the next generation's call); Forge's
    model holds its unpatched parts (``forge_objects_original``, what Forge starts each generation from).
    So a mask is the one ``ldznet mask --model <checkpoint>`` gives, and a replayed CUDA graph reads the
    checkpoint's weights as its capture did."""
    from modules import shared

    emptied = []
    lora = sys.modules.get(A1111_LORA_MODULE)
    a1111_lora = not is_forge() and isinstance(getattr(lora, "loaded_networks", None), list) \
        and hasattr(lora, "network_apply_weights")
    if a1111_lora:
        emptied.append(lora.loaded_networks)
    if isinstance(getattr(shared, "loaded_hypernetworks", None), list):
        emptied.append(shared.loaded_hypernetworks)
    kept = [list(networks) for networks in emptied]
    forge_parts = getattr(sd_model, "forge_objects", None)
    unpatched = getattr(sd_model, "forge_objects_original", None) if forge_parts is not None else None
    try:
        for networks in emptied:
            networks.clear()
        if a1111_lora and isinstance(sd_model, nn.Module):
            with torch.no_grad():
                for module in sd_model.modules():
                    if getattr(module, "network_layer_name", None) is not None:
                        lora.network_apply_weights(module)
        if unpatched is not None:
            sd_model.forge_objects = unpatched.shallow_copy()
        yield
    finally:
        for networks, names in zip(emptied, kept):
            networks[:] = names
        if unpatched is not None:
            sd_model.forge_objects = forge_parts


def compute(image: ImageInput, job: MaskJob, brush: np.ndarray | None = None) -> MaskResult:
    """A mask with the current settings, on the host's model or the separate SD 1.x mask model
    (:func:`job_backbone`). The caller holds the GPU (a generation in progress, or :func:`gpu_job`).
    Images are read by ``load_image``, as in the CLI; the host's own images are already upright (it
    reads every image through ``images.read``/``fix_image``, which applies and drops the EXIF
    orientation), so masks stay aligned with its pixels."""
    with job_backbone(job) as backbone:
        return engine().predict(backbone, image, job, engine_options(), brush)


@contextmanager
def session(job: MaskJob) -> Iterator[Segmenter]:
    """A context manager yielding a Segmenter for ``job`` (see :func:`job_backbone`), for several
    images in a row (the batch tab). The caller holds the GPU (:func:`gpu_job`)."""
    with job_backbone(job) as backbone, engine().session(backbone, job, engine_options()) as segmenter:
        yield segmenter


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


def check_ready(job: MaskJob, overrides: Mapping[str, object] = MappingProxyType({}),
                model_may_change: bool = False) -> None:
    """Cheap, non-blocking readiness check (API validation): the head exists unless zero-shot and was
    made for the loaded model, if that can serve it; if it cannot, zero-shot needs an SDXL-family or
    SD 2.x host model (else it is refused) and head mode an SD 1.x mask model among the host's checkpoints.
    ``overrides``: LD-ZNet settings the request sets for its job; ``model_may_change``: the request
    names a checkpoint, so the loaded model is not judged. Never loads a model."""
    sd_model = None if model_may_change else loaded_model()
    backbone = refusal = None
    if sd_model is not None:
        refusal = _refusal(sd_model)
        if refusal is None:
            backbone = _backbone(sd_model)
        elif job.zero_shot:
            backbone, refusal = _zero_shot_backbone(sd_model, refusal), None
    engine().check(job, engine_options(overrides), backbone)
    if refusal is not None:
        mask_model_path(refusal, overrides)
