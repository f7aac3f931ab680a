"""Diffusers-format model folders (SD 1.x, SD 2.x and SDXL) read into the single-file (ldm) layout.

A folder holds ``model_index.json`` and one sub-folder per part: ``unet/``, ``vae/``, ``text_encoder/``
(and SDXL's ``text_encoder_2/``), each with a ``config.json`` and its weights. SD 2.x's text encoder
is transformers' CLIP model of open_clip's ViT-H tower less its last layer and projection (diffusers'
``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``), whose last hidden state is the context ldm reads. Only what the folder
holds is read: no download, weights from ``.safetensors`` (a ``.bin`` only through
``checkpoint_io.read_state_dict``, which unpickles tensors alone), sharded weights through their
``*.safetensors.index.json``. The key mapping follows the two layouts' definitions (diffusers'
``UNet2DConditionModel``/``AutoencoderKL``/transformers' CLIP against ldm's ``openaimodel``/
``autoencoder``/open_clip); the architecture then comes from the tensor shapes as for a single file,
with the head counts that shapes do not show taken from the configs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from torch import Tensor

from ..backbones.family import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, CheckpointInfo, checkpoint_part
from ..checkpoint_io import named_path, path_argument, read_state_dict
from ..devices import resolve_device
from ..errors import CheckpointError
from ..limits import Limit
from ..precision import as_dtype
from .checkpoint import (BIGG_PREFIX, CLIP_L_PREFIX, SD2_TEXT_PREFIX, V_PREDICTION_KEY, ZERO_TERMINAL_SNR_KEY,
                         check_family, stable_diffusion_from_state_dict, unet_config_from_state_dict, with_vae)
from .model import StableDiffusion
from .openclip import tower_fields, tower_layers
from .schedule import LINEAR_END, LINEAR_START, NUM_TIMESTEPS, alphas_cumprod
from .text import normalize_text_state_dict
from .unet import UNetConfig
from .vae import conv_attention_weights

INDEX_FILE = "model_index.json"
VAE_SCALE = Limit(float, 0, 100, low_open=True)  # latents = scale x posterior (SD 0.18215, SDXL 0.13025)
_BETA = Limit(float, 0, 1, low_open=True, high_open=True)  # a noise variance per step
# Weight files of a part (names, or patterns of sharded weights' indexes), in the order they are looked for:
# full precision first, one file or shards, then the fp16 variant (diffusers names a variant's index
# "*.safetensors.index.fp16.json"), then pickle-based files.
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "*.safetensors.index.json",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors", "*.safetensors.index.*.json",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")
_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
_UNET_TOP = (("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."), ("add_embedding.linear_1.", "label_emb.0.0."),
             ("add_embedding.linear_2.", "label_emb.0.2."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."))
# diffusers' VAE attention (current names, then those of diffusers before 0.14) -> ldm's AttnBlock
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."), ("query.", "q."), ("key.", "k."), ("value.", "v."),
                  ("proj_attn.", "proj_out."))


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``model_index.json``."""
    return Path(path).is_dir() and (Path(path) / INDEX_FILE).is_file()


def diffusers_family(path: str | os.PathLike) -> str:
    """The family of a diffusers folder from its layout and configs alone, no weight read: "sdxl" (a
    ``text_encoder_2/``), "sd2" (a 1024-d text encoder or cross-attention), else "sd-v1"."""
    folder = named_path(path)
    if (folder / "transformer").is_dir() and not (folder / "unet").is_dir():  # Flux, SD 3 and the like
        kind = _json(folder / INDEX_FILE, folder).get("_class_name", "an unnamed pipeline")
        raise CheckpointError(f"{folder.name}: a diffusers folder of {kind} with transformer/, not unet/ (Flux, SD 3 "
                              "and other transformer models are not supported); only UNet models (SD 1.x, SD 2.x, "
                              "SDXL) are read")
    unet_config = _json(folder / "unet" / "config.json", folder)
    problem = unet_config_problem(unet_config)
    if problem:
        raise CheckpointError(f"{folder.name}: unet/config.json: the UNet {problem}")
    if (folder / "text_encoder_2").is_dir():
        if not (folder / "text_encoder").is_dir():
            raise CheckpointError(f"{folder.name}: text_encoder_2/ without text_encoder/ (an SDXL refiner?); refiners "
                                  "are not supported: use the SDXL base model or a fine-tune of it")
        return "sdxl"
    family = unet_config_family(unet_config)
    if family == "sdxl":
        raise CheckpointError(f"{folder.name}: an SDXL UNet (text_time conditioning) without text_encoder_2/; the "
                              "folder is incomplete")
    text_config = _json(folder / "text_encoder" / "config.json", folder)
    return "sd2" if text_config.get("hidden_size") == 1024 else family


