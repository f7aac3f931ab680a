"""Single-file SD checkpoints (the format WebUI users have): recognise, load, save.

Layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.*`` (CLIP text encoder); SDXL files hold their two text encoders under
``conditioner.embedders.0.transformer.*`` (CLIP ViT-L) and ``conditioner.embedders.1.model.*``
(OpenCLIP bigG), SD 2.x files their OpenCLIP ViT-H under ``cond_stage_model.model.*``. The
architecture is read from the tensor shapes, so models of any width load. SD v1 serves heads and
zero-shot masks, the SDXL family and SD 2.x zero-shot masks only; other families (inpainting UNets,
LD-ZNet files, ...) are recognised (``backbones.family.classify``) and refused with an error that
says what they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..backbones.family import (TEXT_PREFIX, UNET_PREFIX, V_PREDICTION_KEY, VAE_PREFIX, CheckpointInfo,
                               checkpoint_part, classify, missing_parts)
from ..checkpoint_io import (parse_config, path_argument, read_metadata, read_state_dict, read_tensor_shapes,
                             read_tensors, write_safetensors)
from ..devices import resolve_device
from ..errors import CheckpointError, LdznetError
from ..limits import RESOLUTION
from ..precision import as_dtype
from ..words import is_vocabulary_word
from .model import StableDiffusion
from .openclip import OpenCLIPTextEncoder, registered_layers, tower_fields, tower_layers
from .parts import check_parts, trim_for_masks
from .schedule import NUM_TIMESTEPS, NoiseSchedule, alphas_cumprod, rescale_zero_terminal_snr
from .sd2 import OpenCLIPContext, StableDiffusion2, context_blocks, predicts_v
from .sdxl import SDXLConditioner, StableDiffusionXL
from .text import TextEncoder, normalize_text_state_dict, text_config
from .tokenizer import MAX_LENGTH, VOCAB_SIZE
from .unet import UNetConfig, UNetModel, unet_config
from .vae import AutoencoderKL, VAEConfig, conv_attention_weights, vae_config

SUPPORTED = ("SD v1.x single-file checkpoints (UNet with 4 input channels, CLIP text encoder, 768-d context); "
             "SDXL-family and SD 2.x ones for zero-shot masks")


def zero_shot_only(label: str) -> str:
    """Why a head cannot run on a model of the family ``label``, and what to do instead."""
    return (f"an LD-ZNet head reads SD 1.x UNet features, which an {label} model does not have; make masks with "
            "this model zero-shot (--zero-shot), or keep it and run the head on an SD 1.x checkpoint "
            "(--mask-model SD1.safetensors)")


SDXL_FOR_ZERO_SHOT_ONLY = zero_shot_only("SDXL-family")
SD2_FOR_ZERO_SHOT_ONLY = zero_shot_only("SD 2.x")
# Families whose files serve zero-shot masks but no head.
ZERO_SHOT_ONLY = {"sdxl": SDXL_FOR_ZERO_SHOT_ONLY, "sd2": SD2_FOR_ZERO_SHOT_ONLY}
SD2_TEXT_PREFIX = "cond_stage_model.model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."
# Beside the v-prediction marker (family.V_PREDICTION_KEY), v-prediction SDXL fine-tunes may carry this one
# (Forge reads it): a noise schedule rescaled to zero terminal SNR.
ZERO_TERMINAL_SNR_KEY = "ztsnr"
SGM_HEAD_CHANNELS = 64  # head width of every sgm UNet with linear transformer projections (SD 2.x, SDXL)
_TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings")
MAX_VOCABULARY = 10_000  # words an SD file's 'ldznet.vocabulary' may list: a closed world's, not a language's


def _indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k))})


def _dim(state: Mapping[str, Tensor], key: str, axis: int) -> int:
    """Size of ``axis`` of tensor ``key`` (KeyError when absent); CheckpointError naming the tensor
    when that axis is missing or empty."""
    shape = tuple(state[key].shape)
    if len(shape) <= axis or shape[axis] == 0:
        raise CheckpointError(f"tensor '{key}' has shape {shape}; expected a non-empty axis {axis}")
    return shape[axis]


def unet_config_from_state_dict(state: Mapping[str, Tensor], num_heads: int = 8) -> UNetConfig:
    """Recover an ldm UNet's configuration from its tensors (prefix removed). Heads are not visible
    in the weights: SD v1 uses 8; sgm UNets (linear projections, a depth per level or ``label_emb``:
    SD 2.x, SDXL) use heads of 64 channels."""
    model_channels = _dim(state, "input_blocks.0.0.weight", 0)
    channel_mult, attention_levels, res_per_level, level_depths = [], [], [], []
    level_blocks = 0
    for i in _indices(state, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:
            res_per_level.append(level_blocks)
            level_blocks = 0
            continue
        level = len(res_per_level)
        if level_blocks == 0:
            channel_mult.append(_dim(state, f"input_blocks.{i}.0.out_layers.3.weight", 0) // model_channels)
            if f"input_blocks.{i}.1.proj_in.weight" in state:
                attention_levels.append(level)
            level_depths.append(len(_indices(state, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")))
        level_blocks += 1
    res_per_level.append(level_blocks)
    if len(set(res_per_level)) != 1:
        raise CheckpointError(f"unsupported UNet: res blocks per level differ ({res_per_level})")
    context_dim = _dim(state, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 1)
    depth = len(_indices(state, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    last = len(channel_mult) - 1
    if last not in attention_levels:  # SD 2.x: no attention at the last level, whose depth is the middle block's
        level_depths[last] = depth
    elif level_depths[last] != depth:
        raise CheckpointError(f"unsupported UNet: the middle block's transformers are {depth} deep, those of the "
                              f"last level {level_depths[last]}")
    _check_even_depths(state, level_depths, res_per_level[0])
    in_channels, out_channels = _dim(state, "input_blocks.0.0.weight", 1), _dim(state, "out.2.weight", 0)
    config = UNetConfig(in_channels=in_channels, out_channels=out_channels,
                        model_channels=model_channels, channel_mult=tuple(channel_mult),
                        num_res_blocks=res_per_level[0], attention_levels=tuple(attention_levels),
                        num_heads=num_heads, context_dim=context_dim, transformer_depth=depth)
    linear = len(state["middle_block.1.proj_in.weight"].shape) == 2
    adm_in_channels = _dim(state, "label_emb.0.0.weight", 1) if "label_emb.0.0.weight" in state else 0
    if not (linear or adm_in_channels or {level_depths[level] for level in attention_levels} != {depth}):
        return config
    return dataclasses.replace(config, transformer_depth=1, level_depths=tuple(level_depths),
                               num_head_channels=SGM_HEAD_CHANNELS, linear_projection=linear,
                               adm_in_channels=adm_in_channels)


def _check_even_depths(state: Mapping[str, Tensor], level_depths: list[int], num_res_blocks: int) -> None:
    """CheckpointError for a UNet whose transformer depth varies within a level (distilled SDXL models such
    as SSD-1B and Vega): the ldm UNet gives every transformer of a level one depth."""
    last = len(level_depths) - 1
    for part in ("input_blocks", "output_blocks"):
        for i in _indices(state, rf"{part}\.(\d+)\."):
            depth = len(_indices(state, rf"{part}\.{i}\.1\.transformer_blocks\.(\d+)\."))
            # input block 0 is conv_in, then num_res_blocks + a downsample per level; output blocks
            # num_res_blocks + 1 per level, from the last level up
            level = (i - 1) // (num_res_blocks + 1) if part == "input_blocks" else last - i // (num_res_blocks + 1)
            if depth and depth != level_depths[level]:
                raise CheckpointError(f"unsupported UNet: the transformers of {part}.{i} are {depth} deep, the first "
                                      f"of its level {level_depths[level]} (a distilled SDXL such as SSD-1B or Vega?); "
                                      "only UNets with one depth per level load")


def text_fields(state: Mapping[str, Tensor], claimed: Mapping[str, int]) -> dict[str, int]:
    """The ``CLIPTextConfig`` fields of a CLIP text tower (``state``: its tensors, one part of a file, as
    ``normalize_text_state_dict`` gives them) from its shapes, with the fields the file's metadata
    ``claimed`` ('ldznet.text'); CheckpointError when a claim contradicts the weights."""
    try:
        hidden = _dim(state, "text_model.embeddings.token_embedding.weight", 1)
        shown = {
            "vocab_size": _dim(state, "text_model.embeddings.token_embedding.weight", 0),
            "hidden_size": hidden,
            "intermediate_size": _dim(state, "text_model.encoder.layers.0.mlp.fc1.weight", 0),
            "num_hidden_layers": len(_indices(state, r"text_model\.encoder\.layers\.(\d+)\.")),
            "max_position_embeddings": _dim(state, "text_model.embeddings.position_embedding.weight", 0),
        }
    except KeyError as error:
        raise CheckpointError(f"the text encoder has no '{error.args[0]}' tensor") from error
    # The encoder is built for real, not on the meta device: sizes the metadata claims beyond the weights
    # would be allocated before the weights are found not to fit.
    _check_text_claims(shown, claimed)
    fields = {**shown, "num_attention_heads": max(1, hidden // 64), **claimed}
    check_text_sizes(fields["vocab_size"], fields["max_position_embeddings"], hidden, fields["num_attention_heads"])
    return fields


def _check_text_claims(shown: Mapping[str, int], claimed: Mapping[str, int]) -> None:
    """CheckpointError when a field the file's metadata ``claimed`` ('ldznet.text') is not what the weights
    show (``shown``: the fields their shapes tell)."""
    for name, value in claimed.items():
        if name in shown and value != shown[name]:
            raise CheckpointError(f"field 'ldznet.text', key '{name}' is {value}; the weights have {shown[name]}")


def _text_encoder_from_state_dict(state: Mapping[str, Tensor], claimed: Mapping[str, int]) -> TextEncoder:
    state = normalize_text_state_dict(state)
    config = text_config("sd-v1")
    for name, value in text_fields(state, claimed).items():
        setattr(config, name, value)
    encoder = TextEncoder.from_config(config)
    encoder.load_text_state_dict(state)
    return encoder


def check_text_sizes(vocab: int, positions: int, width: int, heads: int) -> None:
    """CheckpointError unless a text encoder of these sizes can encode what CLIP's tokenizer makes
    (``MAX_LENGTH`` ids below ``VOCAB_SIZE``); otherwise the first prompt would fail inside torch."""
    if width % heads:
        raise CheckpointError(f"the text encoder's {heads} attention heads do not divide its width {width}")
    if positions < MAX_LENGTH:
        raise CheckpointError(f"the text encoder has {positions} positions; CLIP's tokenizer makes prompts of "
                              f"{MAX_LENGTH} tokens")
    if vocab < VOCAB_SIZE:
        raise CheckpointError(f"the text encoder has {vocab} token embeddings; CLIP's tokenizer needs {VOCAB_SIZE}")


class SDMetadata(NamedTuple):
    """What an SD file's ``ldznet.*`` metadata may say (None or {} where it says nothing)."""

    unet: UNetConfig | None
    text: dict[str, int]
    resolution: int | None
    vocabulary: frozenset[str] | None


