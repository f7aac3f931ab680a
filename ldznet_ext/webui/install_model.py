"""`ldznet webui install-model SD.safetensors WEBUI_DIR`: make an SD v1 checkpoint of any width, or an
SD 2.x- or SDXL-architecture one whose OpenCLIP text tower is one open_clip registers, loadable by A1111
v1.10 without network access.

A1111 builds the model from a YAML config found beside the checkpoint (same name, ``.yaml``) and
creates the CLIP text encoder and tokenizer from Hugging Face files named by the config's
``version`` (SD v1: ``cond_stage_config``; SDXL: the conditioner's first embedder). This command
- copies the checkpoint into ``WEBUI_DIR/models/Stable-diffusion/``,
- writes the YAML from the checkpoint's own shapes (UNet, VAE, text towers) and metadata (CLIP),
- writes a per-model CLIP folder (offline tokenizer + ``config.json`` of this model's text tower)
  beside it and points ``version`` at it, so a small model never changes what other models load,
- fills the Hugging Face cache (HF_HOME or ~/.cache/huggingface) for openai/clip-vit-large-patch14
  with the tokenizer and the real ViT-L/14 text config where they are missing (never overwriting),
  which A1111 reads for ordinary SD 1.x checkpoints.
SDXL's OpenCLIP embedder is built by open_clip from an architecture name, which the YAML takes from
:data:`OPENCLIP_TEXT_TOWERS` by the file's shapes; A1111 builds it without pretrained weights (its
``DisableInitialization``) and loads the file's, and the YAML names none (``version: null``). SD 2.x's
``FrozenOpenCLIPEmbedder`` is built the same way, and needs no CLIP folder; its YAML is ldm's
v2-inference.yaml, or v2-inference-v.yaml where the file predicts v (:func:`sd2_prediction`).
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint_io import safetensors_header, read_metadata, read_state_dict, read_tensor_shapes, read_tensors
from ..errors import CheckpointError, LdznetError
from ..backbones.family import VAE_MISSING, checkpoint_part
from ..outputs import replacing, writable_folder
from ..sd.checkpoint import (BIGG_PREFIX, CLIP_L_PREFIX, SD2_TEXT_PREFIX, TEXT_PREFIX, UNET_PREFIX,
                             V_PREDICTION_KEY, VAE_PREFIX, check_family, classify, parse_sd_metadata, text_fields,
                             unet_config_from_state_dict)
from ..sd.openclip import OPENCLIP_TEXT_TOWERS, tower_layers
from ..sd.sd2 import predicts_v
from ..sd.text import normalize_text_state_dict, text_config
from ..sd.tokenizer import tokenizer_dir
from ..sd.unet import UNetConfig, UNetModel
from ..sd.vae import VAEConfig

CLIP_REPO = "openai/clip-vit-large-patch14"
A1111_LATENT_FACTOR = 8  # A1111 sizes latents as image // 8 (opt_f) whatever the VAE
# Text towers of open_clip 2.20's registered architectures (open_clip/model_configs/*.json), by name:
# (width, layers, MLP width, embedding width); each has 77 positions, 49408 tokens and heads 64 wide.
# ViT-bigG-14 is SDXL's; ViT-S-32-alt has the smallest registered text tower (test models).
COMPARE_CHUNK = 16 * 2**20  # bytes of each file held at once when comparing two checkpoints
OPENCLIP_CONTEXT = (49408, 77)  # (vocabulary, positions) of every registered OpenAI-tokenizer text tower

# The UNet's shapes in both templates (ldm's unet_config and sgm's network_config), rendered by _unet_shapes_yaml.
UNET_SHAPES = """        in_channels: {unet.in_channels}
        out_channels: {unet.out_channels}
        model_channels: {unet.model_channels}
        attention_resolutions: {attention_resolutions}
        num_res_blocks: {unet.num_res_blocks}
        channel_mult: {channel_mult}
        num_heads: {unet.num_heads}
        num_head_channels: {num_head_channels}
        use_spatial_transformer: True
        use_linear_in_transformer: {unet.linear_projection}
        transformer_depth: {transformer_depth}
        context_dim: {unet.context_dim}"""

# The VAE block of both templates (ldm's and sgm's first_stage_config), rendered by _first_stage_yaml.
FIRST_STAGE = """    first_stage_config:
      target: {target}
      params:
        embed_dim: {vae.embed_dim}
        monitor: val/rec_loss
        ddconfig:
{attn_type_line}          double_z: true
          z_channels: {vae.z_channels}
          resolution: 256
          in_channels: {vae.in_channels}
          out_ch: {vae.out_ch}
          ch: {vae.ch}
          ch_mult: {vae_mult}
          num_res_blocks: {vae.num_res_blocks}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity"""

YAML = """model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    parameterization: "{parameterization}"
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
{unet_shapes}
        use_checkpoint: False
        legacy: False
{first_stage}
    cond_stage_config:
      target: ldm.modules.encoders.modules.{cond_stage}