def unet_config_problem(config: Mapping[str, Any]) -> str | None:
    """Why a diffusers UNet of ``config`` is none LD-ZNet reads, and what to do, completing "the UNet ..."
    (None: a text-to-image UNet of 4 input channels)."""
    in_channels = config.get("in_channels", 4)  # UNet2DConditionModel's default
    if in_channels != 4:
        return (f"takes {json.dumps(in_channels)[:20]} input channels, not 4 (an inpainting, depth, upscaler or edit "
                "model); use the base model it was made from")
    if (config.get("class_embed_type") or config.get("num_class_embeds")
            or config.get("addition_embed_type") not in (None, "text_time")):
        return ("is conditioned on more than text (class or image embeddings: unCLIP and the like); LD-ZNet reads SD "
                "1.x, SD 2.x and SDXL-family UNets")
    return None


def unet_config_family(config: Mapping[str, Any]) -> str:
    """The family a diffusers UNet's config names: "sdxl" (pooled-text and size conditioning, ``text_time``),
    "sd2" (a 1024-d cross-attention or SD 2.x's linear projections), else "sd-v1"."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 or config.get("use_linear_projection") else "sd-v1"


def _json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder.name}: diffusers folder without {path.relative_to(folder)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder.name}: cannot read {path.relative_to(folder)} ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder.name}: {path.relative_to(folder)} is not a JSON object")
    return data


def read_part(folder: Path, part: str) -> dict[str, Tensor]:
    """All tensors of the part ``part`` (a sub-folder): its first weights in ``_WEIGHT_FILES`` order,
    sharded ones through their index."""
    where = folder / part
    for pattern in _WEIGHT_FILES:
        for path in sorted(where.glob(pattern)):
            if path.name.endswith(".json"):
                return _read_shards(folder, part, path)
            if path.is_file():
                return read_state_dict(path)
    found = sorted(p.name for p in where.iterdir()) if where.is_dir() else []
    raise CheckpointError(f"{folder.name}: no weights in {part}/ (found {', '.join(found) or 'nothing'}); expected "
                          f"one of {', '.join(_WEIGHT_FILES)}")


def _read_shards(folder: Path, part: str, index: Path) -> dict[str, Tensor]:
    weight_map = _json(index, folder).get("weight_map", {})
    names = list(weight_map.values()) if isinstance(weight_map, dict) else []
    # each shard a plain file name: never a path out of the part's folder, nor the folder itself
    if not names or any(not isinstance(name, str) or Path(name).name != name or name in ("", "..") for name in names):
        raise CheckpointError(f"{folder.name}: {part}/{index.name} must map weights to files in {part}/")
    state: dict[str, Tensor] = {}
    for name in sorted(set(names)):
        state.update(read_state_dict(index.parent / name))
    return state


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """``key`` with its leading name replaced by the first pair whose old name it starts with."""
    return next((new + key[len(old):] for old, new in pairs if key.startswith(old)), key)


def _unet_key(key: str, n: int, upsampled_after_attention: set[int]) -> str:
    """One diffusers UNet key in ldm's layout (``n`` resnets per down level)."""
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, index = int(m[2]), int(m[4])
        block = f"input_blocks.{1 + level * (n + 1) + index}" if m[1] == "down" else \
            f"output_blocks.{level * (n + 1) + index}"
        return f"{block}.0.{_rename(m[5], _RESNET)}" if m[3] == "resnets" else f"{block}.1.{m[5]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        return f"middle_block.1.{m[3]}" if m[1] == "attentions" else \
            f"middle_block.{2 * int(m[2])}.{_rename(m[3], _RESNET)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        level = int(m[1])
        return f"output_blocks.{level * (n + 1) + n}.{2 if level in upsampled_after_attention else 1}.{m[2]}"
    return _rename(key, _UNET_TOP)


def unet_to_ldm(state: Mapping[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """diffusers' UNet2DConditionModel weights -> ldm's UNetModel (no prefix); its transformers keep
    their names. An up level with attentions has its upsampler third in each ldm block, else second."""
    with_attention = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {_unet_key(k, layers_per_block, with_attention): v for k, v in state.items()}


def _vae_key(key: str, up_levels: int) -> str:
    """One diffusers VAE key in ldm's layout; the decoder's up levels are numbered the other way."""
    shortcut = (("conv_shortcut.", "nin_shortcut."),)
    if m := re.match(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)",
                     key):
        side, kind, rest = m[1], m[3], m[5]
        stage, level = ("down", int(m[2])) if side == "encoder" else ("up", up_levels - 1 - int(m[2]))
        if kind == "resnets":
            return f"{side}.{stage}.{level}.block.{m[4]}.{_rename(rest, shortcut)}"
        return f"{side}.{stage}.{level}.{kind[:-2]}.{rest}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], shortcut)}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTENTION)}"
    return _rename(key, (("encoder.conv_norm_out.", "encoder.norm_out."),
                         ("decoder.conv_norm_out.", "decoder.norm_out.")))


def vae_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' AutoencoderKL weights -> ldm's (no prefix); the attention's linear layers become ldm's
    1x1 convolutions."""
    up_levels = len({m[1] for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    return conv_attention_weights({_vae_key(key, up_levels): value for key, value in state.items()})


def clip_to_openclip(state: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """transformers' CLIP text weights (SDXL's text_encoder_2, a CLIPTextModelWithProjection; SD 2.x's
    text_encoder, without projection) -> open_clip's text tower; CheckpointError naming ``where`` (the
    folder and part) for weights of another layout."""
    try:
        return _clip_to_openclip(state, where)
    except (KeyError, IndexError, RuntimeError) as error:  # a missing q/k/v part, shapes torch.cat refuses
        reason = f"'{error.args[0]}' is missing" if isinstance(error, KeyError) else " ".join(str(error).split())
        raise CheckpointError(f"{where}: not a CLIP text model's weights ({reason[:300]})") from error


def _clip_to_openclip(state: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    state = dict(state)
    projection = state.pop("text_projection.weight", None)
    text = normalize_text_state_dict(state)
    out = {"token_embedding.weight": text.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": text.pop("text_model.embeddings.position_embedding.weight"),
           "ln_final.weight": text.pop("text_model.final_layer_norm.weight"),
           "ln_final.bias": text.pop("text_model.final_layer_norm.bias")}
    if projection is not None:
        out["text_projection"] = projection.T.contiguous()
    layer_names = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
    for key in sorted(text):
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if m is None:
            raise CheckpointError(f"{where}: unexpected weight {key!r}")
        block, rest = f"transformer.resblocks.{m[1]}.", m[2]
        if q := re.match(r"self_attn\.q_proj\.(weight|bias)", rest):
            name = f"text_model.encoder.layers.{m[1]}.self_attn.{{}}_proj.{q[1]}"
            out[f"{block}attn.in_proj_{q[1]}"] = torch.cat([text[name.format(p)] for p in "qkv"])
        elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            out[block + _rename(rest, layer_names)] = text[key]
    return out


def _heads(config: Mapping[str, Any]) -> list[int]:
    """Head counts per level of a diffusers UNet config (``attention_head_dim`` holds the count in SD 1.x
    and SDXL configs, ``num_attention_heads`` where set)."""
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")
    levels = len(config.get("block_out_channels") or [])
    heads = [heads] * levels if isinstance(heads, int) else heads
    if not (isinstance(heads, list) and len(heads) == levels and all(type(h) is int and h > 0 for h in heads)):
        raise ValueError("'attention_head_dim' (heads per level) must be a positive integer or one per level")
    return heads


def unet_heads(unet: UNetConfig, config: Mapping[str, Any]) -> UNetConfig:
    """``unet`` (from the shapes) with the head layout of a diffusers UNet ``config``: a head count
    (SD 1.x) or, for sgm UNets, a head width that every attention level must share."""
    heads = [_heads(config)[level] for level in unet.attention_levels]
    for level, count in zip(unet.attention_levels, heads):
        if (unet.model_channels * unet.channel_mult[level]) % count:
            raise ValueError(f"{count} heads do not divide the {unet.model_channels * unet.channel_mult[level]} "
                             f"channels of level {level}")
    widths = {unet.model_channels * unet.channel_mult[level] // h for level, h in zip(unet.attention_levels, heads)}
    if unet.num_head_channels == 0 and len(set(heads)) == 1:
        return dataclasses.replace(unet, num_heads=heads[0])
    if unet.num_head_channels and len(widths) == 1:
        return dataclasses.replace(unet, num_head_channels=widths.pop())
    raise ValueError(f"heads {heads} at the attention levels give no single head count or width")


def ldm_unet_config(ldm_state: Mapping[str, Tensor], config: Mapping[str, Any], problem: str) -> UNetConfig:
    """The UNetConfig of a diffusers UNet from its weights in ldm's layout (``unet_to_ldm``) and its
    ``config``; CheckpointError starting with ``problem`` when they do not fit each other."""
    try:
        return unet_heads(unet_config_from_state_dict(ldm_state), config)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{problem}: {error}") from error


def diffusers_unet_config(state: Mapping[str, Tensor], config: Mapping[str, Any], where: str) -> UNetConfig:
    """The UNetConfig of a diffusers UNet's own weights ``state`` and ``config`` (as ``UNet2DConditionModel``
    holds them); CheckpointError naming ``where``."""
    layers = _int_field(config, "layers_per_block", where)
    return ldm_unet_config(unet_to_ldm(state, layers), config, f"{where} does not fit its config")


def _int_field(config: Mapping[str, Any], field: str, where: str) -> int:
    value = config.get(field)
    if type(value) is not int or value < 1:
        raise _field_error(value, field, where, "an integer >= 1")
    return value


def _vit_h_depth(config: Mapping[str, Any], tower: Mapping[str, Tensor], where: str) -> int:
    """The depth of the tower ldm builds for an SD 2.x folder's text encoder: one layer more than its
    config's ``num_hidden_layers``, which diffusers runs (the last hidden state is the context).
    CheckpointError unless the config, read as transformers reads it (its CLIPTextConfig's defaults for
    what it leaves out), describes open_clip's tower ``tower`` (open_clip weights of the folder)."""
    defaults = transformers.CLIPTextConfig()
    try:
        shown = tower_fields(tower)
    except (KeyError, ValueError, IndexError) as error:  # a weight missing or of another rank
        raise CheckpointError(f"{where}: not the weights of a CLIP text model ({error})") from None
    why = {"hidden_size": "the width of its weights", "intermediate_size": "its weights' MLP width",
           "num_attention_heads": "heads 64 channels wide, as open_clip's towers have",
           "vocab_size": "its weights' token embeddings", "max_position_embeddings": "its weights' positions"}
    expected = {**{field: (value, why[field]) for field, value in shown.items()},
                "hidden_act": ("gelu", "as SD 2.x's OpenCLIP text encoder has"),
                "layer_norm_eps": (1e-5, "open_clip's")}
    for field, (value, reason) in expected.items():
        if config.get(field, getattr(defaults, field)) != value:
            raise _field_error(config.get(field, getattr(defaults, field)), field, where,
                               f"{json.dumps(value)}, {reason}")
    layers = config.get("num_hidden_layers", defaults.num_hidden_layers)
    held = tower_layers(tower)
    if type(layers) is not int or not held - 1 <= layers <= held or layers < 1:
        raise _field_error(layers, "num_hidden_layers", where, f"{held}, the layers its weights hold (or {held - 1}, "
                           "leaving the last unread)")
    return layers + 1


