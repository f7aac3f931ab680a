"""ldznet: text-prompted masks for Stable Diffusion with LD-ZNet (ICCV 2023).

The public surface::

    from ldznet_ext import load_segmenter, MaskJob
    segmenter = load_segmenter("v1-5-pruned-emaonly.safetensors", "ldznet-head.safetensors", device="cuda")
    segmenter.set_image("photo.png")
    mask = segmenter.predict("goblin OR sword").mask_image()

Names are imported on first use, so ``import ldznet_ext`` (the CLI's start, the WebUI's extension
scan) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Segmenter": "ldznet_ext.segmenter",
    "SegmenterSettings": "ldznet_ext.segmenter",
    "Prediction": "ldznet_ext.segmenter",
    "load_segmenter": "ldznet_ext.loading",
    "segmenter_from_pipeline": "ldznet_ext.loading",
    "build_segmenter": "ldznet_ext.factory",
    "ModelSettings": "ldznet_ext.factory",
    "load_stable_diffusion": "ldznet_ext.sd.checkpoint",
    "load_head": "ldznet_ext.heads",
    "MaskJob": "ldznet_ext.job",
    "MaskOptions": "ldznet_ext.masks.ops",
    "RefineSettings": "ldznet_ext.refine",
    "load_image": "ldznet_ext.images",
    "LdznetError": "ldznet_ext.errors",
    "default_model_paths": "ldznet_ext.defaults",
}
__all__ = [
    "__version__", "Segmenter", "SegmenterSettings", "Prediction", "load_segmenter", "segmenter_from_pipeline",
    "build_segmenter", "ModelSettings",
    "load_stable_diffusion", "load_head", "MaskJob", "MaskOptions", "RefineSettings", "load_image", "LdznetError",
    "default_model_paths",
]

if TYPE_CHECKING:
    from .defaults import default_model_paths
    from .errors import LdznetError
    from .factory import ModelSettings, build_segmenter
    from .heads import load_head
    from .images import load_image
    from .job import MaskJob
    from .loading import load_segmenter, segmenter_from_pipeline
    from .masks.ops import MaskOptions
    from .refine import RefineSettings
    from .sd.checkpoint import load_stable_diffusion
    from .segmenter import Prediction, Segmenter, SegmenterSettings


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldznet_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
