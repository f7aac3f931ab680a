"""Training the micro SD v1 (``ldznet world train-sd``) on pre-rendered micro-world scenes.

Stage ``vae``: the KL autoencoder on train scenes (L1 + MSE + a tiny KL, random flips); then the
latent space is rescaled inside the weights so that the posterior means times SD's 0.18215 have
unit std, exactly as SD v1's latents do. Stage ``text`` (recipes with ``text_steps`` > 0): no CLIP
weights exist here, so the CLIP text tower is pre-trained as CLIP was, contrastively against an
image tower, which reads the VAE's latents (what the UNet and the heads see; cheap at 16 x 16).
Stage ``unet``: the UNet on eps-prediction over frozen-VAE latents, SD's scaled-linear schedule,
uniform timesteps and ``uncond_p`` empty captions, with the stage-``text`` tower frozen as SD v1
freezes CLIP's (or, without that stage, a random text tower trained jointly); EMA weights are saved.

Outputs in DIR: ``vae_stage.safetensors`` and ``text_stage.safetensors`` (a later run of a
following stage alone starts from them), ``micro-sd-v1.safetensors`` (single-file SD v1, fp16),
``vae_reconstructions.png`` (val scenes over their reconstructions) and ``train_sd_log.json``
(losses every ``log_every`` steps, timings, probes), rewritten as training goes so that it can be
polled. Stage unet can also start from a micro SD file's VAE and text tower (and UNet), write EMA
snapshots every K steps into ``snapshots/`` and stop at a time budget (:class:`UNetOptions`), which
``tools/binding_run.py`` uses to measure text binding against training length.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoint_io import read_state_dict, write_safetensors
from ..defaults import DEFAULT_SD_NAME
from ..errors import CheckpointError, LdznetError
from ..outputs import check_outputs, same_file, writable_folder
from ..precision import autocast, dtype_named
from ..sd.checkpoint import load_stable_diffusion, save_stable_diffusion
from ..sd.model import StableDiffusion
from ..sd.schedule import NoiseSchedule
from ..sd.text import TextEncoder
from ..sd.tokenizer import tokenize
from ..sd.unet import UNetModel
from ..sd.vae import SCALE_FACTOR, AutoencoderKL, VAEConfig
from ..train.ema import EMA
from ..train.logs import StageLog
from ..train.schedule import lr_factor
from .data import render_scene_set
from .micro import MICRO_TEXT, MICRO_UNET, MICRO_VAE, MicroRecipe, micro_text_config
from .scenes import split_seeds
from .spec import VOCABULARY

STAGES = ("vae", "text", "unet")
VAE_FILE = "vae_stage.safetensors"
TEXT_FILE = "text_stage.safetensors"
SD_FILE = DEFAULT_SD_NAME
LOG_FILE = "train_sd_log.json"
SNAPSHOT_DIR = "snapshots"
GRID_FILE = "vae_reconstructions.png"
PROBE_TIMESTEPS = (100, 400, 700)
_ENCODE_BATCH = 64
WORLD_VOCABULARY = frozenset(VOCABULARY.phrase_words())  # recorded in every SD file the stages write


def stage_dtype(device: torch.device, name: str = "auto", stage: str = "vae") -> torch.dtype:
    """Autocast dtype of ``stage`` for ``--dtype``: "float32" (no autocast), "bfloat16", or "auto".

    "auto" is bfloat16 on CUDA devices with bf16. On CPUs with native bf16 (AVX512-BF16/AMX) it
    is bfloat16 for the convolution-bound VAE, which it speeds up, and float32 for the
    attention-bound UNet, whose attention backward PyTorch runs slower in bf16 on the CPU (README,
    "Regenerating"); else float32.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        native = (device.type == "cpu" and stage == "vae" and torch.backends.mkldnn.is_available()
                  and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if native else torch.float32
    if name not in ("float32", "bfloat16"):
        raise LdznetError(f"unknown training dtype {name!r}; expected auto, float32 or bfloat16")
    return dtype_named(name)


def to_model_images(images: Tensor) -> Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S] in [-1, 1], on the input's device, contiguous
    (a channels-last view would carry through the convolutions into GroupNorm's slow path)."""
    return images.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0


def platform_record() -> dict:
    """What a run's numbers depend on besides the recipe and the seeds: the instruction set of the
    CPU kernels (bf16 rounds differently per set) and the versions of the libraries that render the
    scenes and train on them."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "numpy": np.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__}


def _fit(name: str, model: nn.Module, recipe: MicroRecipe, steps: int, lr: float, warmup: int,
         step_loss: Callable[[int], dict[str, Tensor]], entry: dict, log: StageLog, progress: bool,
         after_step: Callable[[int], None] | None = None, deadline: float | None = None) -> None:
    """The shared loop: AdamW, warm-up + cosine LR, gradient clipping, running means logged every
    ``log_every`` steps. ``step_loss(step)`` returns named scalar losses, the optimised one as "loss".
    ``deadline`` (a ``time.perf_counter()`` value): stop after the first step that ends past it, logged
    as ``stopped_at_step`` (the LR schedule stays the one of ``steps``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, steps, "cosine", recipe.min_lr_ratio))
    running: dict[str, Tensor] = {}
    start, cpu_start, count, done = time.perf_counter(), time.process_time(), 0, 0
    for step in tqdm(range(steps), desc=name, unit="step", disable=not progress):
        losses = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step)
        for key, value in losses.items():  # summed on the device: no host sync per step
            running[key] = running.get(key, 0) + value.detach().float()
        count, done = count + 1, step + 1
        stop = deadline is not None and done < steps and time.perf_counter() >= deadline
        if count == recipe.log_every or done == steps or stop:
            means = {k: round(float(v) / count, 6) for k, v in running.items()}
            entry["log"].append({"step": done, **means, "lr": scheduler.get_last_lr()[0],
                                 "seconds": round(time.perf_counter() - start, 2),
                                 "cpu_seconds": round(time.process_time() - cpu_start, 2)})
            log.write()
            running, count = {}, 0
        if stop:
            entry["stopped_at_step"] = done
            break
    entry.update(seconds=round(time.perf_counter() - start, 2), cpu_seconds=round(time.process_time() - cpu_start, 2))
    entry["seconds_per_step"] = round(entry["seconds"] / max(1, done), 4)


