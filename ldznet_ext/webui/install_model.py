"""`ldznet webui install-model SD.safetensors WEBUI_DIR`: make an SD v1 checkpoint of any width
loadable by A1111 v1.10 without network access.

A1111 builds the model from a YAML config found beside the checkpoint (same name, ``.yaml``) and
creates the CLIP text encoder and tokenizer from Hugging Face files named by the config's
``cond_stage_config.params.version``. This command
- copies the checkpoint into ``WEBUI_DIR/models/Stable-diffusion/``,
- writes the YAML from the checkpoint's own shapes (UNet, VAE) and metadata (CLIP),
- writes a per-model CLIP folder (offline tokenizer + ``config.json`` of this model's text tower)
  beside it and points ``version`` at it, so a small model never changes what other models load,
- fills the Hugging Face cache (HF_HOME or ~/.cache/huggingface) for openai/clip-vit-large-patch14
  with the tokenizer and the real ViT-L/14 text config where they are missing (never overwriting),
  which A1111 reads for ordinary SD 1.x checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from ..checkpoint_io import read_metadata, read_state_dict
from ..errors import CheckpointError
from ..sd.checkpoint import (SUPPORTED, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, classify, parse_sd_metadata,
                             unet_config_from_state_dict)
from ..sd.text import normalize_text_state_dict, text_config
from ..sd.tokenizer import tokenizer_dir
from ..sd.vae import VAEConfig

CLIP_REPO = "openai/clip-vit-large-patch14"
A1111_LATENT_FACTOR = 8  # A1111 sizes latents as image // 8 (opt_f) whatever the VAE

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
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: {unet.in_channels}
        out_channels: {unet.out_channels}
        model_channels: {unet.model_channels}
        attention_resolutions: {attention_resolutions}
        num_res_blocks: {unet.num_res_blocks}
        channel_mult: {channel_mult}
        num_heads: {unet.num_heads}
        use_spatial_transformer: True
        transformer_depth: {unet.transformer_depth}
        context_dim: {unet.context_dim}
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {vae.embed_dim}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
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
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {clip_dir}
"""


def _text_fields(state: Mapping, metadata: Mapping) -> dict:
    """The CLIPTextConfig fields of a checkpoint's text tower, from its shapes and our metadata."""
    text = normalize_text_state_dict({k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)})
    hidden = text["text_model.embeddings.token_embedding.weight"].shape[1]
    layers = {int(m.group(1)) for k in text if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    return {"vocab_size": text["text_model.embeddings.token_embedding.weight"].shape[0], "hidden_size": hidden,
            "intermediate_size": text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_hidden_layers": len(layers), "num_attention_heads": max(1, hidden // 64),
            "max_position_embeddings": text["text_model.embeddings.position_embedding.weight"].shape[0],
            **metadata.get("text", {})}


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


def install_model(checkpoint: str | os.PathLike, webui_dir: str | os.PathLike, name: str | None = None,
                  hf_home: str | os.PathLike | None = None) -> Path:
    """Install ``checkpoint`` into the WebUI at ``webui_dir``; returns the installed checkpoint path."""
    checkpoint, webui_dir = Path(checkpoint), Path(webui_dir)
    if not (webui_dir / "webui.py").is_file():
        raise CheckpointError(f"{webui_dir} is not a WebUI folder (no webui.py)")
    state, metadata = read_state_dict(checkpoint), read_metadata(checkpoint)
    info = classify(state, metadata)
    if info.problem:
        raise CheckpointError(f"{checkpoint.name}: {info.family}: {info.problem}. Supported: {SUPPORTED}.")
    unet = (parse_sd_metadata(metadata, checkpoint.name).unet or
            unet_config_from_state_dict({k[len(UNET_PREFIX):]: v for k, v in state.items()
                                         if k.startswith(UNET_PREFIX)}))
    vae = VAEConfig.from_state_dict({k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)})
    factor = 2 ** (len(vae.ch_mult) - 1)
    if factor != A1111_LATENT_FACTOR:
        raise CheckpointError(f"{checkpoint.name}: its VAE downsamples {factor}x, but A1111 sizes latents as "
                              f"image/{A1111_LATENT_FACTOR} (opt_f = 8); only VAEs with 4 levels work in the WebUI")
    name = name or checkpoint.stem
    target_dir = webui_dir / "models" / "Stable-diffusion"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{name}{checkpoint.suffix}"
    if target.resolve() != checkpoint.resolve():
        shutil.copyfile(checkpoint, target)
    clip_dir = target_dir / f"{name}.clip"
    write_clip_folder(clip_dir, _clip_config(_text_fields(state, metadata)))
    (target_dir / f"{name}.yaml").write_text(YAML.format(
        unet=unet, vae=vae, attention_resolutions=[2 ** level for level in unet.attention_levels],
        channel_mult=list(unet.channel_mult), vae_mult=list(vae.ch_mult), clip_dir=json.dumps(str(clip_dir.resolve()))),
        encoding="utf-8")
    fill_hf_cache(Path(hf_home) if hf_home else Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")))
    return target