"""
# The text encoders of YAML's cond_stage_config: SD v1's CLIP ViT-L from a Hugging Face folder, SD 2.x's
# OpenCLIP (ldm's v2-inference.yaml) from an open_clip architecture name, without pretrained weights.
SD1_COND_STAGE = """FrozenCLIPEmbedder
      params:
        version: {clip_dir}"""
SD2_COND_STAGE = """FrozenOpenCLIPEmbedder
      params:
        arch: {openclip_arch}
        version: null
        freeze: True
        layer: penultimate"""


# sgm's configs/inference/sd_xl_base.yaml with this file's shapes; sgm reads no latent size from it.
SDXL_YAML = """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.{prediction}Weighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.{prediction}Scaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {unet.adm_in_channels}
        num_classes: sequential
        use_checkpoint: False
{unet_shapes}
        spatial_transformer_attn_type: softmax
        legacy: False
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              version: {clip_dir}
              layer: hidden
              layer_idx: {clip_layer}
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: {openclip_arch}
              version: null
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {size_dim}
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {size_dim}
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {size_dim}
{first_stage}
"""


def _unet_shapes_yaml(unet: UNetConfig, transformer_depth: int | list[int]) -> str:
    """The UNet shape fields of ``unet`` both templates share; ``transformer_depth`` one for all levels (ldm) or
    one a level (sgm)."""
    return UNET_SHAPES.format(unet=unet, attention_resolutions=[2 ** level for level in unet.attention_levels],
                              channel_mult=list(unet.channel_mult), num_head_channels=unet.num_head_channels or -1,
                              transformer_depth=transformer_depth)


def _first_stage_yaml(vae: VAEConfig, target: str, attn_type: str | None = None) -> str:
    """The first_stage_config block of the shapes in ``vae``, built as ``target``; sgm's ddconfig also names
    its ``attn_type``, which ldm's has not."""
    attn_type_line = f"          attn_type: {attn_type}\n" if attn_type else ""
    return FIRST_STAGE.format(target=target, vae=vae, vae_mult=list(vae.ch_mult), attn_type_line=attn_type_line)


def _clip_config(fields: Mapping) -> dict:
    config = text_config("sd-v1")
    for name, value in fields.items():
        setattr(config, name, value)
    data = config.to_dict()
    data.update(model_type="clip_text_model", architectures=["CLIPTextModel"])
    return data


def write_clip_folder(folder: Path, config: Mapping | None) -> None:
    """Tokenizer files (and ``config.json`` when given) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in tokenizer_dir().iterdir():
        if source.is_file():
            shutil.copyfile(source, folder / source.name)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def fill_hf_cache(hf_home: Path) -> Path:
    """Put the CLIP ViT-L/14 tokenizer and text config into the HF cache layout where missing:
    ``hub/models--openai--clip-vit-large-patch14/{refs/main, snapshots/<hash>/}``. Returns the snapshot."""
    repo = hf_home / "hub" / ("models--" + CLIP_REPO.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
    else:
        digest = hashlib.sha1(b"ldznet offline clip-vit-large-patch14 text").hexdigest()
        snapshot = repo / "snapshots" / digest
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(digest)
    snapshot.mkdir(parents=True, exist_ok=True)
    for source in tokenizer_dir().iterdir():
        if source.is_file() and not (snapshot / source.name).exists():
            shutil.copyfile(source, snapshot / source.name)
    if not (snapshot / "config.json").exists():
        (snapshot / "config.json").write_text(json.dumps(_clip_config({}), indent=2) + "\n", encoding="utf-8")
    return snapshot


def _shapes(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, as meta tensors (shapes only, from the header) for a .safetensors file:
    an SDXL file is gigabytes, and only its shapes are needed."""
    shapes = read_tensor_shapes(checkpoint)
    if shapes is None:
        return read_state_dict(checkpoint)
    read_tensors(checkpoint, ())  # no tensor read, but a file shorter than its header says is refused
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _model_name(name: str | None, checkpoint: Path) -> str:
    """``name`` (default: the checkpoint's stem; a name ending in the checkpoint's suffix is taken
    without it) if it is a plain file name in models/Stable-diffusion."""
    if not name:
        return checkpoint.stem
    if Path(name).name != name or name.startswith(".") or (os.altsep and os.altsep in name):
        raise CheckpointError(f"--name {name!r}: expected a file name without a folder or a leading dot "
                              "(the model goes into models/Stable-diffusion)")
    suffix = checkpoint.suffix
    return name[:-len(suffix)] if suffix and name.lower().endswith(suffix.lower()) else name


