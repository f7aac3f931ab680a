"""Model families, in one place: which kind of diffusion model a WebUI host has loaded (its flags)
and which kind a checkpoint file holds (its tensor names and shapes).

A family has a name (``CheckpointInfo.family``) and a label for messages. LD-ZNet reads SD 1.x UNet
features, so "sd-v1" is the family every backbone needs today; the others are named so that the
refusal says what was found. :func:`classify` needs only the shapes: a mapping of names to tensors,
meta tensors or shapes (a safetensors header read without its data) is classified alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import CheckpointError

T = TypeVar("T")

# The single-file (ldm) layout every WebUI reads.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

LABELS: dict[str, str] = {
    "sd-v1": "SD 1.x", "sd-v1-inpainting": "an inpainting model (9 input channels)", "sd2": "SD 2.x",
    "sdxl": "SDXL", "sd3": "SD 3", "ssd": "SSD-1B", "flux": "Flux", "unknown": "not SD 1.x",
    "instruct-pix2pix": "an instruct-pix2pix model (8 input channels)", "diffusers": "a diffusers-format file",
    "ldznet-head": "an LD-ZNet segmentation head", "ldznet-official": "the official LD-ZNet release",
    "vae": "a VAE", "sdxl-conditioned": "an SDXL inpainting or edit model", "sdxl-refiner": "an SDXL refiner",
    "sdxl-edm": "an SDXL model with the EDM noise schedule",
    "sd2-conditioned": "an SD 2.x inpainting, depth, upscaler or unCLIP model",
    "sd-v1-v-prediction": "an SD 1.x v-prediction model",
}
# The marker tensor of a v-prediction file (A1111's and Forge's convention, a scalar with no weight).
V_PREDICTION_KEY = "v_pred"
# Families of files that are parts of or add-ons to a model, never a model.
NOT_MODELS = ("ldznet-head", "ldznet-official", "vae", "lora", "embedding")
# Every VAE layout (ldm's, diffusers') has this tensor, and no whole checkpoint has it unprefixed.
VAE_FILE_KEY = "encoder.conv_in.weight"
# The flags A1111 and Forge set on their loaded model, most specific first.
_HOST_FLAGS = (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd3", "sd3"), ("is_ssd", "ssd"), ("is_flux", "flux"))
# Add-ons users keep beside their models, named only when every tensor is theirs (a model that carries a
# stray LoRA key stays a model). LoRA keys: kohya's "lora_unet_*" / "lora_te*_", PEFT's ".lora_A.",
# diffusers' ".lora.down."; LyCORIS's "lycoris_*" (LoHa "hada_w*", LoKr "lokr_w*").
_LORA_MARKS = ("lora_", ".lora.", "lycoris_", "hada_w", "lokr_w")
# Textual inversion: A1111's .safetensors "emb_params", its .pt "string_to_param", SDXL's "clip_l" / "clip_g".
_EMBEDDING_KEYS = ("emb_params", "string_to_param", "string_to_token", "clip_l", "clip_g")

# What marks an SDXL refiner (bigG alone, as the first embedder) and an SDXL-family model trained with the EDM
# noise schedule instead of SD's (CosXL's "edm_vpred.*", Playground v2.5's "edm_mean" / "edm_std": ComfyUI's markers).
_REFINER_TEXT = "conditioner.embedders.0.model."
_EDM_MARKS = ("edm_vpred.", "edm_mean", "edm_std")

# Key prefixes that name a family outright, checked in order after the LD-ZNet files.
_PREFIX_FAMILIES = (
    (("conditioner.embedders.",), "sdxl", "SDXL checkpoints serve zero-shot masks only"),
    ((UNET_PREFIX + "joint_blocks.", "joint_blocks."), "sd3",
     "SD 3 checkpoints (an MMDiT with joint blocks, no UNet) are not supported"),
    ((UNET_PREFIX + "double_blocks.", "double_blocks."), "flux",
     "Flux checkpoints (a transformer with double blocks, no UNet) are not supported"),
    (("down_blocks.", "unet.down_blocks.", "encoder.down_blocks."), "diffusers",
     "this is a diffusers-format file; use a single-file SD v1 checkpoint"),
    (("cond_stage_model.model.",), "sd2",
     "SD 2.x checkpoints (OpenCLIP text encoder, 1024-d context) serve zero-shot masks only"),
)


def checkpoint_part(state: Mapping[str, T], prefix: str) -> dict[str, T]:
    """The entries of ``state`` under ``prefix`` (one part of a single file: UNET_PREFIX, VAE_PREFIX,
    ...), keyed without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def host_family(sd_model, in_channels: int | None = None, sd1_unless_told: bool = True) -> str:
    """The family of a WebUI host's loaded model from its ``is_*`` flags and, where known, its
    UNet's input channels: a flagged family, "unknown" when the model says it is not SD 1.x
    (``is_sd1`` False; a host that sets no ``is_sd1`` is taken at ``sd1_unless_told``) or its UNet
    takes neither 4 nor 9 channels, "sd-v1-inpainting" (``is_inpaint`` or 9 channels), else "sd-v1"."""
    flagged = next((family for attr, family in _HOST_FLAGS if getattr(sd_model, attr, False)), None)
    if flagged is not None:
        return flagged
    if not getattr(sd_model, "is_sd1", sd1_unless_told):
        return "unknown"
    if getattr(sd_model, "is_inpaint", False) or in_channels == 9:
        return "sd-v1-inpainting"
    return "sd-v1" if in_channels in (None, 4) else "unknown"


