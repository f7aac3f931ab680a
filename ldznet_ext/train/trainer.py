"""Training a segmentation head (LD-ZNet, ZNet, RGBNet) on a frozen SD v1 backbone.

One step: draw a batch of (image, phrase, mask) samples (absent phrases, with empty masks,
included by default), z = VAE posterior mean x scale factor (cached per image), the phrase's text
context (cached per prompt), for LD-ZNet the SD UNet's features of blocks 6-10 at t ~ U[300, 500)
on q_sample(z, t, noise) (``segmenter.sd_features``, as at inference), then the head's
full-resolution logits, BCE with logits against the mask, AdamW with a linear warm-up, gradient
clipping and an EMA of the head (the saved head is the EMA).

The one-channel mask decoder ``final`` (a conv and three x2 up-sampling stages after ``out``)
decides how fast a head learns. With torch's default initialisation its gain from ``out`` to the
logits is about 1e-4, so the gradient reaching ``out`` and the SD-initialised UNet is negligible:
the head learns only the logit bias and predicts background everywhere for a long time.
``decoder_init="identity"`` (the default) starts it instead as nearest-neighbour x8 up-sampling
whose SiLUs work near their linear part (``identity_decoder_``), a gain of about 1.3; the layer
shapes stay the official ones. Layers that do not come from the SD UNet (``out``, ``final``,
LD-ZNet's ``attn3``, ``norm_sd`` and attention pools, RGBNet's stem) get ``new_lr_scale`` times
the learning rate.

Every step's randomness comes from a generator seeded by (seed, step), and images and prompts
are encoded one at a time, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import CheckpointError, LdznetError
from ..heads import save_head
from ..images import to_model_input
from ..modeling.build import HeadConfig, build_head, init_from_sd_unet
from ..sd.model import StableDiffusion
from ..sd.schedule import OFFICIAL_TIMESTEPS
from ..segmenter import sd_features
from .data import TEMPLATES, Sample, Source, fit_square

CHECKPOINT = "last.pt"
HEAD = "head.safetensors"
LOG = "log.jsonl"
NEW_LAYER_PREFIXES = ("out.", "final.", "stem.")
NEW_LAYER_PARTS = (".attn3.", ".norm_sd.", ".attentionpool2D.")
_RESUME_FREE = ("steps", "save_every", "log_every")  # what a resumed run may change
TEXT_CACHE = 1024  # prompts whose context is kept (240 MB at SD v1's 77 x 768)
MASK_PRIOR = 0.1
"""Initial mask probability of the identity decoder (about the mean mask fraction of the data)."""
DECODER_OFFSET = 4.0
"""Where the identity decoder's SiLUs work: their slope is 1.05 at 4 (0.5 at 0)."""


