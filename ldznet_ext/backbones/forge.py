"""Backbone adapter over Forge's loaded model (``shared.sd_model``, a Forge diffusion engine): SD 1.x, and
SD 2.x (``backend/diffusion_engine/sd20.py``: its OpenCLIP text engine gives the 1024-d context) for
zero-shot masks.

Forge keeps its parts in ``sd_model.forge_objects`` (``unet``: a UnetPatcher around a KModel,
``vae``, ``clip``) and moves them between devices itself (``backend.memory_management``). The
KModel speaks k-diffusion: ``apply_model(x, sigma, c_crossattn=...)`` takes x = z + sigma * noise
and returns the denoised x0. At an SD timestep t with a_t = alphas_cumprod[t]:
sigma_t = sqrt((1 - a_t) / a_t), x = z_t / sqrt(a_t) (the UNet sees x / sqrt(sigma^2 + 1) = z_t,
at timestep t), and eps = (x - x0) / sigma_t.

A model Forge samples with a zero-terminal-SNR schedule (its file's ``ztsnr`` marker, or the setting
"Noise schedule for sampling" = "Zero Terminal SNR") gets the rescaled schedule here too: Forge sets
the rescaled sigmas on the KModel's predictor only while it samples, so masks do the same for their call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..sd.schedule import NoiseSchedule, rescale_zero_terminal_snr
from .base import Conditioning, UNetLayout, ldm_layout, wrapper_token_spans
from .family import LABELS, check_zero_shot_prediction, host_family, sd2_variant
from .sampling import sample_posterior

# The KModel predictions whose x0 the eps conversion reads.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_forge_model(sd_model) -> None:
    """Raise CheckpointError when Forge's loaded model is not a plain SD 1.x model."""
    if sd_model is None or getattr(sd_model, "forge_objects", None) is None:
        raise CheckpointError("no Stable Diffusion model is loaded; load a checkpoint first")
    family = host_family(sd_model, sd1_unless_told=False)
    if family not in ("sd-v1", "sd-v1-inpainting"):
        found = LABELS[family] if family != "unknown" else f"a {type(sd_model).__name__} model (not SD 1.x)"
        raise CheckpointError(f"the loaded model is {found}; LD-ZNet reads the features of SD 1.x "
                              "UNets (for zero-shot masks also of SD 2.x and SDXL-family ones)")
    if family == "sd-v1-inpainting":
        raise CheckpointError(f"the loaded model is {LABELS[family]}; LD-ZNet needs a plain "
                              "SD 1.x model: load the base model the inpainting model was made from")
    prediction = getattr(sd_model.forge_objects.unet.model.predictor, "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(f"the loaded model predicts {prediction!r}; LD-ZNet needs an eps-prediction SD 1.x model")


def check_forge_sd2_model(sd_model) -> None:
    """Raise CheckpointError unless Forge's loaded model is a text-to-image SD 2.x model whose own features
    zero-shot masks can read: a 4-channel UNet, eps or v prediction."""
    if sd_model is None or getattr(sd_model, "forge_objects", None) is None:
        raise CheckpointError("no Stable Diffusion model is loaded")
    family = host_family(sd_model, sd1_unless_told=False)
    if family != "sd2":
        raise CheckpointError(f"the loaded model is {LABELS[family]}, not SD 2.x")
    kmodel = sd_model.forge_objects.unet.model
    variant = sd2_variant(kmodel.diffusion_model.input_blocks[0][0].in_channels)
    if variant is not None:
        raise CheckpointError(f"the loaded model is {variant}; zero-shot masks need a text-to-image SD 2.x model: "
                              "load the SD 2.x model it was made from")
    check_zero_shot_prediction("the loaded model", getattr(kmodel.predictor, "prediction_type", "epsilon"),
                               PREDICTION_TYPES)


class ForgeBackbone:
    """The segmenter's Backbone over Forge's ``shared.sd_model``.

    ``load_model_gpu`` is ``backend.memory_management.load_model_gpu`` (injected so that tests run
    without Forge); ``zero_terminal_snr``: Forge samples this model with the rescaled schedule.
    """

    def __init__(self, sd_model, load_model_gpu: Callable[[object], object], zero_terminal_snr: bool = False):
        self.sd_model = sd_model
        self.patcher = sd_model.forge_objects.unet
        self.load_model_gpu = load_model_gpu
        alphas = self.patcher.model.predictor.alphas_cumprod.detach()
        self.zero_terminal_snr = zero_terminal_snr
        self.schedule = NoiseSchedule(rescale_zero_terminal_snr(alphas) if zero_terminal_snr else alphas)

    @property
    def unet(self) -> nn.Module:
        return self.patcher.model.diffusion_model

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)

    @property
    def dtype(self) -> torch.dtype:
        return self.patcher.model.computation_dtype

    @property
    def layout(self) -> UNetLayout:
        return ldm_layout(self.unet)

    @property
    def downsample_factor(self) -> int:
        return self.sd_model.forge_objects.vae.downscale_ratio

    def encode_image(self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """image [B, 3, H, W] in [-1, 1] -> scaled z (posterior mean unless ``sample``, never the global RNG)."""
        vae = self.sd_model.forge_objects.vae.clone()

        def regulation(posterior):
            return sample_posterior(posterior.mean, posterior.std, generator) if sample else posterior.mode()

        vae.patcher.model_options["model_vae_regulation"] = regulation
        with torch.inference_mode():
            z = vae.encode(image.movedim(1, -1) * 0.5 + 0.5)
            z = vae.first_stage_model.process_in(z)
        return z.clone().to(self.device)  # a normal tensor, not an inference-mode one

    def token_spans(self, prompts: Sequence[str]) -> list[tuple[int, int]]:
        """Each prompt's content tokens as Forge's text engine places them (its textual inversions)."""
        return wrapper_token_spans(self.text_engine(), prompts)

    def text_engine(self):
        """Forge's CLIP text engine, whose ``tokenize_line`` places a prompt's tokens (None if it has none)."""
        return getattr(self.sd_model, "text_processing_engine", None)

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """prompts -> context [B, 77k, 768] (SD 2.x: 1024) through Forge's text engine (emphasis, embeddings)."""
        with torch.inference_mode():
            context = self.sd_model.get_learned_conditioning(list(prompts))
        return Conditioning(context.clone())

    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """eps [B, 4, h, w] for z_t at integer timesteps t, through KModel.apply_model (sigma in, x0 out, for eps
        and v-prediction models alike)."""
        return self.eps_from_x0(z_t, t, c_crossattn=conditioning.context.to(self.device))

    @torch.no_grad()
    def eps_from_x0(self, z_t: Tensor, t: Tensor, **conditions: Tensor) -> Tensor:
        """eps for z_t at integer timesteps t from the KModel's x0 with ``conditions`` (its keyword
        inputs: ``c_crossattn``, ``y``, ...); the predictor turns any prediction type into x0."""
        self.load_model_gpu(self.patcher)
        a = self.schedule.alphas_at(t.to(self.device))
        sigma = ((1 - a) / a).sqrt()
        x = z_t.to(self.device, torch.float32) / a.sqrt()[:, None, None, None]
        with self._sampling_sigmas():
            denoised = self.patcher.model.apply_model(x, sigma, **conditions)
        return (x - denoised.float()) / sigma[:, None, None, None]

    @contextmanager
    def _sampling_sigmas(self) -> Iterator[None]:
        """The predictor maps sigma to the UNet's timestep through its table of sigmas: with zero terminal
        SNR the rescaled table for the block, as Forge sets it while it samples, then its own again."""
        if not self.zero_terminal_snr:
            yield
            return
        predictor = self.patcher.model.predictor
        sigmas = predictor.sigmas
        table = self.schedule.alphas_cumprod
        predictor.set_sigmas(((1 - table) / table).sqrt().to(sigmas.device))
        try:
            yield
        finally:
            predictor.set_sigmas(sigmas)