def parse_sd_metadata(metadata: Mapping, name: str) -> SDMetadata:
    """Check the 'ldznet.unet', 'ldznet.text', 'ldznet.resolution' and 'ldznet.vocabulary' fields of SD
    file ``name``; CheckpointError naming the file and field for a value of the wrong kind."""
    unet = parse_config(UNetConfig, metadata["unet"], f"{name}: field 'ldznet.unet'") if "unet" in metadata else None
    text = metadata.get("text", {})
    if not isinstance(text, dict) or any(k not in _TEXT_FIELDS or type(v) is not int or v < 1 for k, v in text.items()):
        raise CheckpointError(f"{name}: field 'ldznet.text' is {json.dumps(text)[:80]}; expected a JSON object of "
                              f"integers >= 1 with keys among {', '.join(_TEXT_FIELDS)}")
    resolution = metadata.get("resolution")
    if resolution is not None and not RESOLUTION.accepts(resolution):  # the working sides a mask may take
        raise CheckpointError(f"{name}: field 'ldznet.resolution' is {json.dumps(resolution)[:80]}; "
                              f"expected an integer from {RESOLUTION.low} to {RESOLUTION.high} (pixels)")
    return SDMetadata(unet, text, resolution, _vocabulary(metadata.get("vocabulary"), name))


