"""Masks inside the WebUI: the host's model as backbone, a lazily loaded and cached head, and one
Segmenter per call.

The head file is read once and kept (on the GPU, or offloaded to the CPU between calls) until the
settings name another file or dtype, the host loads another model, or the UI reloads
(:meth:`MaskEngine.release`). The feature tap hooks the host UNet only during a call and removes
its hooks on the way out, also when the call raises.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..backbones.base import Backbone
from ..errors import CheckpointError, LdznetError
from ..factory import ModelSettings, build_segmenter, check_head_fits, head_dtype
from ..graphs import clear_graph_caches
from ..heads import load_head, read_head_config
from ..images import ImageInput
from ..job import ZERO_SHOT_MODE, MaskJob
from ..limits import RESOLUTION, TIMESTEP
from ..modeling.build import HeadConfig
from ..precision import DTYPES
from ..segmenter import Prediction, Segmenter
from .mask_model import SeparateModel
from .request import combine

HEAD_SUFFIX = ".safetensors"
NO_HEAD = "None"


@dataclass(frozen=True)
class EngineOptions:
    """The WebUI settings that shape a mask. head: file name in the heads folder (NO_HEAD: none);
    timestep: SD timestep of the features (None: the head's own); keep_on_gpu: leave the head on
    the GPU between calls; dtype: "auto" (the host UNet's) or one of precision.DTYPES; resolution:
    side of the working area in pixels (None: the head's own; zero-shot the model's, else
    ``zeroshot.ZERO_SHOT_RESOLUTION``); seed: noise seed of the feature step; cuda_graphs: replay the
    model calls as captured CUDA graphs where safe."""

    head: str = NO_HEAD
    timestep: int | None = None
    keep_on_gpu: bool = True
    dtype: str = "auto"
    resolution: int | None = None
    seed: int = 0
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise LdznetError(f"head dtype must be 'auto' or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.timestep is not None:
            TIMESTEP.check(self.timestep, "timestep")
        if self.resolution is not None:
            RESOLUTION.check(self.resolution, "working resolution")


@dataclass
class MaskResult:
    """mask: uint8 [H, W] after combining with a brush mask (255 = repaint); prediction: the
    segmenter's answer (probability and our own mask before combining)."""

    mask: np.ndarray
    prediction: Prediction

    def empty_reason(self, job: MaskJob) -> str:
        """Why ``job`` selected nothing: the brush mask it was combined with, the terms judged absent,
        else the expression and threshold."""
        selected = self.prediction.selected
        if selected is not None and bool(selected.any()):  # the expression selected something; combining took it
            return f"{job.combine!r} with the brush mask left nothing of {job.expression!r}"
        missing = ", ".join(repr(term) for term in self.prediction.missing)
        return (f"no match for {missing}" if missing else
                f"nothing selected for {job.expression!r} at threshold {job.threshold:g}")


class MaskEngine:
    """Head cache + mask computation for the WebUI front ends (script, tab, API)."""

    def __init__(self, heads_dir: str | Path):
        self.heads_dir = Path(heads_dir)
        self._lock = threading.RLock()
        self._key: tuple | None = None
        self._head: tuple[nn.Module, HeadConfig] | None = None
        self.mask_model = SeparateModel()  # the SD 1.x model for heads when the host's cannot serve them

    def list_heads(self) -> list[str]:
        """Head file names in the heads folder, sorted."""
        if not self.heads_dir.is_dir():
            return []
        return sorted(p.name for p in self.heads_dir.iterdir() if p.suffix == HEAD_SUFFIX and p.is_file())

    def release(self) -> None:
        """Drop the cached head and every captured CUDA graph (model change, settings change, UI reload)."""
        with self._lock:
            self._key = self._head = None
            clear_graph_caches()

    def head_path(self, options: EngineOptions) -> Path:
        """The selected head file; LdznetError when none is selected or it is missing (cheap: no loading)."""
        if options.head in ("", NO_HEAD):
            raise LdznetError("no LD-ZNet head is selected: put a head .safetensors file into "
                              f"{self.heads_dir} and choose it in Settings > LD-ZNet, or use mode 'zero-shot'")
        path = self.heads_dir / options.head
        try:
            found = path.parent == self.heads_dir and path.is_file()
        except OSError:  # a name the file system cannot hold (over 255 bytes as UTF-8): not a file there
            found = False
        if not found:
            raise CheckpointError(f"head file {options.head!r} not found in {self.heads_dir}; "
                                  "press the refresh button next to the head setting after adding files")
        return path

    def check(self, job: MaskJob, options: EngineOptions, backbone: Backbone | None = None) -> None:
        """Cheap readiness check for ``job`` (API validation): unless zero-shot, a head exists
        and, given the loaded model's ``backbone``, was made for it (its metadata only is read)."""
        if job.zero_shot:
            return
        path = self.head_path(options)
        if backbone is not None:
            check_head_fits(backbone, read_head_config(path), options.head, zero_shot=f"mode {ZERO_SHOT_MODE!r}")

    def _load_head(self, options: EngineOptions, backbone: Backbone) -> tuple[nn.Module, HeadConfig]:
        path = self.head_path(options)
        dtype = head_dtype(options.dtype, backbone)
        key = (str(path), path.stat().st_mtime_ns, dtype)
        if self._key != key:
            self.release()
            self._head = load_head(path, device="cpu", dtype=dtype)
            self._key = key
        head, config = self._head
        return head.to(backbone.device), config

    def segmenter(self, backbone: Backbone, job: MaskJob, options: EngineOptions) -> Segmenter:
        """A Segmenter on ``backbone`` for ``job``'s mode and refinement (the head is loaded on first use)."""
        settings = ModelSettings(resolution=options.resolution, timestep=options.timestep, seed=options.seed,
                                 refine=job.refine_settings(), cuda_graphs=options.cuda_graphs)
        if job.zero_shot:
            return build_segmenter(backbone, settings=settings)
        head, config = self._load_head(options, backbone)
        return build_segmenter(backbone, head, config, settings, head_name=options.head,
                               zero_shot=f"mode {ZERO_SHOT_MODE!r}")

    @contextmanager
    def session(self, backbone: Backbone, job: MaskJob, options: EngineOptions) -> Iterator[Segmenter]:
        """A Segmenter for ``job`` held for several images (the batch tab): the head cache is
        locked meanwhile, and the head goes back to the CPU afterwards unless ``keep_on_gpu``."""
        with self._lock:
            segmenter = self.segmenter(backbone, job, options)
            try:
                yield segmenter
            finally:
                if segmenter.head is not None and not options.keep_on_gpu:
                    segmenter.head.to("cpu")

    def predict(self, backbone: Backbone, image: ImageInput, job: MaskJob, options: EngineOptions,
                brush: np.ndarray | None = None) -> MaskResult:
        """The mask of ``job`` on ``image`` at the image's size, combined with ``brush`` (uint8 [H, W])."""
        expression = job.tree()  # LdznetError for an empty expression, before any work
        with self.session(backbone, job, options) as segmenter:
            segmenter.set_image(image)
            prediction = segmenter.predict(expression, job.mask_options())
        return MaskResult(combine(prediction.mask_image(), brush, job.combine), prediction)
