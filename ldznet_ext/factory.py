"""One way from a backbone, an optional head and the user's numbers to a :class:`Segmenter`.

Every front end builds its segmenter here: ``loading.load_segmenter`` (the CLI, eval, Python) on
our SD v1 and the WebUI engine on the host's model. So the head-fits-model check, the head's
timestep default, the zero-shot defaults and the head's precision are decided once.

>>> segmenter = build_segmenter(sd, head, head_config)   # CheckpointError if the head is another model's
>>> segmenter = build_segmenter(sd)                      # zero-shot masks
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .backbones.base import Backbone, is_backbone
from .errors import CheckpointError, LdznetError
from .images import type_name
from .modeling.build import HeadConfig
from .precision import compute_dtype, dtype_named
from .refine import RefineSettings
from .sd.checkpoint import unet_config_from_state_dict
from .sd.unet import UNetConfig
from .segmenter import Segmenter, SegmenterSettings
from .zeroshot import ZeroShotSettings

# UNet fields that fix the shapes of the SD features an LD-ZNet head attends to.
_TOPOLOGY = ("model_channels", "channel_mult", "num_res_blocks", "attention_levels", "transformer_depth")


@dataclass(frozen=True)
class ModelSettings:
    """The user's numbers for a segmenter. resolution: working side in pixels (None: the head's own;
    zero-shot the model file's, else ``zeroshot.ZERO_SHOT_RESOLUTION``); timestep: SD timestep of the
    feature step (None: the head's training timestep, or :class:`ZeroShotSettings`' default); draws:
    noise draws averaged (None: 1 with a head, the zero-shot default without); seed: noise seed; refine:
    how term maps are upsampled; cuda_graphs: replay the model calls as captured CUDA graphs where safe
    (``graphs.py``)."""

    resolution: int | None = None
    timestep: int | None = None
    draws: int | None = None
    seed: int = 0
    refine: RefineSettings = field(default_factory=RefineSettings)
    cuda_graphs: bool = True

    def segmenter_settings(self, head_config: HeadConfig | None) -> SegmenterSettings:
        """The SegmenterSettings for a head with ``head_config`` (None: zero-shot); LdznetError for
        a number out of range."""
        try:
            if head_config is None:
                chosen = {k: v for k, v in (("timestep", self.timestep), ("draws", self.draws)) if v is not None}
                return SegmenterSettings(resolution=self.resolution, seed=self.seed, refine=self.refine,
                                         zero_shot=ZeroShotSettings(**chosen), cuda_graphs=self.cuda_graphs)
            return SegmenterSettings(resolution=self.resolution, seed=self.seed,
                                     draws=1 if self.draws is None else self.draws,
                                     timestep=head_config.timestep if self.timestep is None else self.timestep,
                                     refine=self.refine, cuda_graphs=self.cuda_graphs)
        except ValueError as error:
            raise LdznetError(str(error)) from error


def backbone_unet_config(backbone: Backbone) -> UNetConfig:
    """The configuration of ``backbone``'s UNet: the backbone's (``unet_config``), its UNet's own, or read from
    the weight shapes of a host's ldm-layout UNet."""
    config = getattr(backbone, "unet_config", None) or getattr(backbone.unet, "config", None)
    return config if isinstance(config, UNetConfig) else unet_config_from_state_dict(backbone.unet.state_dict())


def check_head_fits(backbone: Backbone, config: HeadConfig, head_name: str = "head",
                    zero_shot: str = "--zero-shot") -> None:
    """Refuse a head made for another SD model: its text width, its z channels and, for LD-ZNet,
    the UNet topology whose features it reads must match ``backbone``'s. ``zero_shot`` names the
    front end's way to masks without a head, for the message."""
    sd, own = backbone_unet_config(backbone), config.unet
    problems = []
    if own.context_dim != sd.context_dim:
        problems.append(f"text context {own.context_dim}-d vs {sd.context_dim}-d")
    if config.input_kind == "latent" and own.in_channels != sd.in_channels:
        problems.append(f"latent channels {own.in_channels} vs {sd.in_channels}")
    if config.uses_sd_features:
        problems += [f"{field} {getattr(own, field)} vs {getattr(sd, field)}"
                     for field in _TOPOLOGY if getattr(own, field) != getattr(sd, field)]
    if problems:
        raise CheckpointError(f"{head_name}: this {config.arch} head was made for a different SD model "
                              f"(head vs model: {'; '.join(problems)}); use a head trained on this model, "
                              f"or {zero_shot}")


def head_dtype(name: str, backbone: Backbone) -> torch.dtype:
    """The dtype a head computes in on ``backbone``: "auto" follows the backbone's UNet, any other
    precision name is that dtype (fp16 on the CPU: fp32, silently, as the backbone's host chose)."""
    return compute_dtype(backbone.dtype if name == "auto" else dtype_named(name), backbone.device)


def build_segmenter(backbone: Backbone, head: nn.Module | None = None, head_config: HeadConfig | None = None,
                    settings: ModelSettings = ModelSettings(), *, name: str = "the SD model",
                    head_name: str = "head", zero_shot: str = "--zero-shot") -> Segmenter:
    """A Segmenter on ``backbone`` with ``head`` (None: zero-shot masks), after checking that the head
    was made for this backbone (CheckpointError naming ``head_name``; ``zero_shot`` is the front end's
    way to masks without a head) and the numbers in ``settings`` (LdznetError). ``name``: what the
    segmenter's errors call the models."""
    if (head is None) != (head_config is None):
        raise LdznetError("pass both head and head_config, or neither for zero-shot masks")
    if not is_backbone(backbone):
        raise LdznetError(f"backbone must be a loaded model (a Backbone, e.g. load_stable_diffusion's), got "
                          f"{type_name(backbone)}")
    if not isinstance(settings, ModelSettings):
        raise LdznetError(f"settings must be ModelSettings, got {type_name(settings)}")
    segmenter_settings = settings.segmenter_settings(head_config)
    if head_config is not None:
        check_head_fits(backbone, head_config, head_name, zero_shot)
    return Segmenter(backbone, head, head_config, segmenter_settings, name)