def _vocabulary(words: Any, name: str) -> frozenset[str] | None:
    """'ldznet.vocabulary': the words a closed-world model was trained to name (a JSON list of
    lower-case words), or None where the file has no such list."""
    if words is None:
        return None
    if not (isinstance(words, list) and 0 < len(words) <= MAX_VOCABULARY
            and all(is_vocabulary_word(w) for w in words)):
        raise CheckpointError(f"{name}: field 'ldznet.vocabulary' is {json.dumps(words)[:80]}; expected a JSON list "
                              f"of 1 to {MAX_VOCABULARY} lower-case words")
    return frozenset(words)


def _read_missing(state: dict[str, Tensor], names: list[str], read: Callable[[list[str]], dict[str, Tensor]] | None,
                  ) -> None:
    """Replace the meta (shape-only) tensors among ``names`` in ``state`` by the real ones from ``read``;
    CheckpointError when one of those tensors is not floating point (:func:`check_float_weights`)."""
    wanted = [k for k in names if k in state and state[k].is_meta]
    if wanted:
        if read is None:
            raise ValueError("the state dict holds tensors without data and no reader was given")
        state.update(read(wanted))
    check_float_weights({k: state[k] for k in names if k in state})


# Where a single file keeps model weights; integer tensors elsewhere (position_ids, EMA counters) are fine.
_WEIGHT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.", "alphas_cumprod")