MARK = "# written by `ldznet webui install-model`, which replaces it when it installs this name again"
CLIP_MARK = "ldznet-install-model.txt"
"""The first line of an installed YAML, and the file in an installed CLIP folder that holds it: what
install-model wrote, it may replace; anything else under those names is the user's."""


def _check_ours(config_file: Path, clip_dir: Path | None) -> None:
    """CheckpointError when the YAML or the CLIP folder an install writes exists and was not written by
    install-model (a config of the user's, another tool's folder): it is never replaced."""
    if config_file.exists() or config_file.is_symlink():
        try:
            with open(config_file, encoding="utf-8", errors="replace") as f:
                ours = config_file.is_file() and f.readline().rstrip("\n") == MARK
        except OSError:
            ours = False
        if not ours:
            raise CheckpointError(f"{config_file} exists and was not written by install-model; pass --name or "
                                  "remove it")
    if clip_dir is not None and (clip_dir.exists() or clip_dir.is_symlink()) and not (clip_dir / CLIP_MARK).is_file():
        raise CheckpointError(f"{clip_dir} exists and was not written by install-model; pass --name or remove it")


def _needs_copy(checkpoint: Path, target: Path) -> bool:
    """Whether ``checkpoint`` must be copied to ``target``: not when it is there already; CheckpointError when
    ``target`` is another model (a WebUI model is never replaced)."""
    if not target.exists() and not target.is_symlink():
        return True
    if target.is_file() and (target.resolve() == checkpoint.resolve() or _same_model(checkpoint, target)):
        return False
    raise CheckpointError(f"{target} is another model already; pass --name or remove it")


def _same_model(checkpoint: Path, target: Path) -> bool:
    """Whether ``target`` holds the model of ``checkpoint``: for safetensors files the same header as
    JSON (safetensors writes ``__metadata__`` keys in a per-process order, so one model saved twice
    differs in bytes) and the same tensor bytes, compared a chunk at a time (files are gigabytes);
    other files byte for byte."""
    if checkpoint.suffix.lower() != ".safetensors":
        return filecmp.cmp(checkpoint, target, shallow=False)
    try:
        if safetensors_header(checkpoint) != safetensors_header(target):
            return False
    except CheckpointError:  # the target is no safetensors file (the checkpoint's header was read before)
        return False
    with open(checkpoint, "rb") as ours, open(target, "rb") as theirs:
        for file in (ours, theirs):  # to the first tensor byte
            file.seek(8 + int.from_bytes(file.read(8), "little"))
        while True:
            chunk = ours.read(COMPARE_CHUNK)
            if chunk != theirs.read(COMPARE_CHUNK):
                return False
            if not chunk:
                return True


def openclip_arch(state: Mapping, name: str, prefix: str = BIGG_PREFIX) -> str:
    """The open_clip architecture whose text tower has the shapes of the file's OpenCLIP embedder under
    ``prefix`` (SDXL's ``conditioner.embedders.1.model.``, SD 2.x's ``cond_stage_model.model.``);
    CheckpointError naming the file ``name`` when none has. SD 2.x's may lack the last layer and the
    projection, which its context does not read (A1111 loads the file into the whole tower non-strictly)."""
    tower = checkpoint_part(state, prefix)
    try:
        width = tower["token_embedding.weight"].shape[1]
        projection = tower["text_projection"].shape[1] if "text_projection" in tower else None
        shape = (width, tower_layers(tower), tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], projection)
        context = (tower["token_embedding.weight"].shape[0], tower["positional_embedding"].shape[0])
    except (KeyError, IndexError) as error:
        raise CheckpointError(f"{name}: the OpenCLIP text tower ({prefix}*) lacks {error}") from None
    arch = next((arch for arch, tower_shape in OPENCLIP_TEXT_TOWERS.items()
                 if _fits(shape, tower_shape, unread_allowed=prefix == SD2_TEXT_PREFIX)), None)
    if arch is None or context != OPENCLIP_CONTEXT:
        known = "; ".join(f"{arch} {tower_shape}" for arch, tower_shape in OPENCLIP_TEXT_TOWERS.items())
        raise CheckpointError(f"{name}: its OpenCLIP text tower (width, layers, MLP width, embedding width) = {shape}, "
                              f"vocabulary and positions {context}, is no open_clip architecture A1111 can build; "
                              f"expected one of: {known}, with {OPENCLIP_CONTEXT}")
    return arch


