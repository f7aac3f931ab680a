"""From user choices (file paths, device and dtype names, numbers) to a ready :class:`Segmenter`.

Shared by the CLI, the Python API (``ldznet_ext.load_segmenter``) and the tools, so each accepts the
same choices and refuses bad ones with the same messages. The WebUI builds its segmenter on the
host's loaded model instead (``webui.engine``, through ``factory.build_segmenter``). Checks that are
cheap (files exist, names are known, the head fits the SD model) run before anything large is
computed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .backbones.diffusers_pipeline import DiffusersBackbone
from .backbones.family import LABELS, NOT_MODELS, VAE_MISSING, CheckpointInfo
from .checkpoint_io import SINGLE_FILE, named_path, path_argument, readable_file
from .defaults import default_model_paths
from .devices import resolve_device
from .errors import CheckpointError, LdznetError
from .factory import ModelSettings, build_segmenter, head_dtype
from .heads import load_head
from .limits import RESOLUTION
from .precision import resolve_dtype
from .sd.checkpoint import load_stable_diffusion
from .sd.diffusers_folder import INDEX_FILE, diffusers_family, is_diffusers_folder, load_diffusers_folder
from .sd.header import PICKLE_FAMILY, classify_file
from .sd.model import StableDiffusion
from .sd.vae_file import read_vae_file
from .segmenter import Segmenter


def resolve_model_paths(model: str | os.PathLike | None, head: str | os.PathLike | None,
                        zero_shot: bool = False) -> tuple[Path, Path | None]:
    """(SD checkpoint file or diffusers folder, head or None for zero-shot) from the user's choices.

    No ``model``: the embedded micro model, with its own head unless ``head`` or ``zero_shot`` is
    given. A user ``model`` needs an explicit ``head`` or ``zero_shot``, because the embedded head
    was trained on the embedded model's features only.
    """
    if head is not None and zero_shot:
        raise LdznetError("choose either a head file or zero-shot masks, not both")
    if model is None:
        default_sd, default_head = default_model_paths()
        if not default_sd.is_file():
            raise LdznetError(f"the embedded micro model is not installed ({default_sd} is missing); "
                              "pass --model SD.safetensors with --head HEAD.safetensors or --zero-shot")
        if head is None and not zero_shot:
            if not default_head.is_file():
                raise LdznetError(f"the embedded micro model's head is not installed ({default_head} is missing); "
                                  "pass --head HEAD.safetensors or --zero-shot")
            head = default_head
        model = default_sd
    elif head is None and not zero_shot:
        raise LdznetError(f"{named_path(model).name}: a model of your own needs a segmentation head: pass "
                          "--head HEAD.safetensors (an LD-ZNet head trained for this model) or --zero-shot")
    return (_model_path(model),
            readable_file(head, "head file", "a head .safetensors file") if head is not None else None)


def _model_path(model: str | os.PathLike) -> Path:
    """``model`` as a readable single file or a diffusers folder; CheckpointError naming what it is otherwise."""
    if Path(model).is_dir() and not is_diffusers_folder(model):
        raise CheckpointError(f"model file {model} is a folder without {INDEX_FILE}; expected an SD checkpoint, "
                              f"{SINGLE_FILE}, or a diffusers folder")
    return Path(model) if is_diffusers_folder(model) else readable_file(model, "model file", f"an SD checkpoint, "
                                                                                             f"{SINGLE_FILE}")


def _check_model_beside_mask_model(model: str | os.PathLike) -> None:
    """CheckpointError unless ``model``, which a mask model stands in for (so it is never loaded), is a
    model file or folder at all: not missing, and not a LoRA, an embedding, a VAE or a head by its header."""
    path = _model_path(model)
    if path.is_file():
        info = classify_file(path)
        if info.family in NOT_MODELS:
            raise CheckpointError(f"{path.name}: {info.problem}")


def resolve_mask_model(mask_model: str | os.PathLike | None, head: str | os.PathLike | None,
                       zero_shot: bool = False) -> Path | None:
    """The SD 1.x checkpoint file or diffusers folder a head runs on instead of the model (None: the model
    itself), checked before any work: it serves a head only, and its safetensors header (a folder: its
    layout and configs) must say SD 1.x."""
    if mask_model is None:
        return None
    if zero_shot or head is None:
        raise LdznetError(f"{named_path(mask_model).name}: a mask model serves a head, and zero-shot masks come from "
                          "the model itself; pass --head HEAD.safetensors with --mask-model, or drop --mask-model")
    if is_diffusers_folder(mask_model):
        path, kind, info = named_path(mask_model), "folder", CheckpointInfo(diffusers_family(mask_model))
    else:
        path, kind = readable_file(mask_model, "mask model file", f"an SD 1.x checkpoint, {SINGLE_FILE}, or an "
                                   f"SD 1.x diffusers folder (with {INDEX_FILE})"), "file"
        info = classify_file(path)
    if info.family == "sd-v1" and info.problem == VAE_MISSING:
        raise CheckpointError(f"{path.name}: an SD 1.x {kind} without its VAE, which a mask model must carry (a VAE "
                              f"file replaces the VAE of --model only); run the head on it as the model instead: "
                              f"--model {path.name} --vae VAE.safetensors --head HEAD")
    # A pickle's family is known only once it is read: load_stable_diffusion refuses it then by name.
    if info.family != PICKLE_FAMILY and (info.family != "sd-v1" or info.problem):
        found = LABELS.get(info.family, info.family) + (f" ({info.problem})" if info.problem else "")
        raise CheckpointError(f"{path.name}: the mask model must be an SD 1.x checkpoint, since the head reads SD 1.x "
                              f"UNet features; this {kind} is {found}")
    return path


def model_label(model: str | os.PathLike, vae: str | os.PathLike | None = None) -> str:
    """How messages and records name a model file loaded with a VAE file (or without)."""
    return named_path(model).name + (f" (VAE {named_path(vae).name})" if vae is not None else "")


def check_vae_choice(vae: str | os.PathLike | None, mask_model: str | os.PathLike | None) -> None:
    """LdznetError when a VAE file is given beside a mask model: the VAE replaces the model's, and with a
    mask model the masks come from the mask model, whose own VAE its head reads."""
    if vae is not None and mask_model is not None:
        raise LdznetError(f"{named_path(vae).name}: a VAE file replaces the VAE of --model, but with --mask-model the "
                          "masks come from the mask model and its own VAE; drop --vae, or drop --mask-model")


def load_model(path: str | os.PathLike, **options) -> StableDiffusion:
    """The SD model of a single file (:func:`load_stable_diffusion`) or a diffusers folder
    (:func:`load_diffusers_folder`), with the same ``options``."""
    load = load_diffusers_folder if is_diffusers_folder(path) else load_stable_diffusion
    return load(path, **options)


def load_segmenter(model: str | os.PathLike, head: str | os.PathLike | None = None, *,
                   mask_model: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                   device: str | torch.device | None = None, dtype: str | torch.dtype = "fp32",
                   resolution: int | None = None,
                   timestep: int | None = None, draws: int | None = None, seed: int = 0) -> Segmenter:
    """Load an SD checkpoint and optionally a head (None: zero-shot masks, where SDXL-family and SD 2.x
    models serve too) into a Segmenter.

    ``mask_model``: an SD 1.x checkpoint file or diffusers folder the head runs on, beside a ``model`` that
    cannot serve a head (SDXL family, SD 2.x); ``model`` is then not loaded, ``mask_model`` only as far as the
    head reads it (``parts="mask"``), and the mask is the one ``mask_model`` makes.

    ``vae``: a VAE file (ldm or diffusers layout, a diffusers ``vae/`` folder, or a checkpoint whose VAE is
    taken) used in place of the model's VAE, or where its file has none; not with ``mask_model``, whose own
    VAE the head was matched to.

    ``timestep`` and ``draws`` default to the head's training timestep and one draw, or to the
    zero-shot defaults (:class:`ZeroShotSettings`); ``resolution`` None uses the head's own.
    """
    if model is None:
        raise CheckpointError("model is None: give an SD checkpoint's path; the embedded micro model is "
                              "load_segmenter(*ldznet_ext.default_model_paths())")
    model = path_argument(model, "model")
    head, mask_model, vae = (None if path is None else path_argument(path, what)
                             for path, what in ((head, "head file"), (mask_model, "mask model"), (vae, "VAE file")))
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if resolution is not None:
        RESOLUTION.check(resolution, "resolution")
    mask_model = resolve_mask_model(mask_model, head)
    if mask_model is not None:
        _check_model_beside_mask_model(model)
    check_vae_choice(vae, mask_model)
    head_module = head_config = None
    if head is not None:
        head_module, head_config = load_head(head, device=device, dtype=torch_dtype)
    vae_state = read_vae_file(vae) if vae is not None else None
    # A mask model serves the head alone: only what the head reads is loaded.
    backbone = load_model(mask_model or model, device=device, dtype=torch_dtype, zero_shot=head is None,
                          parts="mask" if mask_model else "all", vae=vae_state)
    name = model_label(mask_model or model, vae) + (f" with {named_path(head).name}" if head is not None else "")
    return build_segmenter(backbone, head_module, head_config,
                           ModelSettings(resolution=resolution, timestep=timestep, draws=draws, seed=seed),
                           name=name, head_name=named_path(head).name if head is not None else "head")


def segmenter_from_pipeline(pipe, head: str | os.PathLike | None = None, *, resolution: int | None = None,
                            timestep: int | None = None, draws: int | None = None, seed: int = 0) -> Segmenter:
    """A Segmenter on a diffusers Stable Diffusion pipeline already loaded (SD 1.x for a head or zero-shot,
    SD 2.x and the SDXL family for zero-shot), reusing its parts in place, on its device and dtype: see
    ``backbones.diffusers_pipeline``. ``head``: a head file (None: zero-shot masks), computed in the
    pipeline's dtype; the other choices as for :func:`load_segmenter`."""
    backbone = DiffusersBackbone(pipe)
    if resolution is not None:
        RESOLUTION.check(resolution, "resolution")
    head_module = head_config = None
    if head is not None:
        head = path_argument(head, "head file")
        head_module, head_config = load_head(head, device=backbone.device, dtype=head_dtype("auto", backbone))
    name = f"the {type(pipe).__name__}'s model" + (f" with {named_path(head).name}" if head is not None else "")
    return build_segmenter(backbone, head_module, head_config,
                           ModelSettings(resolution=resolution, timestep=timestep, draws=draws, seed=seed),
                           name=name, head_name=named_path(head).name if head is not None else "head",
                           zero_shot="head=None")