def check_float_weights(state: Mapping[str, Tensor]) -> None:
    """CheckpointError naming the first model weight of ``state`` that is not floating point: an
    integer-quantized file (int8 weights with scales) would otherwise fail deep inside torch."""
    for key, value in state.items():
        if key.startswith(_WEIGHT_PREFIXES) and not key.endswith("position_ids") and not value.is_floating_point():
            raise CheckpointError(f"tensor '{key}' is {str(value.dtype).removeprefix('torch.')}; expected "
                                  "floating-point weights (fp32, fp16, bf16 or fp8)")


def with_vae(state: Mapping[str, Any], vae: Mapping[str, Any]) -> dict[str, Any]:
    """A single-file state dict (tensors, meta tensors or shapes) with its VAE replaced by ``vae`` (the same
    kind of values, ldm layout, no prefix: ``vae_file.read_vae_file``), or given one where it had none."""
    merged = {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}
    merged.update({VAE_PREFIX + k: v for k, v in vae.items()})
    return merged


def check_family(info: CheckpointInfo, name: str, zero_shot: bool, parts: str = "all") -> None:
    """CheckpointError naming the file ``name``, its family and what to do, unless a model of that family
    serves this use (``zero_shot``: masks without a head; ``parts``: see :mod:`.parts`)."""
    if info.family in ZERO_SHOT_ONLY and not (zero_shot and parts == "all"):
        raise CheckpointError(f"{name}: {info.family}: {ZERO_SHOT_ONLY[info.family]}. Supported: {SUPPORTED}.")
    if info.problem and info.family not in ZERO_SHOT_ONLY:
        raise CheckpointError(f"{name}: {info.family}: {info.problem}. Supported: {SUPPORTED}.")