def sd2_variant(in_channels: int, conditioning_key: str | None = None) -> str | None:
    """Which SD 2.x model conditioned on more than text a host's SD 2.x model is, for messages (None: a
    text-to-image one, 4 input channels). ``conditioning_key`` is ldm's (A1111; None where the host has
    none): "crossattn-adm" is unCLIP, "hybrid" / "concat" put an image or depth map beside the latent."""
    if conditioning_key == "crossattn-adm":
        return "an SD 2.x unCLIP model (conditioned on an image embedding)"
    if in_channels == 9:
        return "an SD 2.x inpainting model (9 input channels)"
    if in_channels == 5:
        return "an SD 2.x depth model (5 input channels: a depth map beside the latent)"
    if in_channels == 7:
        return "an SD 2.x x4 upscaler (7 input channels: the low-resolution image beside the latent)"
    if in_channels != 4 or conditioning_key not in (None, "crossattn"):
        return f"an SD 2.x model conditioned on more than text ({in_channels} input channels)"
    return None


def check_zero_shot_prediction(name: str, prediction: str, allowed: tuple[str, ...]) -> None:
    """CheckpointError unless a host model's ``prediction`` is one of ``allowed`` (the host's own names for
    eps and v, which zero-shot masks convert to eps); ``name`` is the model's, for the message."""
    if prediction not in allowed:
        raise CheckpointError(f"{name} predicts {prediction!r}; zero-shot masks need an eps- or v-prediction model")


@dataclass
class CheckpointInfo:
    """What a checkpoint file holds, as far as its keys and shapes tell."""

    family: str
    problem: str | None = None
    details: dict = field(default_factory=dict)


def _shape(value) -> tuple[int, ...]:
    """The shape of a tensor, a meta tensor or a shape given as such."""
    return tuple(getattr(value, "shape", value))


