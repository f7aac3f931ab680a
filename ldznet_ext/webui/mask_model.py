"""A separate SD 1.x model for head masks when the host's loaded model cannot serve the head (SDXL
family, SD 2.x, SD 3, Flux, inpainting or v-prediction SD 1.x, a TensorRT UNet).

The file is one of the host's own checkpoints, chosen in Settings > LD-ZNet among those whose
safetensors header says SD 1.x (nothing else is read to list them). It is loaded with this project's
loader, only the parts a head reads (``parts="mask"``), on first use, in the host UNet's precision;
the host's model is never touched. Between masks it stays on the GPU or rests on the CPU
(:func:`rests_on_cpu`), and it is unloaded when the setting changes, on Reload UI and by the
"Unload LD-ZNet models" button.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..checkpoint_io import read_metadata
from ..errors import CheckpointError
from ..precision import compute_dtype
from ..sd.checkpoint import load_stable_diffusion
from ..sd.header import classify_file
from ..sd.model import StableDiffusion

SETTING = "ldznet_mask_model"
SETTING_LABEL = "SD 1.x model for masks when the loaded model is not SD 1.x"
AUTOMATIC = "automatic"
CHECKPOINT_FOLDER = "Stable-diffusion"

MakeRoom = Callable[[int, torch.device], None]
"""Asks the host for ``bytes`` free on ``device`` before the model moves there (Forge's memory manager)."""

# (file, mtime, size) -> whether its header says a usable SD 1.x model: a refresh re-reads only changed files.
_SD1_FILES: dict[tuple[str, int, int], bool] = {}


def _is_sd1(filename: str) -> bool:
    stat = os.stat(filename)
    key = (filename, stat.st_mtime_ns, stat.st_size)
    if key not in _SD1_FILES:
        try:
            info = classify_file(filename)
        except CheckpointError:  # a broken file is not offered; loading it would fail the same way
            info = None
        _SD1_FILES[key] = info is not None and info.family == "sd-v1" and info.problem is None
    return _SD1_FILES[key]


def sd1_checkpoints(checkpoints: Mapping[str, object]) -> dict[str, Path]:
    """{title: file} of the host's checkpoints (``sd_models.checkpoints_list``, in its order) that are
    usable SD 1.x models by their safetensors header; pickle files are left out (not read)."""
    return {title: Path(info.filename) for title, info in checkpoints.items()
            if os.path.isfile(info.filename) and _is_sd1(info.filename)}


def head_sd_model(head_path: Path) -> str | None:
    """The SD file name a head was trained on, when its metadata names it (``training.sd_model``)."""
    training = read_metadata(head_path).get("training")
    name = training.get("sd_model") if isinstance(training, dict) else None
    return name if isinstance(name, str) and name else None


def choose(choice: str, sd1: Mapping[str, Path], trained_on: str | None, folder: Path, reason: str) -> Path:
    """The file for the setting's ``choice`` among the SD 1.x checkpoints ``sd1``: "automatic" picks the
    one named ``trained_on`` (the head's metadata) if listed, else the first. CheckpointError saying what to
    put where (``folder``: the host's models/Stable-diffusion) when there is none; ``reason``: why the
    loaded model cannot serve the head."""
    if not sd1:
        raise CheckpointError(f"{reason}; head mode then runs on a separate SD 1.x model, and none of the WebUI's "
                          f"checkpoints is one: put an SD 1.5 .safetensors file (e.g. v1-5-pruned-emaonly.safetensors) "
                          f"into {folder} and press the refresh button beside Settings > LD-ZNet > '{SETTING_LABEL}'")
    if choice in ("", AUTOMATIC):
        named = [path for path in sd1.values() if trained_on in (path.name, path.stem)]
        return named[0] if named else next(iter(sd1.values()))
    if choice not in sd1:
        raise CheckpointError(f"Settings > LD-ZNet > '{SETTING_LABEL}' is {choice!r}, which is not among the WebUI's "
                          f"SD 1.x checkpoints ({', '.join(sd1)}); choose one of them or '{AUTOMATIC}'")
    return sd1[choice]


def rests_on_cpu(keep_on_gpu: bool, cmd_opts, host_family: str) -> bool:
    """Whether the mask model goes back to the CPU after each job: when the user asks, and always under
    A1111's --lowvram / --medvram (--medvram-sdxl with an SDXL host), which keep the GPU for the host."""
    low_vram = getattr(cmd_opts, "lowvram", False) or getattr(cmd_opts, "medvram", False) or (
        getattr(cmd_opts, "medvram_sdxl", False) and host_family == "sdxl")
    return bool(low_vram) or not keep_on_gpu


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class SeparateModel:
    """The one separate SD 1.x mask model: loaded on first use, kept until :meth:`unload`."""

    def __init__(self, loader: Callable[..., StableDiffusion] = load_stable_diffusion):
        self._loader = loader
        self._lock = threading.RLock()
        self._key: tuple | None = None
        self._model: StableDiffusion | None = None

    @property
    def loaded(self) -> StableDiffusion | None:
        """The model if loaded, else None."""
        return self._model

    def get(self, path: Path, device: torch.device, dtype: torch.dtype, make_room: MakeRoom | None = None,
            ) -> StableDiffusion:
        """The mask parts of ``path`` on ``device`` in ``dtype`` (fp16 on the CPU: fp32), loaded if another
        file or precision was loaded before; ``make_room`` is asked before it moves to a GPU."""
        dtype = compute_dtype(dtype, device)
        with self._lock:
            key = (str(path), path.stat().st_mtime_ns, dtype)
            if self._key != key:
                self.unload()
                self._model = self._loader(path, device="cpu", dtype=dtype, parts="mask")
                self._key = key
            if self._model.device != torch.device(device):
                if make_room is not None and torch.device(device).type != "cpu":
                    make_room(model_bytes(self._model), torch.device(device))
                self._model.to(device)
            return self._model

    def rest(self) -> None:
        """Move the model to the CPU (between jobs)."""
        with self._lock:
            if self._model is not None:
                self._model.to("cpu")

    def unload(self) -> None:
        """Drop the model (the setting changed, Reload UI, the Unload button)."""
        with self._lock:
            self._key = self._model = None