def stable_diffusion_from_state_dict(state: Mapping[str, Tensor], metadata: Mapping | None = None,
                                     name: str = "checkpoint", parts: str = "all",
                                     read: Callable[[list[str]], dict[str, Tensor]] | None = None,
                                     dtype: torch.dtype = torch.float32, zero_shot: bool = False) -> StableDiffusion:
    """Build an SD model in ``dtype`` from a single-file state dict: SD v1, or with ``zero_shot`` (the
    model is for zero-shot masks, no head) also the SDXL family and SD 2.x; CheckpointError for
    anything else.

    ``parts="mask"`` builds only what a segmentation head reads (see :mod:`.parts`). ``state`` may hold
    meta tensors (shapes only, e.g. from a safetensors header): ``read(names)`` then returns the real
    tensors of the names that are loaded, and the others are never read.
    """
    check_parts(parts)
    metadata = metadata or {}
    state = dict(state)
    info = classify(state, metadata)
    check_family(info, name, zero_shot, parts)
    described = parse_sd_metadata(metadata, name)
    if info.family in ZERO_SHOT_ONLY:
        build = sd2_from_state_dict if info.family == "sd2" else sdxl_from_state_dict

        def read_and_build() -> StableDiffusion:
            _read_missing(state, list(state), read)  # inside _guarded: its refusals name the file
            return build(state, described, dtype)

        return _guarded(name, "SD 2.x" if info.family == "sd2" else "SDXL", read_and_build)
    return _guarded(name, "SD v1", lambda: _sd_v1_from_state_dict(state, described, parts, read, dtype))


def _guarded(name: str, family: str, build: Callable[[], StableDiffusion]) -> StableDiffusion:
    """``build()``, its failures as CheckpointError naming the file ``name``."""
    try:
        return build()
    except LdznetError as error:  # named once: the reader's own errors (a truncated file) name it already
        raise CheckpointError(str(error) if str(error).startswith(f"{name}: ") else f"{name}: {error}") from error
    # The architecture comes from the file's shapes and metadata: a crafted one can fail anywhere
    # in the constructors.
    except (KeyError, IndexError, ValueError, ZeroDivisionError, RuntimeError) as error:
        # torch lists a state dict's mismatches one per line; an error is one line
        reason = " ".join(str(error).split())[:600]
        raise CheckpointError(f"{name}: the {family} weights do not fit the architecture they describe: "
                              f"{reason}") from error


def _sd_v1_from_state_dict(state: dict[str, Tensor], described: SDMetadata, parts: str,
                           read: Callable[[list[str]], dict[str, Tensor]] | None, dtype: torch.dtype,
                           ) -> StableDiffusion:
    unet_cfg = described.unet or unet_config_from_state_dict(checkpoint_part(state, UNET_PREFIX))
    with torch.device("meta"):
        unet = UNetModel(unet_cfg)
        vae = AutoencoderKL(VAEConfig.from_state_dict(checkpoint_part(state, VAE_PREFIX)))
    if parts == "mask":
        trim_for_masks(unet, vae)
    _read_missing(state, [UNET_PREFIX + k for k in unet.state_dict()] + [VAE_PREFIX + k for k in vae.state_dict()]
                  + [k for k in state if k.startswith(TEXT_PREFIX)] + ["alphas_cumprod"], read)
    unet_state, vae_state = checkpoint_part(state, UNET_PREFIX), checkpoint_part(state, VAE_PREFIX)
    if parts == "mask":  # the skipped parts' tensors are dropped, never loaded
        unet_state = {k: unet_state[k] for k in unet.state_dict() if k in unet_state}
        vae_state = {k: vae_state[k] for k in vae.state_dict() if k in vae_state}
    else:
        vae_state = {k: v for k, v in vae_state.items() if not k.startswith("loss.")}
    unet.load_state_dict(unet_state, strict=True, assign=True)
    vae.load_state_dict(vae_state, strict=True, assign=True)
    text = _text_encoder_from_state_dict(checkpoint_part(state, TEXT_PREFIX), described.text)
    # Straight to the target dtype: a detour through fp32 would hold the file's tensors and an fp32
    # copy at once (README, "Any host model").
    return StableDiffusion(unet, vae, text, _file_schedule(state), resolution=described.resolution,
                           vocabulary=described.vocabulary).to(dtype)