def vae_losses(x: Tensor, y: Tensor, mean: Tensor, logvar: Tensor, mse_weight: float,
               kl_weight: float) -> dict[str, Tensor]:
    """L1 + mse_weight * MSE + kl_weight * KL for images x, reconstructions y [B, 3, H, W] and
    posterior moments [B, C, h, w]. The KL is summed per image and divided by the image's element
    count, so its weight means what ldm's means against a per-image summed reconstruction loss."""
    l1, mse = (y - x).abs().mean(), ((y - x) ** 2).mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    return {"loss": l1 + mse_weight * mse + kl_weight * kl / x[0].numel(), "l1": l1, "mse": mse, "kl": kl}


def train_vae(images: Tensor, recipe: MicroRecipe, device: torch.device, dtype: torch.dtype,
              log: StageLog, progress: bool = False) -> AutoencoderKL:
    """Stage 1 on uint8 images [N, S, S, 3] (any device), random ``vae_crop`` px crops, flipped at
    random: a trained VAE in float32, eval mode, its latent space not yet rescaled (see
    :func:`rescale_latents_`)."""
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(MICRO_VAE).to(device).train()
    generator = torch.Generator().manual_seed(recipe.seed)
    b, crop = recipe.vae_batch, min(recipe.vae_crop, images.shape[1])
    latent = (b, vae.config.embed_dim, crop // vae.downsample_factor, crop // vae.downsample_factor)

    def step_loss(step: int) -> dict[str, Tensor]:
        index = torch.randint(len(images), (b,), generator=generator)
        corner = torch.randint(images.shape[1] - crop + 1, (2, b, 1, 1), generator=generator)
        flip = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1).to(device)
        noise = torch.randn(latent, generator=generator).to(device)
        span = torch.arange(crop)
        rows, cols = corner[0] + span.view(1, -1, 1), corner[1] + span.view(1, 1, -1)  # [B, crop, 1], [B, 1, crop]
        patches = images[tuple(i.to(images.device) for i in (index.view(-1, 1, 1), rows, cols))]
        x = to_model_images(patches.to(device))
        x = torch.where(flip, x.flip(-1), x)
        with autocast(device, dtype):
            mean, logvar = vae.encode_moments(x)
            y = vae.decode(mean + (0.5 * logvar).exp() * noise)
        return vae_losses(x, y.float(), mean.float(), logvar.float(), recipe.vae_mse_weight, recipe.vae_kl_weight)

    _fit("vae", vae, recipe, recipe.vae_steps, recipe.vae_lr, recipe.vae_warmup, step_loss,
         log.stage("vae"), log, progress)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_means(vae: AutoencoderKL, images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Posterior means [N, C, h, w] (float32, unscaled, on the VAE's device) of uint8 images [N, S, S, 3]."""
    device = vae.quant_conv.weight.device
    out = []
    for i in range(0, len(images), _ENCODE_BATCH):
        with autocast(device, dtype):
            out.append(vae.encode(to_model_images(images[i:i + _ENCODE_BATCH].to(device))).float())
    return torch.cat(out)


@torch.no_grad()
def rescale_latents_(vae: AutoencoderKL, images: Tensor) -> tuple[float, float]:
    """Rescale the VAE's latent space in place by ``a`` so that ``std(mean * SCALE_FACTOR) == 1``
    on ``images`` (uint8 [N, S, S, 3]); returns (std of the means before, a).

    mean' = a mean and logvar' = logvar + 2 ln a (quant_conv), and post_quant_conv divides its
    input by a, so decode(encode(x)) is unchanged and SD's standard scale factor fits the model.
    """
    std = float(encode_means(vae, images).std())
    a = 1.0 / (SCALE_FACTOR * std)
    dim = vae.config.embed_dim
    vae.quant_conv.weight[:dim] *= a
    vae.quant_conv.bias[:dim] *= a
    vae.quant_conv.bias[dim:] += 2.0 * math.log(a)
    vae.post_quant_conv.weight /= a
    return std, a


def load_vae_stage(path: Path) -> AutoencoderKL:
    """The VAE written by stage vae (float32, eval mode, no gradients)."""
    state = read_state_dict(path)
    vae = AutoencoderKL(VAEConfig.from_state_dict(state))
    vae.load_state_dict(state, strict=True)
    return vae.eval().requires_grad_(False)


class LatentImageTower(nn.Module):
    """CLIP's image tower for stage text: scaled latents [B, 4, h, w] -> embeddings [B, dim]."""

    def __init__(self, latent_channels: int, dim: int):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())

        self.body = nn.Sequential(block(latent_channels, 64, 1), block(64, 64, 1), block(64, 128, 2),
                                  block(128, 128, 1), block(128, 256, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(256, dim))

    def forward(self, latents: Tensor) -> Tensor:
        return self.body(latents)


def pooled_text(text: TextEncoder, tokens: Tensor) -> Tensor:
    """CLIP's text feature before its projection: the last hidden state at each prompt's first
    end-of-text token (the largest id), [B, dim]. Tokens after the last one are cut: the causal
    mask keeps them from changing it."""
    eot = tokens.argmax(dim=-1)
    hidden = text.transformer(input_ids=tokens[:, :int(eot.max()) + 1]).last_hidden_state
    return hidden[torch.arange(len(tokens), device=tokens.device), eot]


def contrastive_loss(image: Tensor, text: Tensor, log_scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE of matching rows of image and text embeddings [B, D] (any norm)."""
    logits = log_scale.exp().clamp(max=100.0) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train_text(latents: Tensor, tokens: Tensor, recipe: MicroRecipe, device: torch.device, dtype: torch.dtype,
               log: StageLog, progress: bool = False) -> TextEncoder:
    """Stage text on scaled latents [N, 4, h, w] and caption token ids [N, 77] (same device): the
    text tower, float32, eval mode, no gradients. Latents are flipped at random (captions say
    nothing of left and right)."""
    torch.manual_seed(recipe.seed + 2)
    text = TextEncoder.from_config(micro_text_config())
    dim = text.context_dim
    model = nn.ModuleDict({"text": text, "image": LatentImageTower(latents.shape[1], dim),
                           "projection": nn.Linear(dim, dim, bias=False)}).to(device).train()
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))  # CLIP's initial temperature
    model.register_parameter("log_scale", log_scale)
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    b = min(recipe.text_batch, len(latents))

    def step_loss(step: int) -> dict[str, Tensor]:
        index = torch.randperm(len(latents), generator=generator)[:b].to(device)  # distinct: no false negatives
        flip = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1).to(device)
        x = torch.where(flip, latents[index].flip(-1), latents[index])
        with autocast(device, dtype):
            image = model["image"](x)
            caption = model["projection"](pooled_text(model["text"], tokens[index]))
        return {"loss": contrastive_loss(image.float(), caption.float(), log_scale)}

    _fit("text", model, recipe, recipe.text_steps, recipe.text_lr, recipe.text_warmup, step_loss,
         log.stage("text"), log, progress)
    return text.eval().requires_grad_(False)


def save_text_stage(path: Path, text: TextEncoder) -> None:
    """Write stage text's tower (SD's text-encoder key layout) for :func:`load_text_stage`."""
    write_safetensors(path, text.text_state_dict(), {"text": "micro CLIP text tower, SD layout"})


def load_text_stage(path: Path) -> TextEncoder:
    """The text tower written by stage text (float32, eval mode, no gradients)."""
    text = TextEncoder.from_config(micro_text_config())
    text.load_text_state_dict(read_state_dict(path))
    return text.eval().requires_grad_(False)


SnapshotWriter = Callable[[int, UNetModel, TextEncoder], None]


def train_unet(latents: Tensor, tokens: Tensor, recipe: MicroRecipe, device: torch.device, dtype: torch.dtype,
               log: StageLog, progress: bool = False, text: TextEncoder | None = None, unet: UNetModel | None = None,
               snapshot_every: int = 0, on_snapshot: SnapshotWriter | None = None,
               deadline: float | None = None, train_text: bool = True) -> tuple[UNetModel, TextEncoder]:
    """Stage unet on scaled latents [N, 4, h, w] and caption token ids [N, 77] (same device): the
    EMA UNet and text encoder, float32, eval mode. ``text``: a pre-trained tower, kept frozen
    (returned as given); None trains a random one with the UNet, or with ``train_text`` False keeps
    that random one frozen. ``unet``: the weights to start from
    (trained further in place), None a random UNet. Every ``snapshot_every`` steps ``on_snapshot``
    gets the step count and the EMA weights so far (CPU modules, reused between calls)."""
    torch.manual_seed(recipe.seed + 1)
    model = nn.ModuleDict({"unet": UNetModel(MICRO_UNET) if unet is None else unet.requires_grad_(True)})
    if text is None:
        model["text"] = TextEncoder.from_config(micro_text_config()).requires_grad_(train_text)
    model.to(device).train()
    ema = EMA(model, recipe.ema_decay, count_from=0)
    encode = model["text"] if text is None else text.to(device)
    schedule = NoiseSchedule()
    empty = tokenize([""]).to(device)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    b = recipe.unet_batch
    averaged: list[nn.ModuleDict] = []  # the EMA weights' CPU copy for snapshots, made on the first

    def step_loss(step: int) -> dict[str, Tensor]:
        index = torch.randint(len(latents), (b,), generator=generator)
        t = torch.randint(schedule.num_timesteps, (b,), generator=generator)
        drop = (torch.rand(b, generator=generator) < recipe.uncond_p).view(b, 1).to(device)
        noise = torch.randn((b, *latents.shape[1:]), generator=generator).to(device)
        index = index.to(device)
        z_t = schedule.q_sample(latents[index], t, noise)
        with autocast(device, dtype):
            eps = model["unet"](z_t, t.to(device), encode(torch.where(drop, empty, tokens[index])))
        if not recipe.unet_min_snr_gamma:
            return {"loss": F.mse_loss(eps.float(), noise)}
        a = schedule.alphas_at(t.to(device))
        snr = a / (1 - a)
        weight = snr.clamp(max=recipe.unet_min_snr_gamma) / snr
        return {"loss": (weight * (eps.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()}

    def after_step(step: int) -> None:
        ema.update(model)
        if on_snapshot is not None and snapshot_every > 0 and (step + 1) % snapshot_every == 0:
            if not averaged:
                averaged.append(copy.deepcopy(model).cpu().eval().requires_grad_(False))
            snapshot = ema.copy_to(averaged[0])
            on_snapshot(step + 1, snapshot["unet"], snapshot["text"] if text is None else text)

    _fit("unet", model, recipe, recipe.unet_steps, recipe.unet_lr, recipe.unet_warmup, step_loss,
         log.stage("unet"), log, progress, after_step, deadline)
    ema.copy_to(model).eval().requires_grad_(False)
    return model["unet"], model["text"] if text is None else text


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, images: Tensor) -> float:
    """Mean per-image PSNR (dB, on the 0..255 scale) of decode(encode(x)) for uint8 images [N, S, S, 3]."""
    x = to_model_images(images.cpu())
    y = torch.cat([vae.decode(encode_means(vae, images[i:i + _ENCODE_BATCH])).cpu()
                   for i in range(0, len(images), _ENCODE_BATCH)]).clamp(-1, 1)
    mse = ((y - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((-10 * mse.log10()).mean())


@torch.no_grad()
def eps_probe(model: StableDiffusion, latents: Tensor, captions: Sequence[str],
              timesteps: Sequence[int] = PROBE_TIMESTEPS,
              variants: Mapping[str, Sequence[str]] | None = None,
              per_sample: bool = False) -> dict[str, dict[str, float | list[float]]]:
    """UNet eps-MSE on scaled latents [N, 4, h, w] at each timestep, with each latent's caption and
    with "": ``{"100": {"caption": mse, "empty": mse}, ...}``, and with each of ``variants`` (a name ->
    one caption per latent) under its name; ``per_sample``: each latent's MSE [N] instead of their mean,
    so that paired differences get a standard error. The noise is the same for every call and every
    caption set (whatever the recipe's seed), so that the probes of two runs compare. Conditional below
    unconditional means the text conditioning carries information."""
    generator = torch.Generator().manual_seed(0)
    contexts = {"caption": model.encode_text(list(captions)), "empty": model.encode_text([""] * len(captions))}
    contexts |= {name: model.encode_text(list(texts)) for name, texts in (variants or {}).items()}
    out = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        steps = torch.full((len(latents),), t, dtype=torch.long)
        z_t = model.schedule.q_sample(latents, steps, noise)
        out[str(t)] = {}
        for name, ctx in contexts.items():
            eps = model.predict_noise(z_t, steps, ctx).float()
            if per_sample:
                out[str(t)][name] = [round(float(e), 6) for e in (eps - noise).square().mean(dim=(1, 2, 3))]
            else:
                out[str(t)][name] = round(float(F.mse_loss(eps, noise)), 6)
    return out


@torch.no_grad()
def reconstruction_grid(vae: AutoencoderKL, images: Tensor) -> np.ndarray:
    """uint8 [2S, N*S, 3]: images (uint8 [N, S, S, 3]) on top, their reconstructions below."""
    y = vae.decode(encode_means(vae, images)).clamp(-1, 1)
    recon = ((y.permute(0, 2, 3, 1).cpu() + 1) * 127.5).round().to(torch.uint8)
    return torch.cat([torch.cat(list(images.cpu()), dim=1), torch.cat(list(recon), dim=1)], dim=0).numpy()


def recipe_stages(recipe: MicroRecipe) -> tuple[str, ...]:
    """The stages ``recipe`` trains, in order: stage text only where ``text_steps`` > 0."""
    return tuple(s for s in STAGES if s != "text" or recipe.text_steps > 0)


TEXT_TOWERS = ("keep", "train", "random")


@dataclass(frozen=True)
class UNetOptions:
    """How stage unet runs beyond its recipe. ``init_model``: a micro SD v1 file whose VAE (kept as it is)
    the stage starts from (stages vae and text do not run), and with ``init_unet`` its UNet too (else a
    random one). ``text_tower`` (with ``init_model``; one of TEXT_TOWERS): "keep" its text tower, frozen;
    "train" a random one with the UNet, as the recipe's stage unet does; "random" that random tower,
    frozen untrained. ``snapshot_every`` > 0: the EMA weights every that
    many steps as DIR/snapshots/micro-sd-v1-stepNNNNNN.safetensors. ``time_budget_s``: stop the stage
    after the step that ends past that many seconds from the run's start (the final file and probes are
    still written)."""

    init_model: Path | None = None
    init_unet: bool = False
    snapshot_every: int = 0
    time_budget_s: float | None = None
    text_tower: str = "keep"

    def __post_init__(self) -> None:
        if self.text_tower not in TEXT_TOWERS:
            raise LdznetError(f"unknown text tower {self.text_tower!r}; expected one of {', '.join(TEXT_TOWERS)}")
        if self.text_tower != "keep" and self.init_model is None:
            raise LdznetError(f"text tower {self.text_tower!r} needs an initial model; without one the recipe "
                              "decides the text tower")


def snapshot_path(out: Path, step: int) -> Path:
    """Where stage unet writes its snapshot after ``step`` steps."""
    return out / SNAPSHOT_DIR / f"{Path(SD_FILE).stem}-step{step:06d}.safetensors"


def load_micro_sd(path: Path) -> StableDiffusion:
    """A micro SD v1 file (float32, eval mode); CheckpointError for any other model."""
    model = load_stable_diffusion(path)
    config = model.text_encoder.transformer.config
    if (model.unet.config != MICRO_UNET or model.vae.config != MICRO_VAE
            or any(getattr(config, k) != v for k, v in MICRO_TEXT.items())):
        raise CheckpointError(f"{path}: not a micro SD v1 (its UNet, VAE or text tower has other sizes); "
                              "expected a file written by ldznet world train-sd")
    return model


def _checked_stages(out: Path, recipe: MicroRecipe, stages: Sequence[str] | None,
                    options: UNetOptions) -> tuple[tuple[str, ...], bool]:
    """The stages to run and whether stage unet needs DIR's text stage, or an error naming what is missing."""
    available = recipe_stages(recipe)
    if options.init_model is not None:
        if stages is not None and tuple(stages) != ("unet",):
            raise LdznetError(f"an initial model starts stage unet alone; got stages {list(stages)}")
        return ("unet",), False
    if options.init_unet:
        raise LdznetError("starting from a model's UNet needs the model file (init_model)")
    stages = available if stages is None else tuple(stages)
    if not stages or any(s not in available for s in stages):
        raise LdznetError(f"unknown or no training stages {list(stages)}; recipe {recipe.name!r} has "
                          f"{', '.join(available)}")
    twice = next((s for s in stages if stages.count(s) > 1), None)
    if twice:
        raise LdznetError(f"stage {twice} given twice in {list(stages)}; give each stage once")
    needs_text = "unet" in stages and "text" in available and "text" not in stages
    for stage, name, needed in (("vae", VAE_FILE, "vae" not in stages), ("text", TEXT_FILE, needs_text)):
        if needed and not (out / name).is_file():
            raise CheckpointError(f"{out / name} not found: run stage {stage} first (--stages {','.join(available)})")
    return stages, needs_text


def _check_earlier_run(out: Path, stages: Sequence[str]) -> None:
    """LdznetError when ``out`` holds a file that running ``stages`` writes (the grid; the final model and
    its snapshots, a stage's file) but no log: an earlier run's log is what shows its files are the run's
    to replace (the log itself is checked as it is read, :class:`~ldznet_ext.train.logs.StageLog`). The
    stage files a later stage reads are its inputs."""
    if (out / LOG_FILE).exists():
        return
    written = {"vae": [VAE_FILE], "text": [TEXT_FILE], "unet": [SD_FILE]}
    found = [name for name in (GRID_FILE, *(n for stage in stages for n in written[stage])) if (out / name).exists()]
    if "unet" in stages and (out / SNAPSHOT_DIR).is_dir():
        found += sorted(f"{SNAPSHOT_DIR}/{entry.name}" for entry in (out / SNAPSHOT_DIR).iterdir())
    if found:
        raise LdznetError(f"{out}: holds {found[0]}, which no earlier `ldznet world train-sd` run wrote (there is no "
                          f"{LOG_FILE}); give another output folder or move it away")


def snapshot_bytes() -> int:
    """About the size of one snapshot file: a micro SD v1's tensors in fp16 (the file's header adds about 1 %)."""
    with torch.device("meta"):
        parts = (UNetModel(MICRO_UNET), AutoencoderKL(MICRO_VAE), TextEncoder.from_config(micro_text_config()))
    return 2 * sum(tensor.numel() for part in parts for tensor in part.state_dict().values())


def _check_snapshot_space(out: Path, recipe: MicroRecipe, options: UNetOptions) -> None:
    """LdznetError when stage unet's snapshots would not fit in the free space of ``out``'s disk, which they
    would fill hours into the run (each is a whole micro SD)."""
    if options.snapshot_every <= 0:
        return
    count, one = recipe.unet_steps // options.snapshot_every, snapshot_bytes()
    free = shutil.disk_usage(out).free
    if count * one > free:
        raise LdznetError(f"snapshots every {options.snapshot_every} steps: {count} files of {one / 1e6:.1f} MB, "
                          f"{count * one / 1e9:.2f} GB in all, and {out} has {free / 1e9:.2f} GB free; "
                          "snapshot less often")


def _check_not_written(model: Path, out: Path) -> None:
    """LdznetError when a run into ``out`` would write over ``model``, the file it starts from: the final
    model, a stage file, the log or the grid (``outputs.check_outputs``), or a snapshot (every file of
    ``out/snapshots``)."""
    check_outputs([out / name for name in (SD_FILE, VAE_FILE, TEXT_FILE, LOG_FILE, GRID_FILE)],
                  {model: "the model the run starts from (the initial model)"})
    if same_file(model.parent, out / SNAPSHOT_DIR):
        raise LdznetError(f"{model}: the run's snapshots in {out / SNAPSHOT_DIR} would write over the model the run "
                          "starts from (the initial model); give another output folder")


def _run_unet_stage(out: Path, latents: Tensor, tokens: Tensor, recipe: MicroRecipe, device: torch.device,
                    dtype: torch.dtype, log: StageLog, progress: bool, vae: AutoencoderKL,
                    frozen_text: TextEncoder | None, unet: UNetModel | None, options: UNetOptions,
                    deadline: float | None) -> None:
    """Stage unet (see :func:`train_unet`) with its snapshots, then the final file, saved with ``vae``."""
    vae = vae.cpu()
    saved_text = None if frozen_text is None else copy.deepcopy(frozen_text).cpu()

    def write_snapshot(step: int, unet: UNetModel, text: TextEncoder) -> None:
        path = snapshot_path(out, step)
        path.parent.mkdir(exist_ok=True)
        save_stable_diffusion(StableDiffusion(unet, vae, saved_text or text, resolution=recipe.image_size,
                                              vocabulary=WORLD_VOCABULARY), path, dtype=torch.float16)
        log.data["snapshots"].append({"step": step, "file": path.relative_to(out).as_posix()})
        log.write()

    unet, text = train_unet(latents, tokens, recipe, device, dtype, log, progress, frozen_text, unet,
                            options.snapshot_every, write_snapshot, deadline, options.text_tower != "random")
    # the image side recorded in the file is the one zero-shot masks then run at by default, and its
    # vocabulary lets a mask say "no match" for a word the model never saw instead of guessing
    sd = StableDiffusion(unet.cpu(), vae, text.cpu(), resolution=recipe.image_size, vocabulary=WORLD_VOCABULARY)
    save_stable_diffusion(sd, out / SD_FILE, dtype=torch.float16)


def train_sd(out: Path, recipe: MicroRecipe, device: str | torch.device = "cpu", dtype: str = "auto",
             stages: Sequence[str] | None = None, workers: int | None = None, progress: bool = False,
             options: UNetOptions = UNetOptions()) -> dict:
    """Run ``stages`` of ``recipe`` (None: all it has, or stage unet alone from ``options.init_model``)
    into directory ``out`` (created); returns the log's content."""
    stages, needs_text = _checked_stages(out, recipe, stages, options)
    if options.init_model is not None:
        _check_not_written(options.init_model, out)
    _check_earlier_run(out, stages)
    init = None if options.init_model is None else load_micro_sd(options.init_model)
    device = torch.device(device)
    amp = {stage: stage_dtype(device, dtype, stage) for stage in recipe_stages(recipe)}
    writable_folder(out)  # after every argument check, before the rendering
    if "unet" in stages:
        _check_snapshot_space(out, recipe, options)
    start = time.perf_counter()
    deadline = None if options.time_budget_s is None else start + options.time_budget_s
    log = StageLog(out / LOG_FILE, {"recipe": recipe.to_dict(), "device": str(device), "platform": platform_record(),
                                  "dtype": {k: str(v).replace("torch.", "") for k, v in amp.items()},
                                  "init": {"model": None if init is None else str(options.init_model),
                                           "unet": options.init_unet, "text_tower": options.text_tower},
                                  "snapshots": []})
    train = render_scene_set(split_seeds("train", recipe.scenes), recipe.image_size, workers, progress)
    val = render_scene_set(split_seeds("val", recipe.probe_scenes), recipe.image_size, 1)
    log.data["render_seconds"] = round(time.perf_counter() - start, 2)
    # two runs that part despite equal hashes trained the same scenes on different kernels
    log.data["train_images_sha256"] = hashlib.sha256(train.images.tobytes()).hexdigest()
    log.write()
    images = torch.from_numpy(train.images).to(device)
    if "vae" in stages:
        vae = train_vae(images, recipe, device, amp["vae"], log, progress)
        std, scale = rescale_latents_(vae, images[:recipe.scale_images])
        log.data["stages"]["vae"].update(latent_std=round(std, 6), latent_rescale=round(scale, 6))
        write_safetensors(out / VAE_FILE, vae.state_dict(), {"vae": asdict(vae.config), "latent_rescale": scale})
        vae = vae.cpu()
    else:
        vae = load_vae_stage(out / VAE_FILE) if init is None else init.vae
    log.data["probes"]["vae_psnr"] = round(vae_psnr(vae, torch.from_numpy(val.images)), 3)
    Image.fromarray(reconstruction_grid(vae, torch.from_numpy(val.images[:8]))).save(out / GRID_FILE)
    log.write()
    run_text = "text" in stages
    if run_text or "unet" in stages:
        begin = time.perf_counter()
        latents = encode_means(vae.to(device), images, amp["vae"]) * SCALE_FACTOR
        tokens = tokenize(list(train.captions)).to(device)
        encode_seconds = round(time.perf_counter() - begin, 2)
    text = None if init is None or options.text_tower != "keep" else init.text_encoder
    if run_text:
        text = train_text(latents, tokens, recipe, device, amp["text"], log, progress)
        save_text_stage(out / TEXT_FILE, text)
    elif needs_text:
        text = load_text_stage(out / TEXT_FILE)
    if "unet" in stages:
        unet = init.unet if init is not None and options.init_unet else None
        _run_unet_stage(out, latents, tokens, recipe, device, amp["unet"], log, progress, vae, text, unet, options,
                        deadline)
        log.data["stages"]["unet"]["encode_seconds"] = encode_seconds
        shipped = load_stable_diffusion(out / SD_FILE)
        val_latents = encode_means(shipped.vae, torch.from_numpy(val.images)) * SCALE_FACTOR
        log.data["probes"]["eps_mse"] = eps_probe(shipped, val_latents, val.captions)
    log.data["seconds"] = round(time.perf_counter() - start, 2)
    log.write()
    return log.data
