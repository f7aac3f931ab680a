"""Backbone adapter over AUTOMATIC1111's loaded model (``shared.sd_model``, an ldm LatentDiffusion): SD 1.x,
and SD 2.x for zero-shot masks (A1111's OpenCLIP wrapper gives its 1024-d context; a v-prediction
model's output, ``parameterization`` "v", is converted to eps).

Every call goes through the model's own methods, so the WebUI's hijacks and its --medvram /
--lowvram offloading hooks fire exactly as in a generation: ``encode_first_stage`` +
``get_first_stage_encoding`` (VAE), ``get_learned_conditioning`` (A1111's CLIP wrapper with
75-token chunks and emphasis), ``apply_model`` (UNet). Nothing is changed on the model; the
feature tap adds forward hooks for one call only.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..sd.schedule import NoiseSchedule, rescale_zero_terminal_snr
from ..sd.schedule import PREDICTIONS, v_to_eps
from .base import CaptureModules, Conditioning, UNetLayout, ldm_layout, wrapper_token_spans
from .family import LABELS, check_zero_shot_prediction, host_family, sd2_variant
from .sampling import sample_posterior


def check_a1111_model(sd_model, current_unet=None) -> None:
    """Raise CheckpointError when the loaded model is not one LD-ZNet can read features from."""
    if sd_model is None:
        raise CheckpointError("no Stable Diffusion model is loaded; load a checkpoint first")
    name = model_name(sd_model)
    family = host_family(sd_model)
    if family not in ("sd-v1", "sd-v1-inpainting"):
        raise CheckpointError(f"{name} is {LABELS[family]}; LD-ZNet reads the features of SD 1.x "
                              "UNets (for zero-shot masks also of SD 2.x and SDXL-family ones)")
    if getattr(sd_model, "parameterization", "eps") != "eps":
        raise CheckpointError(f"{name} predicts {sd_model.parameterization!r}; "
                              "LD-ZNet needs an eps-prediction SD 1.x model")
    unet = sd_model.model.diffusion_model
    in_channels = unet.input_blocks[0][0].in_channels
    family = host_family(sd_model, in_channels)
    if family != "sd-v1":
        kind = LABELS[family] if family == "sd-v1-inpainting" else f"a {in_channels}-channel UNet"
        raise CheckpointError(f"{name} is {kind}; LD-ZNet needs a plain SD 1.x model with 4 input channels: "
                              "load the base model the inpainting model was made from")
    check_torch_unet(current_unet)


def check_a1111_sd2_model(sd_model, current_unet=None) -> None:
    """Raise CheckpointError unless A1111's loaded model is a text-to-image SD 2.x model whose own features
    zero-shot masks can read: a 4-channel UNet conditioned on text alone, eps or v prediction, torch modules."""
    name = model_name(sd_model)
    family = host_family(sd_model)
    if family != "sd2":
        raise CheckpointError(f"{name} is {LABELS[family]}, not SD 2.x")
    in_channels = sd_model.model.diffusion_model.input_blocks[0][0].in_channels
    variant = sd2_variant(in_channels, getattr(sd_model.model, "conditioning_key", None))
    if variant is not None:
        raise CheckpointError(f"{name} is {variant}; zero-shot masks need a text-to-image SD 2.x model: "
                              "load the SD 2.x model it was made from")
    check_zero_shot_prediction(name, getattr(sd_model, "parameterization", "eps"), PREDICTIONS)
    check_torch_unet(current_unet)


def model_name(sd_model) -> str:
    """The loaded checkpoint's name for messages."""
    return getattr(getattr(sd_model, "sd_checkpoint_info", None), "name_for_extra", None) or "the loaded model"