def _file_schedule(state: Mapping[str, Tensor]) -> NoiseSchedule:
    """The file's ``alphas_cumprod`` table when it holds one, else SD's default schedule; rescaled to zero
    terminal SNR when the file carries the ``ztsnr`` marker. A table that is the default schedule rounded,
    once or twice, whatever dtype it is stored in, is that schedule at full precision: fp16 moves the noise scale
    sqrt(1 - a_t) by 7 % at t = 0, and bf16 or fp8 round a_t near 0 to 1, so that no noise would be added
    there at all."""
    table = state.get("alphas_cumprod")
    # looked up at any timestep below 1000, and a noise scale sqrt(1 - a_t) needs a_t in [0, 1] (compared in
    # fp64: CPU kernels do not compare fp8)
    if table is not None and (table.shape != (NUM_TIMESTEPS,)
                              or not bool(((table.double() >= 0) & (table.double() <= 1)).all())):
        raise CheckpointError(f"tensor 'alphas_cumprod' of shape {tuple(table.shape)} is no noise schedule; "
                              f"expected {NUM_TIMESTEPS} values in [0, 1]")
    if table is None or _is_rounded_default_schedule(table):
        table = alphas_cumprod()
    return NoiseSchedule(rescale_zero_terminal_snr(table) if ZERO_TERMINAL_SNR_KEY in state else table)


# How a stored default schedule may have been rounded before the file's own dtype: a training script saves
# fp32 or the exact fp64; a pruning to fp16 or bf16 may come before a later cast (to fp8, or back to fp32).
_SCHEDULE_ROUNDINGS = ((), (torch.float32,), (torch.float16,), (torch.float32, torch.float16), (torch.bfloat16,),
                       (torch.float32, torch.bfloat16))


def _is_rounded_default_schedule(table: Tensor) -> bool:
    if table.shape != (NUM_TIMESTEPS,):
        return False
    exact = alphas_cumprod()
    for chain in _SCHEDULE_ROUNDINGS:
        rounded = exact
        for dtype in chain:
            rounded = rounded.to(dtype)
        # compared in float64, which holds every value of every dtype exactly: torch < 2.2 has no equal for fp8
        if torch.equal(table.double(), rounded.to(table.dtype).double()):
            return True
    return False


def _unet_vae_and_openclip(state: Mapping[str, Tensor], described: SDMetadata, openclip_prefix: str,
                           ) -> tuple[UNetModel, AutoencoderKL, OpenCLIPTextEncoder]:
    """The UNet, the VAE and the open_clip text tower (under ``openclip_prefix``) of a single file whose
    tensors are all read, shaped as the tensors say."""
    _check_parts_present(state, {"VAE": VAE_PREFIX, "OpenCLIP text encoder": openclip_prefix})
    unet_state, openclip_state = checkpoint_part(state, UNET_PREFIX), checkpoint_part(state, openclip_prefix)
    vae_state = {k: v for k, v in checkpoint_part(state, VAE_PREFIX).items() if not k.startswith("loss.")}
    if not tower_layers(openclip_state):
        raise CheckpointError("its OpenCLIP text encoder has no layers (no transformer.resblocks.*)")
    with torch.device("meta"):
        unet = UNetModel(described.unet or unet_config_from_state_dict(unet_state))
        vae = AutoencoderKL(VAEConfig.from_state_dict(vae_state))
        openclip = OpenCLIPTextEncoder.from_state_dict(openclip_state)
    width = openclip.ln_final.weight.shape[0]
    heads = openclip.transformer.resblocks[0].attn.num_heads
    check_text_sizes(openclip.token_embedding.num_embeddings, openclip.positional_embedding.shape[0], width, heads)
    unet.load_state_dict(unet_state, strict=True, assign=True)
    vae.load_state_dict(vae_state, strict=True, assign=True)
    openclip.load_text_state_dict(openclip_state)
    return unet, vae, openclip


