"""Backbone adapter over a diffusers pipeline a script already holds (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, their img2img and inpainting variants with a 4-channel UNet): masks
from the loaded model, with no second copy and no import of diffusers.

Every call goes through the pipeline's own parts, so what a generation of the script sees is what
the mask sees: ``vae.encode`` (the posterior's mean, times ``vae.config.scaling_factor``),
``encode_prompt`` (its tokenizers and text encoders, with the LoRAs and textual inversions loaded
into them), ``unet`` (a ``UNet2DConditionModel``; SDXL's pooled text and, as the host
adapters do, the size ids of an uncropped image of the latent's size) and the scheduler's
``alphas_cumprod``. A v-prediction model's output (``scheduler.config.prediction_type``) is
converted to eps. The UNet's spatial transformers (``down_blocks[i].attentions``, ``mid_block``,
``up_blocks[i].attentions``) run in the order of an ldm UNet's, so block numbers, the blocks a head
taps and the zero-shot scales mean the same as on a single file. Nothing is changed on the pipeline;
the calls run eagerly (no captured CUDA graphs), and the UNet's device is the pipeline's execution
device, so ``enable_model_cpu_offload`` keeps working.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..images import type_name
from ..sd.diffusers_folder import diffusers_unet_config, unet_config_family, unet_config_problem
from ..sd.schedule import NUM_TIMESTEPS, NoiseSchedule, v_to_eps
from ..sd.sdxl import working_sizes
from ..sd.tokenizer import content_span
from ..sd.unet import UNetConfig
from .base import LDZNET_BLOCKS, Conditioning, TransformerSite, UNetLayout
from .family import LABELS
from .sampling import sample_posterior

_PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' names for eps and v, the two that convert to eps
# The text parts encode_prompt reads, by family.
_TEXT_PARTS = {"sd-v1": ("tokenizer", "text_encoder"), "sd2": ("tokenizer", "text_encoder"),
               "sdxl": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}


def unwrapped(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``_orig_mod``), or ``module`` itself."""
    return getattr(module, "_orig_mod", module)


def pipeline_family(pipe) -> str:
    """The family of a diffusers pipeline's model ("sd-v1", "sd2" or "sdxl"); CheckpointError saying what it
    is instead and what to do, for a pipeline whose model LD-ZNet cannot read."""
    kind = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    if getattr(pipe, "transformer", None) is not None and unet is None:
        raise CheckpointError(f"{kind} has a transformer, no UNet (Flux, SD 3 and the like); LD-ZNet reads the spatial "
                              "transformers of SD 1.x, SD 2.x and SDXL-family UNets: make masks with such a model "
                              "(load_segmenter(FILE))")
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise CheckpointError(f"expected a diffusers Stable Diffusion pipeline (pipe.unet, pipe.encode_prompt), got "
                              f"{type_name(pipe)}; for a model file or folder use load_segmenter(PATH)")
    base = unwrapped(unet)
    if not any(cls.__name__ == "UNet2DConditionModel" for cls in type(base).__mro__):
        raise CheckpointError(f"{kind}'s unet is {type_name(base)}, not a diffusers UNet2DConditionModel")
    config = base.config
    problem = unet_config_problem(config)
    if problem:
        raise CheckpointError(f"{kind}'s UNet {problem}")
    check_text_only(unet, kind)
    family = unet_config_family(config)
    missing = [name for name in ("vae", "scheduler", *_TEXT_PARTS[family]) if getattr(pipe, name, None) is None]
    if missing:
        refiner = " (an SDXL refiner?)" if family == "sdxl" and "text_encoder" in missing else ""
        raise CheckpointError(f"{kind} has no {', '.join(missing)}{refiner}; masks need every part of an SD 1.x, "
                              "SD 2.x or SDXL base-family pipeline")
    vae_config = pipe.vae.config
    if vae_config.get("latents_mean") is not None or vae_config.get("shift_factor") is not None:
        raise CheckpointError(f"{kind}'s VAE has latent statistics beyond SD's scale factor (Playground v2.5 and "
                              "the like, trained with the EDM schedule), which LD-ZNet does not model")
    check_scheduler(pipe.scheduler, family, kind)
    return family