def classify(state: Mapping, metadata: Mapping | None = None) -> CheckpointInfo:
    """Name the model family of a state dict (names -> tensors or shapes); ``problem`` says why it is
    not a usable SD v1 model."""
    metadata = metadata or {}
    keys = state.keys()
    if "head" in metadata or any(k.startswith("final.") for k in keys):
        return CheckpointInfo("ldznet-head", "this is a segmentation head, not an SD model; pass it as the head")
    if any(k.startswith("sd_features_stage_model.") for k in keys):
        return CheckpointInfo("ldznet-official", "this is the official LD-ZNet release; import its head with "
                              "`ldznet convert FILE -o head.safetensors`")
    if VAE_FILE_KEY in keys:
        return CheckpointInfo("vae", "this is a VAE file, not an SD model; pass it as --vae beside the model")
    if keys and all(any(mark in k for mark in _LORA_MARKS) for k in keys):
        return CheckpointInfo("lora", "this is a LoRA (weights added to an SD model), not an SD model; pass the "
                              "model itself (masks are made without LoRAs)")
    if keys and all(k.split(".")[0] in _EMBEDDING_KEYS for k in keys):
        return CheckpointInfo("embedding", "this is a textual-inversion embedding, not an SD model; pass the model "
                              "itself")
    for prefixes, family, problem in _PREFIX_FAMILIES:
        if any(k.startswith(prefixes) for k in keys):
            return _zero_shot_variant(state, CheckpointInfo(family, problem))
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        wrapped = [k.removesuffix(UNET_PREFIX + "input_blocks.0.0.weight") for k in keys
                   if k.endswith("." + UNET_PREFIX + "input_blocks.0.0.weight")]
        found = (f"; its keys carry an extra prefix {wrapped[0]!r} (a wrapped model, e.g. saved from DDP): save it "
                 "without" if wrapped else f"; its keys start with {', '.join(_first_parts(keys))}")
        return CheckpointInfo("unknown", f"no UNet found (no '{UNET_PREFIX}input_blocks.0.0.weight'){found}")
    shape = _shape(conv_in)
    if len(shape) != 4 or 0 in shape:
        return CheckpointInfo("unknown", f"'{UNET_PREFIX}input_blocks.0.0.weight' has shape {shape}; "
                              "expected a convolution weight [out, in, k, k]")
    return _classify_unet(state, shape[1], shape[0])


def _zero_shot_variant(state: Mapping, info: CheckpointInfo) -> CheckpointInfo:
    """``info`` of an SDXL or SD 2.x file, or the family of a model of that kind zero-shot masks cannot
    use either (so that no message sends its user to --zero-shot): a UNet conditioned on more than the
    latent (inpainting, depth, edit), an SDXL refiner, an SDXL-family model of the EDM noise schedule."""
    if info.family not in ("sdxl", "sd2"):
        return info
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    in_channels = _shape(conv_in)[1] if conv_in is not None and len(_shape(conv_in)) == 4 else 4
    keys = state.keys()
    if info.family == "sd2":  # unCLIP's image embedding enters where SDXL's size conditioning does: label_emb
        unclip = any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys)
        variant = sd2_variant(in_channels, "crossattn-adm" if unclip else None)
        if variant:
            return CheckpointInfo("sd2-conditioned", f"{variant}; use the base model it was made from", info.details)
    elif in_channels != 4:
        return CheckpointInfo("sdxl-conditioned", f"the SDXL UNet takes {in_channels} input channels, not 4 (an "
                              "inpainting, instruct-pix2pix or edit model); use the base model it was made from",
                              info.details)
    if info.family == "sdxl" and any(k.startswith(_REFINER_TEXT) for k in keys):
        return CheckpointInfo("sdxl-refiner", "an SDXL refiner (one text encoder, OpenCLIP bigG, and aesthetic-score "
                              "conditioning); refiners are not supported: use the SDXL base model or a fine-tune of it",
                              info.details)
    marks = sorted({mark for k in keys for mark in _EDM_MARKS if k.startswith(mark)})
    if info.family == "sdxl" and marks:
        return CheckpointInfo("sdxl-edm", f"trained with the EDM noise schedule, not SD's (its {', '.join(marks)} "
                              "tensors: CosXL, Playground v2.5 and the like), which zero-shot masks do not model",
                              info.details)
    return info