def _check_parts_present(state: Mapping[str, Tensor], parts: Mapping[str, str]) -> None:
    """CheckpointError naming the parts (name -> key prefix) a file lacks (``family.missing_parts``)."""
    problem = missing_parts(state, parts)
    if problem:
        raise CheckpointError(problem)


def sd2_from_state_dict(state: Mapping[str, Tensor], described: SDMetadata,
                        dtype: torch.dtype = torch.float32) -> StableDiffusion2:
    """Build an SD 2.x model in ``dtype`` from a single file's tensors (all read); v-prediction when the
    file carries the ``v_pred`` marker or A1111's probe says so (``sd2.predicts_v``)."""
    unet, vae, vit_h = _unet_vae_and_openclip(state, described, SD2_TEXT_PREFIX)
    shown = tower_fields(checkpoint_part(state, SD2_TEXT_PREFIX))
    _check_text_claims(shown, described.text)
    # the tower ldm builds: what the file says, else the registered one of its shape (every SD 2.x: ViT-H-14)
    depth = described.text.get("num_hidden_layers") or registered_layers(shown["hidden_size"],
                                                                         shown["intermediate_size"])
    blocks = context_blocks(len(vit_h.transformer.resblocks), depth)
    text = OpenCLIPContext(vit_h, blocks)
    _check_context_fits(text.context_dim, unet)
    model = StableDiffusion2(unet, vae, text, _file_schedule(state))
    # probed in float32, as A1111 probes, whatever the file's and the load's dtype: in fp16 or bf16 a borderline
    # UNet would answer otherwise (and torch < 2.2 has no fp16 matmul on the CPU); cast to dtype next anyway
    model.prediction = "v" if V_PREDICTION_KEY in state or predicts_v(model.unet.float()) else "eps"
    return model.to(dtype)


def sdxl_from_state_dict(state: Mapping[str, Tensor], described: SDMetadata,
                         dtype: torch.dtype = torch.float32) -> StableDiffusionXL:
    """Build an SDXL-family model in ``dtype`` from a single file's tensors (all read); v-prediction
    when the file carries the ``v_pred`` marker."""
    _check_parts_present(state, {"CLIP ViT-L text encoder": CLIP_L_PREFIX, "OpenCLIP bigG text encoder": BIGG_PREFIX})
    if BIGG_PREFIX + "text_projection" not in state:
        raise CheckpointError("its OpenCLIP bigG text encoder has no text_projection, which SDXL's pooled text needs")
    unet, vae, bigg = _unet_vae_and_openclip(state, described, BIGG_PREFIX)
    clip_l = _text_encoder_from_state_dict(checkpoint_part(state, CLIP_L_PREFIX), described.text)
    text = SDXLConditioner(clip_l, bigg)
    _check_context_fits(text.context_dim, unet)
    prediction = "v" if V_PREDICTION_KEY in state else "eps"
    return StableDiffusionXL(unet, vae, text, _file_schedule(state), prediction=prediction).to(dtype)


def _check_context_fits(width: int, unet: UNetModel) -> None:
    """CheckpointError unless the text encoders' context is as wide as the UNet's cross-attention reads."""
    if width != unet.config.context_dim:
        raise CheckpointError(f"mismatched parts: the text encoders give a {width}-d context but the UNet expects a "
                              f"{unet.config.context_dim}-d context")