def check_scheduler(scheduler, family: str, kind: str) -> None:
    """CheckpointError unless ``scheduler`` holds an SD noise schedule (``alphas_cumprod`` of NUM_TIMESTEPS steps)
    and predicts what ``family`` may (SD 1.x eps; SD 2.x and SDXL eps or v); ``kind`` names the pipeline."""
    table = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(table, Tensor) or table.shape != (NUM_TIMESTEPS,):
        raise CheckpointError(f"{kind}'s scheduler ({type(scheduler).__name__}) has no alphas_cumprod table of "
                              f"{NUM_TIMESTEPS} steps (an EDM or flow-matching schedule?); set an SD scheduler such as "
                              "DDIMScheduler")
    prediction = getattr(scheduler, "config", {}).get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS or (family == "sd-v1" and prediction != "epsilon"):
        raise CheckpointError(f"{kind} predicts {prediction!r}; LD-ZNet reads eps-prediction SD 1.x models and eps- "
                              f"or v-prediction SD 2.x and SDXL-family ones ({LABELS[family]} here)")


def check_text_only(unet: nn.Module, kind: str) -> None:
    """CheckpointError when ``unet`` is conditioned on an image beside the text (an IP-Adapter loaded into it,
    ``encoder_hid_proj``), which the masks' calls do not give it; ``kind`` names the pipeline."""
    unet = unwrapped(unet)
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise CheckpointError(f"{kind}'s UNet is conditioned on an image beside the text "
                              f"({unet.config.get('encoder_hid_dim_type')}: an IP-Adapter?); masks read it conditioned "
                              "on text alone: call pipe.unload_ip_adapter() first")


def base_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A UNet's own weights without the LoRA layers peft wraps around its layers (``x.base_layer.weight``
    is ``x.weight``; ``x.lora_A...`` are the LoRA's)."""
    return {name.replace(".base_layer.", "."): value for name, value in state.items() if ".lora_" not in name}


def diffusers_layout(unet: nn.Module, tapped: tuple[int, ...] = LDZNET_BLOCKS) -> UNetLayout:
    """The spatial transformers of a diffusers ``UNet2DConditionModel`` in execution order: each down
    level's, the middle's, each up level's (the deepest first), which is the order of an ldm UNet's."""
    unet = unwrapped(unet)
    levels = len(unet.down_blocks)
    parts = [(f"down_blocks.{i}", block, i) for i, block in enumerate(unet.down_blocks)]
    parts.append(("mid_block", unet.mid_block, levels - 1))
    parts += [(f"up_blocks.{i}", block, levels - 1 - i) for i, block in enumerate(unet.up_blocks)]
    sites = []
    for name, block, level in parts:
        for index, transformer in enumerate(getattr(block, "attentions", None) or ()):
            first = transformer.transformer_blocks[0]
            sites.append(TransformerSite(f"{name}.attentions.{index}", transformer, first.attn2, 2 ** level,
                                         first.attn1))
    return UNetLayout(unet, tuple(sites), tapped)


def _read_scheduler(scheduler) -> tuple[NoiseSchedule, bool]:
    """(the noise schedule, whether the model predicts v) of a scheduler :func:`check_scheduler` passed."""
    return (NoiseSchedule(scheduler.alphas_cumprod.detach()),
            scheduler.config.get("prediction_type", "epsilon") == "v_prediction")


