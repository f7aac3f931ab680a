"""Head architectures by name and size, and their initialisation from an SD v1 UNet."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..backbones.base import LDZNET_BLOCKS
from ..checkpoint_io import parse_config
from ..sd.unet import UNetConfig, unet_config
from .ldznet import FUSIONS, LDZNet
from .rgbnet import RGBNet
from .znet import ZNet

ARCHITECTURES = ("ldznet", "znet", "rgbnet")


@dataclass(frozen=True)
class HeadConfig:
    """What a segmentation head is: architecture, UNet shape, the SD blocks it reads, the z side its
    positional embeddings are made for (LD-ZNet), the SD timestep its features come from, and how
    LD-ZNet takes them in (``sd_fusion``: "attention", the paper's model, or "concat", its Table 4
    ablation; heads saved before the option existed are "attention"), whether it has a learned
    presence output (``presence``, ``modeling.presence``) and the level its score must exceed for a
    term to be found (``presence_level``, in [0, 1), chosen on validation data so that it travels
    with the head)."""

    arch: str
    unet: UNetConfig = field(default_factory=lambda: unet_config("sd-v1", out_channels=1))
    sd_blocks: tuple[int, ...] = LDZNET_BLOCKS
    latent_size: int = 48
    timestep: int = 400
    sd_fusion: str = "attention"
    presence: bool = False
    presence_level: float = 0.5

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.sd_fusion not in FUSIONS:
            raise ValueError(f"unknown SD feature fusion {self.sd_fusion!r}; choose one of {', '.join(FUSIONS)}")
        if self.sd_fusion != "attention" and self.arch != "ldznet":
            raise ValueError(f"sd_fusion={self.sd_fusion!r} is an LD-ZNet option; {self.arch} reads no SD features")
        if not 0.0 <= self.presence_level < 1.0:
            raise ValueError(f"presence_level must be in [0, 1), got {self.presence_level}")

    @property
    def uses_sd_features(self) -> bool:
        return self.arch == "ldznet"

    @property
    def input_kind(self) -> str:
        """"image" for RGBNet (RGB in [-1, 1]), "latent" for the others (z = VAE mean x 0.18215)."""
        return "image" if self.arch == "rgbnet" else "latent"

    def to_dict(self) -> dict:
        """JSON-ready fields; ``sd_fusion`` only when not "attention" and the presence fields only
        with a presence output, so that other heads stay readable by releases that predate them."""
        data = {**asdict(self), "unet": self.unet.to_dict()}
        if self.sd_fusion == "attention":
            del data["sd_fusion"]
        if not self.presence:
            del data["presence"], data["presence_level"]
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "head config") -> HeadConfig:
        """The config a JSON object describes (``unet`` required); CheckpointError starting with
        ``where`` for anything else."""
        return parse_config(cls, data, where, required=("unet",))


def head_config(arch: str, size: str = "sd-v1", **overrides) -> HeadConfig:
    """The head of ``arch`` matching the SD UNet of ``size`` ("sd-v1" or "tiny")."""
    return replace(HeadConfig(arch, unet=unet_config(size, out_channels=1)), **overrides)


def build_head(config: HeadConfig) -> ZNet:
    """Instantiate a head (on the current default device; use ``torch.device("meta")`` for a dry build)."""
    if config.arch == "ldznet":
        head = LDZNet(config.unet, config.sd_blocks, config.latent_size, config.sd_fusion)
    else:
        head = (ZNet if config.arch == "znet" else RGBNet)(config.unet)
    if config.presence:
        head.add_presence()
    return head


def init_from_sd_unet(head: nn.Module, sd_unet_state: Mapping[str, Tensor]) -> list[str]:
    """Copy an SD UNet's weights into a head, as the official training starts.

    Every head tensor with a same-named, same-shaped SD tensor is copied; the 4-channel ``out.2``
    conv is sliced to its channel 0. Returns the names left at their fresh initialisation
    (``attn3``, ``norm_sd``, attention pools, ``final``, RGBNet's stem).
    """
    own = head.state_dict()
    loaded, fresh = {}, []
    for name, tensor in own.items():
        source = sd_unet_state.get(name)
        if source is not None and name.startswith("out.2."):
            source = source[: tensor.shape[0]]
        if source is not None and source.shape == tensor.shape:
            loaded[name] = source
        else:
            fresh.append(name)
    with torch.no_grad():
        for name, source in loaded.items():
            own[name].copy_(source)
    return fresh