def load_stable_diffusion(path: str | os.PathLike, device: str | torch.device = "cpu",
                          dtype: torch.dtype | str = torch.float32, parts: str = "all",
                          zero_shot: bool = False, vae: Mapping[str, Tensor] | None = None) -> StableDiffusion:
    """Load an SD v1 single-file checkpoint (.safetensors, or .ckpt read without executing pickled code);
    with ``zero_shot`` (for zero-shot masks, no head) an SDXL-family or SD 2.x one too.

    ``parts="mask"``: only what a segmentation head reads (VAE encoder, text encoder, UNet up to the
    last tapped block); from a .safetensors file only those tensors are read, a .ckpt is read whole
    and the rest dropped. Running a skipped part raises LdznetError. ``vae``: VAE weights
    (``vae_file.read_vae_file``) used in place of the file's VAE, or where the file has none.
    ``dtype``: a torch dtype or its name ("fp16"); ``device`` as :func:`devices.resolve_device` takes it.
    """
    path, device, dtype = path_argument(path, "model file"), resolve_device(device), as_dtype(dtype)
    check_parts(parts)
    metadata = read_metadata(path)  # first: a crafted header gets its own message
    shapes = read_tensor_shapes(path)
    if shapes is not None and vae is not None:
        shapes = with_vae(shapes, {k: tuple(v.shape) for k, v in vae.items()})
    if shapes is not None:  # a family that cannot serve is refused before any tensor data is read
        check_family(classify(shapes, metadata), os.path.basename(path), zero_shot, parts)
    if shapes is None or parts != "mask":
        state, read = conv_attention_weights(read_state_dict(path)), None
    else:  # the file's VAE tensors are never read when ``vae`` replaces them: with_vae drops them here
        state = conv_attention_weights({k: torch.empty(shape, device="meta") for k, shape in shapes.items()})

        def read(names: list[str]) -> dict[str, Tensor]:
            return conv_attention_weights(read_tensors(path, names))
    if vae is not None:
        state = with_vae(state, vae)
    model = stable_diffusion_from_state_dict(state, metadata, os.path.basename(path), parts, read, dtype, zero_shot)
    return model.to(device=device).eval().requires_grad_(False)


def stable_diffusion_state_dict(model: StableDiffusion) -> dict[str, Tensor]:
    """The single-file (ldm) layout of a model: what A1111 and ``load_stable_diffusion`` read."""
    state = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    state.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
    state.update({TEXT_PREFIX + k: v for k, v in model.text_encoder.text_state_dict().items()})
    state["alphas_cumprod"] = model.schedule.alphas_cumprod.float()
    return state


def save_stable_diffusion(model: StableDiffusion, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write a single-file .safetensors checkpoint, with our configurations as metadata."""
    config = model.text_encoder.transformer.config
    state = stable_diffusion_state_dict(model)
    if dtype is not None:
        # The schedule stays fp32: in fp16, sqrt(1 - a_t) near t = 0 would lose most of its digits.
        state = {k: v.to(dtype) if v.is_floating_point() and k != "alphas_cumprod" else v for k, v in state.items()}
    metadata = {"unet": model.unet.config.to_dict(), "text": {f: getattr(config, f) for f in _TEXT_FIELDS}}
    if model.resolution:
        metadata["resolution"] = model.resolution
    if model.vocabulary is not None:
        metadata["vocabulary"] = sorted(model.vocabulary)
    write_safetensors(path, state, metadata)


def build_stable_diffusion(size: str = "tiny", seed: int = 0) -> StableDiffusion:
    """A randomly initialised SD v1-architecture model of a named size (tests, benchmarks)."""
    torch.manual_seed(seed)
    return StableDiffusion(UNetModel(unet_config(size)), AutoencoderKL(vae_config(size)),
                           TextEncoder.from_config(text_config(size))).eval().requires_grad_(False)