def _field_error(value: Any, field: str, where: str, expected: str) -> CheckpointError:
    return CheckpointError(f"{where}: field '{field}' is {json.dumps(value)[:40]}; expected {expected}")


def _vae_scale(config: Mapping[str, Any], where: str) -> float | None:
    """``scaling_factor`` (None when unset: the family's); a scale that is no positive number would give
    every latent, and so every mask, silently wrong or NaN."""
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise CheckpointError(f"{where}: latents_mean / latents_std, per-channel latent statistics (Playground v2.5 "
                              "and the like) that SD models do not have; such models are not supported")
    if "scaling_factor" not in config:
        return None
    value = config["scaling_factor"]
    if not VAE_SCALE.accepts(value):
        raise _field_error(value, "scaling_factor", where, VAE_SCALE.describe())
    return float(value)


def _scheduler_tensors(folder: Path) -> dict[str, Tensor]:
    """What ``scheduler/scheduler_config.json`` says, as the tensors a single file carries for it: the
    ``v_pred`` and ``ztsnr`` markers, and an ``alphas_cumprod`` table when its betas are not SD's (fields
    it lacks take SD's values). A prediction type or beta schedule we do not model is refused."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = _json(path, folder) if path.is_file() else {}
    where = f"{folder.name}: scheduler/scheduler_config.json"
    kind = config.get("_class_name")
    if "sigma_data" in config or (isinstance(kind, str) and kind.startswith("EDM")):
        raise CheckpointError(f"{where}: {kind or 'a scheduler with sigma_data'}, the EDM noise schedule (Playground "
                              "v2.5 and the like), not SD's; models trained with it are not supported")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise _field_error(prediction, "prediction_type", where, '"epsilon" or "v_prediction"')
    tensors = {}
    if prediction == "v_prediction":
        tensors[V_PREDICTION_KEY] = torch.zeros(())
    zero_terminal_snr = config.get("rescale_betas_zero_snr", False)
    if not isinstance(zero_terminal_snr, bool):
        raise _field_error(zero_terminal_snr, "rescale_betas_zero_snr", where, "true or false")
    if zero_terminal_snr:
        tensors[ZERO_TERMINAL_SNR_KEY] = torch.zeros(())
    table = _config_alphas_cumprod(config, where)
    if not torch.equal(table, alphas_cumprod()):
        tensors["alphas_cumprod"] = table
    return tensors


def _config_alphas_cumprod(config: Mapping[str, Any], where: str) -> Tensor:
    """alphas_cumprod [1000], float64, of a scheduler config's betas: ``trained_betas``, else
    ``beta_schedule`` "scaled_linear" (SD's) or "linear" from ``beta_start`` to ``beta_end``."""
    steps = config.get("num_train_timesteps", NUM_TIMESTEPS)
    if steps != NUM_TIMESTEPS or type(steps) is not int:
        raise _field_error(steps, "num_train_timesteps", where, f"{NUM_TIMESTEPS}, as every SD model has")
    betas = config.get("trained_betas")
    if betas is not None:
        if (not isinstance(betas, list) or len(betas) != NUM_TIMESTEPS
                or not all(_BETA.accepts(beta) for beta in betas)):
            raise _field_error(betas, "trained_betas", where, f"null or {NUM_TIMESTEPS} numbers in (0, 1)")
        return torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), dim=0)
    start, end = config.get("beta_start", LINEAR_START), config.get("beta_end", LINEAR_END)
    for value, field in ((start, "beta_start"), (end, "beta_end")):
        if not _BETA.accepts(value):
            raise _field_error(value, field, where, _BETA.describe())
    spacing = config.get("beta_schedule", "scaled_linear")
    if spacing not in ("scaled_linear", "linear"):
        raise _field_error(spacing, "beta_schedule", where, '"scaled_linear" or "linear" (SD\'s schedules)')
    return alphas_cumprod(NUM_TIMESTEPS, start, end, spacing)