@dataclass(frozen=True)
class TrainConfig:
    """What a run does. lr: AdamW rate of the SD-initialised layers; new_lr_scale: multiplier for
    the layers trained from scratch; warmup: steps of linear warm-up; schedule: "constant" or
    "cosine" (to 0 at ``steps``) after it; ema: EMA decay (with ldm's (1+n)/(10+n) ramp);
    pos_weight: BCE weight of mask pixels; decoder_init: "identity" or "default" (torch's, as the
    official code); templates: "plain" (the phrase as is) or "phrasecut";
    negatives: also train on absent phrases (empty masks)."""

    arch: str = "ldznet"
    data: str = "world:train:10000"
    resolution: int = 128
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    new_lr_scale: float = 10.0
    warmup: int = 100
    schedule: str = "constant"
    weight_decay: float = 0.01
    ema: float = 0.999
    grad_clip: float = 1.0
    pos_weight: float = 1.0
    decoder_init: str = "identity"
    templates: str = "plain"
    negatives: bool = True
    seed: int = 0
    save_every: int = 500
    log_every: int = 10

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise LdznetError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.decoder_init not in ("identity", "default"):
            raise LdznetError(f"decoder_init must be 'identity' or 'default', got {self.decoder_init!r}")
        if self.templates not in TEMPLATES:
            raise LdznetError(f"templates must be one of {', '.join(TEMPLATES)}, got {self.templates!r}")
        if self.resolution % 64:
            raise LdznetError(f"resolution must be a multiple of 64, got {self.resolution}")
        if min(self.steps, self.batch_size, self.save_every, self.log_every) < 1 or self.warmup < 0:
            raise LdznetError("steps, batch size, save and log intervals must be >= 1 and warm-up >= 0")
        if not 0.0 <= self.ema < 1.0:
            raise LdznetError(f"EMA decay must be in [0, 1), got {self.ema}")

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def identity_decoder_(decoder: nn.Sequential, prior: float = MASK_PRIOR, offset: float = DECODER_OFFSET) -> None:
    """Make a ZNet ``final`` decoder x8 nearest-neighbour up-sampling of its input, in place: 3x3
    convs become centre taps, 2x2 transposed convs ones. The first conv adds ``offset`` so that
    every SiLU works near its linear part (its slope at 0 is 0.5, so six of them would pass on
    only 1/64 of the signal); the last bias brings a zero input to logit(prior)."""
    with torch.no_grad():
        for layer in decoder:
            if isinstance(layer, nn.ConvTranspose2d):
                layer.weight.fill_(1.0)
                layer.bias.zero_()
            elif isinstance(layer, nn.Conv2d):
                layer.weight.zero_()
                layer.weight[:, :, layer.kernel_size[0] // 2, layer.kernel_size[1] // 2] = 1.0
                layer.bias.zero_()
        decoder[0].bias.fill_(offset)
        at_zero = decoder(torch.zeros(1, decoder[0].in_channels, 1, 1, device=decoder[0].weight.device)).mean()
        decoder[-1].bias.fill_(math.log(prior / (1.0 - prior)) - float(at_zero))


def training_head(backbone: StableDiffusion, arch: str, resolution: int, seed: int = 0,
                  decoder_init: str = "identity") -> tuple[nn.Module, HeadConfig]:
    """A head shaped like ``backbone``'s UNet (one output channel) for ``resolution`` px inputs,
    initialised from the SD UNet's weights as the official training starts; the layers that SD
    lacks are drawn from ``seed`` (the global RNG is left alone), the decoder optionally made an
    identity up-sampler (see the module docstring). On the CPU, float32."""
    config = HeadConfig(arch, unet=replace(backbone.unet.config, out_channels=1),
                        latent_size=resolution // backbone.downsample_factor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(config)
    init_from_sd_unet(head, {k: v.float().cpu() for k, v in backbone.unet.state_dict().items()})
    if decoder_init == "identity":
        identity_decoder_(head.final)
    return head, config


def is_new_layer(name: str) -> bool:
    """Whether a head parameter is trained from scratch (not copied from the SD UNet)."""
    return name.startswith(NEW_LAYER_PREFIXES) or any(part in f".{name}" for part in NEW_LAYER_PARTS)


class EMA:
    """Exponential moving average of a module's float tensors, with ldm's warm-up:
    decay_n = min(decay, (1 + n) / (10 + n)) at update n."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = module.state_dict()
        torch._foreach_lerp_(list(self.shadow.values()), [state[k].float() for k in self.shadow], 1.0 - decay)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def module(self, config: HeadConfig) -> nn.Module:
        """A new head holding a copy of the averaged weights (float32, eval mode, no gradients)."""
        with torch.device("meta"):
            head = build_head(config)
        head.load_state_dict({k: v.clone() for k, v in self.shadow.items()}, assign=True)
        return head.eval().requires_grad_(False)


def lr_factor(step: int, warmup: int, steps: int, schedule: str) -> float:
    """Multiplier of the learning rate at optimiser step ``step`` (0-based)."""
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule == "cosine" and step >= warmup:
        factor *= 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


class Trainer:
    """Trains one head on ``source`` with a frozen ``backbone``; state lives in ``run_dir``.

    ``amp_dtype`` (bfloat16 or float16, CUDA only) runs the head under autocast; the head's
    weights, the optimiser and the EMA stay float32.
    """

    def __init__(self, backbone: StableDiffusion, source: Source, config: TrainConfig, run_dir: str | os.PathLike,
                 amp_dtype: torch.dtype | None = None, model_name: str = "model"):
        self.backbone = backbone.eval().requires_grad_(False)
        self.source = source
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = backbone.device
        if amp_dtype is not None and self.device.type != "cuda":
            raise LdznetError(f"mixed precision ({amp_dtype}) is for CUDA; train in float32 on {self.device.type}")
        self.amp_dtype = amp_dtype
        self.model_name = model_name
        self.head, self.head_config = training_head(backbone, config.arch, config.resolution, config.seed,
                                                      config.decoder_init)
        self.head.to(self.device).train()
        groups = {False: [], True: []}
        for name, parameter in self.head.named_parameters():
            groups[is_new_layer(name)].append(parameter)
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[False], "lr": config.lr}, {"params": groups[True], "lr": config.lr * config.new_lr_scale}],
            lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup, config.steps, config.schedule))
        fp16 = amp_dtype == torch.float16
        # torch < 2.3 has the scaler only as torch.cuda.amp.GradScaler
        self.scaler = (torch.amp.GradScaler("cuda", enabled=fp16) if hasattr(torch.amp, "GradScaler")
                       else torch.cuda.amp.GradScaler(enabled=fp16))
        self.ema = EMA(self.head, config.ema)
        self._pos_weight = torch.tensor(config.pos_weight, device=self.device)
        self.step = 0
        self.losses: list[float] = []
        self._z: dict[str, Tensor] = {}
        self._context: dict[str, Tensor] = {}

    # -- data ------------------------------------------------------------------------------

    def draw(self, rng: np.random.Generator) -> list[tuple[Sample, str]]:
        """A batch of (sample at the training resolution, prompt)."""
        batch, templates = [], TEMPLATES[self.config.templates]
        while len(batch) < self.config.batch_size:
            for _ in range(100):
                candidates = self.source[int(rng.integers(len(self.source)))].samples(self.config.negatives)
                if candidates:
                    break
            else:
                raise LdznetError(f"{self.source.description}: 100 examples in a row had no usable phrase")
            sample = fit_square(candidates[int(rng.integers(len(candidates)))], self.config.resolution, rng)
            batch.append((sample, templates[int(rng.integers(len(templates)))].format(sample.phrase)))
        return batch

    @torch.no_grad()
    def _latent(self, sample: Sample) -> Tensor:
        if sample.key is not None and sample.key in self._z:
            return self._z[sample.key]
        pixels = to_model_input(sample.image, (self.config.resolution,) * 2).to(self.device, self.backbone.dtype)
        z = self.backbone.encode_image(pixels).float()
        if sample.key is not None:
            self._z[sample.key] = z
        return z

    @torch.no_grad()
    def _text(self, prompt: str) -> Tensor:
        if prompt not in self._context:
            if len(self._context) >= TEXT_CACHE:
                self._context.clear()
            self._context[prompt] = self.backbone.encode_text([prompt]).float()
        return self._context[prompt]

    # -- one step --------------------------------------------------------------------------

    def loss(self, batch: list[tuple[Sample, str]], generator: torch.Generator) -> Tensor:
        """Mean BCE of the head's logits against the masks (differentiable in the head only)."""
        arch = self.config.arch
        context = torch.cat([self._text(prompt) for _, prompt in batch])
        target = torch.from_numpy(np.stack([s.mask for s, _ in batch])).to(self.device, torch.float32)[:, None]
        features = None
        if arch == "rgbnet":
            inputs = torch.cat([to_model_input(s.image, (self.config.resolution,) * 2) for s, _ in batch])
            inputs = inputs.to(self.device)
        else:
            inputs = torch.cat([self._latent(s) for s, _ in batch])
        if arch == "ldznet":
            t = torch.randint(*OFFICIAL_TIMESTEPS, (len(batch),), generator=generator)
            noise = torch.randn(inputs.shape, generator=generator)
            with torch.no_grad(), self._autocast():
                features = sd_features(self.backbone, inputs.to(self.backbone.dtype), context.to(self.backbone.dtype),
                                       t.to(self.device), noise.to(self.device), self.head_config.sd_blocks)
        with self._autocast():
            logits = self.head(inputs, context) if features is None else self.head(inputs, context, features)
        logits = logits.float()
        if logits.shape[-2:] != target.shape[-2:]:  # backbones whose VAE does not downsample by 8
            logits = F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners=False)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=self._pos_weight)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def train_step(self) -> float:
        """One optimiser step; returns the batch's loss."""
        rng = np.random.default_rng([self.config.seed, self.step])
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        loss = self.loss(self.draw(rng), generator)
        value = loss.item()
        if not math.isfinite(value):
            raise LdznetError(f"step {self.step}: the loss is {value}; lower the learning rate or use fp32")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.head.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update(self.head)
        self.step += 1
        return value

    # -- run, save, resume -----------------------------------------------------------------

    def run(self, progress: bool | None = None) -> float:
        """Train up to ``config.steps``, saving every ``save_every`` steps and at the end; returns
        the mean loss of the last ``log_every`` steps."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        progress = sys.stderr.isatty() if progress is None else progress
        start = time.perf_counter()
        with tqdm(total=self.config.steps, initial=self.step, disable=not progress, desc="train",
                  dynamic_ncols=True) as bar:
            while self.step < self.config.steps:
                self.losses = (self.losses + [self.train_step()])[-self.config.log_every:]
                bar.update(1)
                if self.step % self.config.log_every == 0:
                    self._log({"step": self.step, "loss": self.recent_loss, "lr": self.scheduler.get_last_lr()[0],
                               "seconds": round(time.perf_counter() - start, 3)})
                    bar.set_postfix(loss=f"{self.recent_loss:.4f}")
                if self.step % self.config.save_every == 0 or self.step == self.config.steps:
                    self.save()
        return self.recent_loss

    @property
    def recent_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")

    def _log(self, record: dict) -> None:
        with open(self.run_dir / LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")

    def save(self) -> None:
        """Write RUN_DIR/last.pt (everything needed to resume) and RUN_DIR/head.safetensors (EMA)."""
        state = {"config": asdict(self.config), "step": self.step, "losses": self.losses,
                 "model": self.head.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": {"torch": torch.get_rng_state()}}
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        tmp = self.run_dir / f".{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / CHECKPOINT)
        c = self.config
        save_head(self.ema.module(self.head_config), self.head_config, self.run_dir / HEAD, training={
            "steps": self.step, "data": self.source.description, "sd_model": self.model_name,
            "resolution": c.resolution, "batch_size": c.batch_size, "lr": c.lr, "new_lr_scale": c.new_lr_scale,
            "warmup": c.warmup, "schedule": c.schedule, "ema": c.ema, "pos_weight": c.pos_weight,
            "decoder_init": c.decoder_init,
            "templates": c.templates, "negatives": c.negatives, "seed": c.seed, "final_loss": self.recent_loss})

    def resume(self) -> None:
        """Continue from RUN_DIR/last.pt; only ``steps`` and the save and log intervals may differ."""
        path = self.run_dir / CHECKPOINT
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except (OSError, RuntimeError) as error:
            raise CheckpointError(f"{path}: cannot resume from it ({error})") from error
        saved = TrainConfig.from_dict(state["config"])
        changed = [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(self.config, f.name)!r}" for f in fields(TrainConfig)
                   if f.name not in _RESUME_FREE and getattr(saved, f.name) != getattr(self.config, f.name)]
        if changed:
            raise LdznetError(f"{path}: the run was started with other settings ({'; '.join(changed)})")
        self.head.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