class DiffusersBackbone:
    """The segmenter's Backbone over a diffusers Stable Diffusion pipeline (module docstring);
    CheckpointError for a pipeline whose model it cannot read (:func:`pipeline_family`)."""

    def __init__(self, pipe):
        self.family = pipeline_family(pipe)
        self.pipe = pipe
        self.kind = type(pipe).__name__
        self.layout = diffusers_layout(pipe.unet)
        # pipeline_family checked this scheduler; _schedule checks and reads a replacement
        self._scheduler, self._read = pipe.scheduler, _read_scheduler(pipe.scheduler)

    @property
    def unet(self) -> nn.Module:
        return self._current_unet()

    def _current_unet(self) -> nn.Module:
        """The pipeline's UNet: the one the layout was read from (CheckpointError once it is replaced), with
        weights somewhere (a UNet moved to the meta device has none, unless offloading hooks bring them)."""
        unet = self.pipe.unet
        if unet is None or unwrapped(unet) is not self.layout.unet:
            raise CheckpointError(f"the {self.kind}'s UNet was replaced after the segmenter was made; make a new one "
                                  "with segmenter_from_pipeline(pipe)")
        if next(unet.parameters()).is_meta and not any(hasattr(m, "_hf_hook") for m in unet.modules()):
            raise CheckpointError(f"the {self.kind}'s UNet is on the meta device (no weights); load its weights first")
        return unet

    @property
    def schedule(self) -> NoiseSchedule:
        """The pipeline's current scheduler's noise schedule (read again when the scheduler is replaced)."""
        return self._schedule()[0]

    def _schedule(self) -> tuple[NoiseSchedule, bool]:
        """(schedule, whether the model predicts v) of the pipeline's current scheduler."""
        scheduler = self.pipe.scheduler
        if scheduler is not self._scheduler:
            check_scheduler(scheduler, self.family, self.kind)
            self._scheduler, self._read = scheduler, _read_scheduler(scheduler)
        return self._read

    @functools.cached_property
    def unet_config(self) -> UNetConfig:
        """The UNet's configuration in our terms, for the head-fits check (heads only: zero-shot masks also
        serve UNets whose shapes our UNetConfig cannot describe, such as SSD-1B's)."""
        unet = unwrapped(self.pipe.unet)
        return diffusers_unet_config(base_weights(unet.state_dict()), unet.config, f"{self.kind}.unet")

    @property
    def device(self) -> torch.device:
        # With enable_model_cpu_offload the UNet rests on the CPU and runs on this device.
        return torch.device(getattr(self.pipe, "_execution_device", None) or self.pipe.unet.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def token_spans(self, prompts: Sequence[str]) -> list[tuple[int, int]]:
        """For each prompt, the [start, stop) positions of its content tokens as ``encode_prompt`` tokenises it:
        with the pipeline's tokenizer, after its textual inversions' tokens are expanded."""
        tokenizer = self.pipe.tokenizer
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        spans = []
        for prompt in prompts:
            text = convert(prompt, tokenizer) if convert is not None else prompt
            ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
            spans.append(content_span(ids, tokenizer.bos_token_id, tokenizer.eos_token_id))
        return spans

    @torch.no_grad()
    def encode_image(self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """image [B, 3, H, W] in [-1, 1] -> z [B, 4, H/8, W/8] times the VAE's scaling factor (the posterior's
        mean unless ``sample``); CheckpointError for NaN/inf latents (an fp16 VAE that overflows)."""
        vae = self.pipe.vae
        posterior = vae.encode(image.to(self.device, vae.dtype)).latent_dist
        z = sample_posterior(posterior.mean, posterior.std, generator) if sample else posterior.mean
        if not bool(torch.isfinite(z).all()):
            if vae.dtype == torch.float32:
                hint = "its weights may be corrupt"
            else:
                upcast = ", as its config's force_upcast says" if vae.config.get("force_upcast") else ""
                hint = (f"it overflows in {str(vae.dtype).removeprefix('torch.')}{upcast}: set "
                        "pipe.vae.to(torch.float32) or use an fp16-fixed VAE")
            raise CheckpointError(f"the {self.kind}'s VAE produced NaN/inf latents; {hint}")
        return (z.float() * vae.config.scaling_factor).to(self.device)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """prompts -> the pipeline's ``encode_prompt`` context [B, 77, D] (and SDXL's pooled text [B, 1280])."""
        encoded = self.pipe.encode_prompt(prompt=list(prompts), device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        return Conditioning(encoded[0], encoded[2] if self.family == "sdxl" else None)

    @torch.no_grad()
    def predict_noise(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """eps [B, 4, h, w] from the UNet (a v-prediction model's v converted)."""
        unet = self._current_unet()
        check_text_only(unet, self.kind)  # an IP-Adapter may have been loaded since
        schedule, v_prediction = self._schedule()
        z_t, t = z_t.to(self.device), t.to(self.device)
        extra = {}
        if self.family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": conditioning.pooled.to(self.device, unet.dtype),
                                          "time_ids": working_sizes(z_t, self.downsample_factor).to(unet.dtype)}
        out = unet(z_t.to(unet.dtype), t, encoder_hidden_states=conditioning.context.to(self.device, unet.dtype),
                   return_dict=False, **extra)[0]
        return v_to_eps(out, z_t, schedule, t) if v_prediction else out