def _fits(shape: tuple, tower_shape: tuple[int, int, int, int], unread_allowed: bool) -> bool:
    """Whether a file's tower ``shape`` (width, layers, MLP width, projection width or None) is the registered
    ``tower_shape``; with ``unread_allowed`` also without its last layer or its projection."""
    width, layers, mlp, projection = shape
    registered_width, registered_layers, registered_mlp, registered_projection = tower_shape
    if (width, mlp) != (registered_width, registered_mlp):
        return False
    if unread_allowed:
        return layers in (registered_layers, registered_layers - 1) and projection in (registered_projection, None)
    return (layers, projection) == (registered_layers, registered_projection)


def _sdxl_yaml(state: Mapping, unet: UNetConfig, vae: VAEConfig, clip_dir: Path, clip_layers: int, name: str) -> str:
    """The sgm config of an SDXL-architecture file ``name`` (its CLIP ViT-L of ``clip_layers`` layers in
    ``clip_dir``); CheckpointError when A1111 could not build it."""
    if not unet.adm_in_channels:
        raise CheckpointError(f"{name}: its UNet has no vector input (label_emb), which an SDXL base model has")
    arch = openclip_arch(state, name)
    pooled = OPENCLIP_TEXT_TOWERS[arch][3]
    size_dim, rest = divmod(unet.adm_in_channels - pooled, 6)
    if rest or size_dim < 1:
        raise CheckpointError(f"{name}: its UNet's vector is {unet.adm_in_channels} wide, which is not the pooled "
                              f"text ({pooled}) and six size embeddings of one width")
    levels = range(len(unet.channel_mult))
    return SDXL_YAML.format(
        unet=unet, prediction="V" if V_PREDICTION_KEY in state else "Eps",
        unet_shapes=_unet_shapes_yaml(unet, [unet.depth_at(level) for level in levels]),
        clip_dir=json.dumps(str(clip_dir.resolve())),
        clip_layer=clip_layers - 1,  # hidden_states[n - 1]: the penultimate layer's output, as SDXL's 11 of 12
        openclip_arch=arch, size_dim=size_dim,
        first_stage=_first_stage_yaml(vae, "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "vanilla"))


def sd2_prediction(checkpoint: Path, state: Mapping, unet: UNetConfig) -> str:
    """"v" or "eps", decided as our loader decides for an SD 2.x file (``checkpoint.sd2_from_state_dict``):
    its ``v_pred`` marker, else A1111's probe (``sd2.predicts_v``) on its UNet in fp32, the only tensors read."""
    if V_PREDICTION_KEY in state:
        return "v"
    names = [k for k in state if k.startswith(UNET_PREFIX)]
    tensors = read_tensors(checkpoint, names) if any(state[k].is_meta for k in names) else state
    with torch.device("meta"):
        model = UNetModel(unet)
    weights = {k: v.float() for k, v in checkpoint_part(tensors, UNET_PREFIX).items()}
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{checkpoint.name}: the SD 2.x UNet does not fit the architecture it describes: "
                              f"{str(error)[:600]}") from None
    return "v" if predicts_v(model) else "eps"


def _ldm_yaml(checkpoint: Path, state: Mapping, unet: UNetConfig, vae: VAEConfig, clip_dir: Path, sd2: bool) -> str:
    """The ldm config of an SD v1 file (its CLIP in ``clip_dir``) or, with ``sd2``, of an SD 2.x one (ldm's
    v2-inference.yaml or v2-inference-v.yaml, by :func:`sd2_prediction`); CheckpointError when A1111 could not
    build it."""
    name = checkpoint.name
    depths = sorted({unet.depth_at(level) for level in unet.attention_levels}) or [unet.transformer_depth]
    if len(depths) > 1:
        raise CheckpointError(f"{name}: its UNet's transformer depth differs between levels ({depths}); ldm's "
                              "UNet (SD v1, SD 2.x) has one depth for all")
    cond_stage, parameterization = SD1_COND_STAGE.format(clip_dir=json.dumps(str(clip_dir.resolve()))), "eps"
    if sd2:  # an inpainting or depth file is refused by its family (classify)
        arch = openclip_arch(state, name, SD2_TEXT_PREFIX)
        if unet.context_dim != OPENCLIP_TEXT_TOWERS[arch][0]:
            raise CheckpointError(f"{name}: its UNet reads a {unet.context_dim}-wide context, but its OpenCLIP "
                                  f"text tower ({arch}) gives {OPENCLIP_TEXT_TOWERS[arch][0]}")
        cond_stage, parameterization = SD2_COND_STAGE.format(openclip_arch=arch), sd2_prediction(checkpoint, state,
                                                                                                   unet)
    return YAML.format(unet_shapes=_unet_shapes_yaml(unet, depths[0]), parameterization=parameterization,
                       cond_stage=cond_stage,
                       first_stage=_first_stage_yaml(vae, "ldm.models.autoencoder.AutoencoderKL"))


def install_model(checkpoint: str | os.PathLike, webui_dir: str | os.PathLike, name: str | None = None,
                  hf_home: str | os.PathLike | None = None) -> Path:
    """Install ``checkpoint`` (SD v1, SD 2.x or SDXL architecture) into the WebUI at ``webui_dir``; returns the
    installed checkpoint path."""
    checkpoint, webui_dir = Path(checkpoint), Path(webui_dir)
    if not (webui_dir / "webui.py").is_file():
        raise CheckpointError(f"{webui_dir} is not a WebUI folder (no webui.py)")
    state, metadata = _shapes(checkpoint), read_metadata(checkpoint)
    info = classify(state, metadata)
    sdxl, sd2 = info.family == "sdxl", info.family == "sd2"
    if info.problem == VAE_MISSING:
        raise CheckpointError(f"{checkpoint.name}: the file has no VAE ('{VAE_PREFIX}*'); the WebUI builds a model "
                              "from one file, so install a checkpoint with its VAE")
    check_family(info, checkpoint.name, zero_shot=True)  # SDXL and SD 2.x files serve zero-shot masks in a WebUI
    if sdxl and not any(k.startswith(CLIP_L_PREFIX) for k in state):
        raise CheckpointError(f"{checkpoint.name}: no CLIP ViT-L text encoder ({CLIP_L_PREFIX}*), which an SDXL base "
                              "model has (an SDXL refiner?); only SDXL base-architecture files are installed")
    described = parse_sd_metadata(metadata, checkpoint.name)
    unet = described.unet or unet_config_from_state_dict(checkpoint_part(state, UNET_PREFIX))
    vae = VAEConfig.from_state_dict(checkpoint_part(state, VAE_PREFIX))
    factor = 2 ** (len(vae.ch_mult) - 1)
    if factor != A1111_LATENT_FACTOR:
        raise CheckpointError(f"{checkpoint.name}: its VAE downsamples {factor}x, but A1111 sizes latents as "
                              f"image/{A1111_LATENT_FACTOR} (opt_f = 8); only VAEs with 4 levels work in the WebUI")
    name = _model_name(name, checkpoint)
    target_dir = webui_dir / "models" / "Stable-diffusion"
    clip_dir = target_dir / f"{name}.clip"
    clip_config = None
    if not sd2:
        tower = normalize_text_state_dict(checkpoint_part(state, CLIP_L_PREFIX if sdxl else TEXT_PREFIX))
        try:
            clip_config = _clip_config(text_fields(tower, described.text))
        except LdznetError as error:
            raise CheckpointError(f"{checkpoint.name}: {error}") from error
    if sdxl:
        config = _sdxl_yaml(state, unet, vae, clip_dir, clip_config["num_hidden_layers"], checkpoint.name)
    else:
        config = _ldm_yaml(checkpoint, state, unet, vae, clip_dir, sd2)
    target = target_dir / f"{name}{checkpoint.suffix}"
    copy = _needs_copy(checkpoint, target)
    config_file = target_dir / f"{name}.yaml"
    _check_ours(config_file, clip_dir if clip_config is not None else None)
    hf_home = Path(hf_home) if hf_home else Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    try:  # before anything is installed: a cache that cannot be filled would leave a half install
        writable_folder(hf_home / "hub")
    except LdznetError as error:
        raise LdznetError(f"Hugging Face cache (--hf-home or HF_HOME): {error}") from None
    target_dir.mkdir(parents=True, exist_ok=True)
    if clip_config is not None:  # SD 2.x has no CLIP ViT-L
        write_clip_folder(clip_dir, clip_config)
        (clip_dir / CLIP_MARK).write_text(f"{MARK}\n", encoding="utf-8")
    if copy:
        with replacing(target) as partial:  # an interrupted copy leaves no truncated model behind
            shutil.copyfile(checkpoint, partial)
    with replacing(config_file) as partial:
        partial.write_text(f"{MARK}\n{config}", encoding="utf-8")
    fill_hf_cache(hf_home)
    return target