class DiffusersModel(NamedTuple):
    """A diffusers folder in the single-file layout: tensors, ``ldznet.*``-style metadata, VAE scale."""

    state: dict[str, Tensor]
    metadata: dict[str, Any]
    scale_factor: float | None


def read_diffusers_folder(path: str | os.PathLike, with_vae: bool = True) -> DiffusersModel:
    """An SD 1.x, SD 2.x or SDXL diffusers folder (``diffusers_family``) as a single file's tensors
    (every weight read; without ``with_vae`` none of ``vae/``, which a VAE file replaces), with the UNet
    and text configurations that shapes do not show as metadata. CheckpointError naming the folder and
    what it holds otherwise."""
    folder = named_path(path)
    _json(folder / INDEX_FILE, folder)  # a folder without it is refused as no diffusers folder
    unet_config = _json(folder / "unet" / "config.json", folder)
    text_config = _json(folder / "text_encoder" / "config.json", folder)
    family = diffusers_family(folder)
    sdxl = family == "sdxl"
    layers = _int_field(unet_config, "layers_per_block", f"{folder.name}: unet/config.json")
    # the configs first: a schedule or latent statistics that are not SD's are refused before gigabytes are read
    schedule = _scheduler_tensors(folder)
    vae_config = folder / "vae" / "config.json"
    scale = (_vae_scale(_json(vae_config, folder), f"{folder.name}: vae/config.json")
             if with_vae or vae_config.is_file() else None)
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(read_part(folder, "unet"), layers).items()}
    if with_vae:
        state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(read_part(folder, "vae")).items()})
    text_where = f"{folder.name}: text_encoder/config.json"
    if family == "sd2":
        vit_h = clip_to_openclip(read_part(folder, "text_encoder"), f"{folder.name}: text_encoder")
        state.update({SD2_TEXT_PREFIX + k: v for k, v in vit_h.items()})
        text = {"num_hidden_layers": _vit_h_depth(text_config, vit_h, text_where)}
    else:
        text = {"num_attention_heads": _int_field(text_config, "num_attention_heads", text_where)}
        clip_l = normalize_text_state_dict(read_part(folder, "text_encoder"))
        state.update({(CLIP_L_PREFIX if sdxl else TEXT_PREFIX) + k: v for k, v in clip_l.items()})
    if sdxl:
        bigg = clip_to_openclip(read_part(folder, "text_encoder_2"), f"{folder.name}: text_encoder_2")
        state.update({BIGG_PREFIX + k: v for k, v in bigg.items()})
    state.update(schedule)
    unet = ldm_unet_config(checkpoint_part(state, UNET_PREFIX), unet_config,
                           f"{folder.name}: the UNet in unet/ does not fit its config.json")
    return DiffusersModel(state, {"unet": unet.to_dict(), "text": text}, scale)