def _first_parts(keys: Iterable[str], most: int = 4) -> list[str]:
    """The commonest first key components, as 'module.*', for a message about a file of unknown layout."""
    counts = Counter(key.split(".", 1)[0] for key in keys)
    return [f"'{part}.*'" for part, _ in counts.most_common(most)]


def _classify_unet(state: Mapping, in_channels: int, model_channels: int) -> CheckpointInfo:
    """The family of a single file with an ldm UNet of ``in_channels`` x ``model_channels``."""
    details = {"unet_in_channels": in_channels, "model_channels": model_channels}
    # Tensors of other ranks are left to the strict load, which names them.
    context = [s[1] for k, v in state.items()
               if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and len(s := _shape(v)) == 2]
    if context:
        details["context_dim"] = context[0]
    if UNET_PREFIX + "label_emb.0.0.weight" in state or (context and context[0] == 2048):
        return _zero_shot_variant(state, CheckpointInfo(
            "sdxl", "the UNet has SDXL's pooled-text and size conditioning (label_emb) or 2048-d text context; SDXL "
            "checkpoints serve zero-shot masks only", details))
    if in_channels == 9:
        return CheckpointInfo("sd-v1-inpainting", "inpainting UNets (9 input channels) are not supported; "
                              "use the base model the inpainting model was made from", details)
    if in_channels == 8:
        return CheckpointInfo("instruct-pix2pix", "the UNet takes 8 input channels, not 4 "
                              "(an instruct-pix2pix UNet, conditioned on an image)", details)
    if in_channels != 4:
        return CheckpointInfo("unknown", f"the UNet takes {in_channels} input channels, not 4 "
                              "(an instruct-pix2pix or other conditioned UNet?)", details)
    if context and context[0] == 1024:
        return CheckpointInfo("sd2", "the UNet's text context is 1024-d (SD 2.x); SD 2.x checkpoints serve zero-shot "
                              "masks only", details)
    proj_in = state.get(UNET_PREFIX + "middle_block.1.proj_in.weight")
    if proj_in is not None and len(_shape(proj_in)) != 4:
        return CheckpointInfo("unknown", "the UNet's transformers use linear projections (an SD 2.x-style UNet)",
                              details)
    text_width = [s[1] for k, v in state.items() if k.startswith(TEXT_PREFIX)
                  and k.endswith("token_embedding.weight") and len(s := _shape(v)) == 2]
    if context and text_width and text_width[0] != context[0]:
        return CheckpointInfo("unknown", f"mismatched parts: the text encoder is {text_width[0]}-d "
                              f"but the UNet expects a {context[0]}-d context", details)
    if V_PREDICTION_KEY in state:  # read as eps, its masks would be wrong with no error
        return CheckpointInfo("sd-v1-v-prediction", "an SD 1.x v-prediction model; LD-ZNet heads and the zero-shot "
                              "score read an eps-prediction SD 1.x model: use the eps model it was fine-tuned from",
                              details)
    return CheckpointInfo("sd-v1", missing_parts(state, {"VAE": VAE_PREFIX, "text encoder": TEXT_PREFIX}), details)


def missing_parts(state: Mapping, parts: Mapping[str, str]) -> str | None:
    """What a file lacks of ``parts`` (name -> key prefix) and what to do, as one problem; None when it has
    them all. A file without its VAE alone takes one with --vae."""
    missing = [(name, prefix) for name, prefix in parts.items() if not any(k.startswith(prefix) for k in state)]
    if not missing:
        return None
    fix = ("give the VAE it was published with as --vae VAE.safetensors" if [p for _, p in missing] == [VAE_PREFIX]
           else "a full single-file checkpoint is needed")
    listed = " and no ".join(f"{name} ('{prefix}*')" for name, prefix in missing)
    return f"the file has no {listed}; {fix}"


VAE_MISSING = missing_parts({}, {"VAE": VAE_PREFIX})
"""The problem of a file that lacks its VAE alone, which ``--vae`` supplies where a VAE file may replace it."""