def check_torch_unet(current_unet) -> None:
    """Raise CheckpointError when A1111's ``sd_unet.current_unet`` replaces the torch UNet (None: it does not)."""
    if current_unet is not None:
        label = getattr(getattr(current_unet, "option", None), "label", type(current_unet).__name__)
        raise CheckpointError(f"the UNet is replaced by {label!r} (TensorRT or another SD Unet), which bypasses "
                              "the torch modules LD-ZNet reads; set Settings > Stable Diffusion > SD Unet to None")


class A1111Backbone:
    """The segmenter's Backbone over A1111's ``shared.sd_model``; ``devices`` is ``modules.devices``.

    The schedule is the model's own (``alphas_cumprod_original``), rescaled to zero terminal SNR when
    ``zero_terminal_snr`` (A1111's "Noise schedule for sampling" setting): A1111 rewrites
    ``alphas_cumprod`` from it at every generation, after the scripts' ``process`` and also cast to fp16
    by a setting for old seeds, so that table would be the last generation's.
    """

    def __init__(self, sd_model, devices: ModuleType, zero_terminal_snr: bool = False):
        self.sd_model = sd_model
        self.devices = devices
        table = getattr(sd_model, "alphas_cumprod_original", None)
        table = (sd_model.alphas_cumprod if table is None else table).detach()
        self.schedule = NoiseSchedule(rescale_zero_terminal_snr(table) if zero_terminal_snr else table)

    @property
    def unet(self) -> nn.Module:
        return self.sd_model.model.diffusion_model

    @property
    def device(self) -> torch.device:
        return self.devices.device

    @property
    def dtype(self) -> torch.dtype:
        return self.devices.dtype_unet

    @property
    def layout(self) -> UNetLayout:
        return ldm_layout(self.unet)

    @property
    def capture_modules(self) -> CaptureModules:
        """The VAE and the UNet: CUDA graphs may capture their calls (``graphs.py``); --medvram /
        --lowvram put offloading hooks on them, which keeps those hosts eager."""
        return CaptureModules(self.sd_model.first_stage_model, self.unet)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.sd_model.first_stage_model.encoder.down) - 1)

    @torch.no_grad()
    def encode_image(self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """image [B, 3, H, W] in [-1, 1] -> scaled z [B, 4, H/8, W/8] (posterior mean unless ``sample``)."""
        with self.devices.autocast():
            posterior = self.sd_model.encode_first_stage(image.to(self.device, self.devices.dtype_vae))
            if isinstance(posterior, Tensor):
                z = posterior
            elif sample:
                z = sample_posterior(posterior.mean, posterior.std, generator)
            else:
                z = posterior.mode()
            return self.sd_model.get_first_stage_encoding(z).float()

    def token_spans(self, prompts: Sequence[str]) -> list[tuple[int, int]]:
        """Each prompt's content tokens as the host's text wrapper places them (its textual inversions)."""
        return wrapper_token_spans(self.text_wrapper(), prompts)

    def text_wrapper(self):
        """The WebUI's CLIP (SD 2.x: OpenCLIP) wrapper, whose ``tokenize_line`` places a prompt's tokens."""
        return self.sd_model.cond_stage_model

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """prompts -> context [B, 77k, 768] (SD 2.x: 1024) through the WebUI's CLIP or OpenCLIP wrapper."""
        with self.devices.autocast():
            return Conditioning(self.sd_model.get_learned_conditioning(list(prompts)))

    @torch.no_grad()
    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """eps [B, 4, h, w] from ``sd_model.apply_model`` (an SD 2.x v-prediction model's v converted)."""
        z_t, t = z_t.to(self.device), t.to(self.device)
        with self.devices.autocast():
            out = self.sd_model.apply_model(z_t, t, conditioning.context.to(self.device))
        return self.as_eps(out, z_t, t)

    def as_eps(self, out: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """The UNet's output ``out`` for z_t at timesteps t as eps: as it is for an eps model, converted
        from v for a v-prediction one (``sd_model.parameterization``)."""
        if getattr(self.sd_model, "parameterization", "eps") == "eps":
            return out
        return v_to_eps(out, z_t, self.schedule, t)