def load_diffusers_folder(path: str | os.PathLike, device: str | torch.device = "cpu",
                          dtype: torch.dtype | str = torch.float32, parts: str = "all",
                          zero_shot: bool = False, vae: Mapping[str, Tensor] | None = None) -> StableDiffusion:
    """``load_stable_diffusion`` for a diffusers folder: the same model its single-file equivalent gives
    (SD 1.x for a head or zero-shot, SD 2.x and SDXL for zero-shot), with the VAE scale of
    ``vae/config.json``; ``vae``: VAE weights (``vae_file.read_vae_file``) used in place of the folder's
    ``vae/``."""
    path, device, dtype = path_argument(path, "model folder"), resolve_device(device), as_dtype(dtype)
    name = named_path(path).name
    # a head is refused before any weight is read
    check_family(CheckpointInfo(diffusers_family(path)), name, zero_shot, parts)
    folder = read_diffusers_folder(path, with_vae=vae is None)
    state = folder.state if vae is None else with_vae(folder.state, vae)
    model = stable_diffusion_from_state_dict(state, folder.metadata, name, parts,
                                             dtype=dtype, zero_shot=zero_shot)
    if folder.scale_factor is not None:
        model.scale_factor = folder.scale_factor
    return model.to(device=device).eval().requires_grad_(False)
