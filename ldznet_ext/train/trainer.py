"""Training a segmentation head (LD-ZNet, ZNet, RGBNet) on a frozen SD v1 backbone.

One step: draw a batch of (image, phrase, mask) samples (absent phrases, with empty masks,
included by default), z = VAE posterior mean x scale factor (cached per image), the phrase's text
context (cached per prompt), for LD-ZNet the SD UNet's features of blocks 6-10 at t ~ U[300, 500)
on q_sample(z, t, noise) (``segmenter.sd_features``, as at inference), then the head's
full-resolution logits, BCE with logits against the mask (plus, with ``dice_weight``, a per-sample
soft Dice loss), AdamW with a linear warm-up, gradient clipping and an EMA of the head (the saved
head is the EMA).

The one-channel mask decoder ``final`` (a conv and three x2 up-sampling stages after ``out``)
decides how fast a head learns. With torch's default initialisation its gain from ``out`` to the
logits is about 1e-4, so the gradient reaching ``out`` and the SD-initialised UNet is negligible:
the head learns only the logit bias and predicts background everywhere for a long time.
``decoder_init="identity"`` (the default) starts it instead as nearest-neighbour x8 up-sampling
whose SiLUs work near their linear part (``identity_decoder_``), a gain of about 1.3; the layer
shapes stay the official ones. Layers that do not come from the SD UNet (``out``, ``final``,
LD-ZNet's ``attn3``, ``norm_sd`` and attention pools, RGBNet's stem) get ``new_lr_scale`` times
the learning rate, and with ``fast_cross_attention`` so do the text cross-attention layers, which
on the micro world about halves the steps to a given loss (docs/training.md, "Settings").

Each process reads its own shard of the examples as a stream (``data.stream.iterate_examples``, read
ahead by ``workers`` processes) in an order that depends on (seed, rank, processes, position) alone
(``stream.ShardOrder``); an example's phrase, crop and prompt template depend on (seed, rank,
position), so worker counts change nothing. Unreadable examples are logged and skipped, as are
those without a usable phrase. Each micro-batch's noise and timesteps come from (seed, step,
micro-batch, rank), and images and prompts are encoded one at a time, so a run resumed at the saved
data positions (each process's next unconsumed one) repeats an uninterrupted one exactly. Under
torchrun DistributedDataParallel averages the gradients; all processes keep the same head,
optimiser and EMA, and rank 0 alone logs and writes files.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..backbones.base import Conditioning
from ..data.examples import Example, Sample, Source
from ..data.negatives import borrowable_phrases, named_keys
from ..data.stream import iterate_examples, log_error
from ..errors import CheckpointError, LdznetError
from ..heads import load_head, save_head
from ..images import to_model_input
from ..modeling.build import HeadConfig, build_head, init_from_sd_unet
from ..outputs import remove_abandoned_temporaries, replacing
from ..precision import PRECISIONS, autocast, autocast_dtype
from ..sd.model import StableDiffusion
from ..sd.schedule import OFFICIAL_TIMESTEPS
from ..tap import sd_features
from . import distributed
from .augment import TEMPLATES, fit_square
from .config import TrainConfig
from .ema import EMA
from .logs import LOG, RunLog
from .schedule import lr_factor
from .stream import PositionView, ShardOrder, example_rng

__all__ = ["CHECKPOINT", "EMA", "HEAD", "LOG", "TrainConfig", "Trainer", "identity_decoder_", "is_cross_attention",
           "init_config", "is_new_layer", "training_head"]

PRESENCE_CHECK_STEPS = 50  # steps after which a presence output that met no absent phrase is warned about
CHECKPOINT = "last.pt"
HEAD = "head.safetensors"
NEW_LAYER_PREFIXES = ("out.", "final.", "stem.", "presence.")
NEW_LAYER_PARTS = (".attn3.", ".norm_sd.", ".attentionpool2D.", ".sd_concat.")
CROSS_ATTENTION_PART = ".attn2."
# what a resumed run may change: lengths and intervals, and how (not what) it computes
_RESUME_FREE = ("steps", "save_every", "log_every", "precision", "grad_checkpoint", "workers")


def _reason(error: BaseException) -> str:
    """An error of torch's reader as part of one line: its type when it says nothing (a KeyError's bare
    key), at most 300 characters, and "..." where it is cut."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if isinstance(error, KeyError) or not text else text
    return text if len(text) <= 300 else text[:297] + "..."


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """A run's ``last.pt`` as the dict :meth:`Trainer.save` wrote, read without executing pickled code
    (``weights_only``: tensors, containers and plain values only); CheckpointError naming ``path`` for
    a missing, truncated or foreign file, or one without the run's settings."""
    try:
        with warnings.catch_warnings():  # torch's own advice on a foreign pickle is to drop weights_only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: cannot resume from it: it holds Python objects other than tensors and plain "
                              "values, which are never loaded (loading them could run code)") from error
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise CheckpointError(f"{path}: cannot resume from it: the file is empty") from error
        raise CheckpointError(f"{path}: cannot resume from it ({_reason(error)})") from error
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: not a last.pt written by ldznet train (no settings in it)")
    return state
AMP_DTYPES = {name: autocast_dtype(name) for name in PRECISIONS}  # None: no autocast
MAX_UNUSABLE = 100  # positions in a row without a usable sample that stop a run
TEXT_CACHE = 1024  # prompts whose context is kept (240 MB at SD v1's 77 x 768)
LATENT_CACHE = 8192  # images whose latent is kept (the micro world's 4,000; 300 MB at 384 px)
MASK_PRIOR = 0.1
"""Initial mask probability of the identity decoder (about the mean mask fraction of the data)."""
DECODER_OFFSET = 4.0
"""Where the identity decoder's SiLUs work: their slope is 1.05 at 4 (0.5 at 0)."""


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
                  decoder_init: str = "identity", sd_fusion: str = "attention", presence: bool = False,
                  init: str | os.PathLike = "") -> tuple[nn.Module, HeadConfig]:
    """A head shaped like ``backbone``'s UNet (one output channel) for ``resolution`` px inputs,
    initialised from the SD UNet's weights as the official training starts, or with ``init`` from
    that head file, whose config it keeps (``init_config``); the layers that neither has (a
    ``presence`` output among them) are drawn from ``seed`` (the global RNG is left alone), the
    decoder optionally made an identity up-sampler (see the module docstring). On the CPU, float32."""
    config = HeadConfig(arch, unet=replace(backbone.unet.config, out_channels=1),
                        latent_size=resolution // backbone.downsample_factor, sd_fusion=sd_fusion, presence=presence)
    loaded = None
    if init:
        loaded, saved = load_head(init)
        config = init_config(config, saved, init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = build_head(config)
    if loaded is not None:  # a presence output the file lacks keeps its fresh weights
        head.load_state_dict(loaded.state_dict(), strict=not presence or saved.presence)
        return head, config
    init_from_sd_unet(head, {k: v.float().cpu() for k, v in backbone.unet.state_dict().items()})
    if decoder_init == "identity":
        identity_decoder_(head.final)
    return head, config


def init_config(config: HeadConfig, saved: HeadConfig, path: str | os.PathLike) -> HeadConfig:
    """The config of a head trained from the head file ``path`` (config ``saved``) in a run that
    would otherwise train ``config``: the run decides the shape (architecture, UNet, latent side, SD
    fusion) and whether there is a presence output, and ``saved`` must agree; the file decides the
    rest (SD blocks, timestep, presence level), which its weights were trained or calibrated for.
    LdznetError when the shapes differ or the file has a presence output ``config`` lacks."""
    differ = [f"{name} {getattr(saved, name)!r} (training: {getattr(config, name)!r})"
              for name in ("arch", "unet", "latent_size", "sd_fusion")
              if getattr(saved, name) != getattr(config, name)]
    if differ:
        raise LdznetError(f"init {path}: the head differs from the one this run trains on this SD model and "
                          f"resolution: {'; '.join(differ)}")
    if saved.presence and not config.presence:
        raise LdznetError(f"init {path}: the head has a presence output; train it with presence_weight > 0")
    return replace(saved, presence=config.presence)


def soft_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over samples of 1 - (2 |p g| + 1) / (|p| + |g| + 1) for logits and masks [B, 1, H, W].

    Per sample, so every mask weighs the same whatever its area; the +1 keeps an empty mask's loss
    defined (it then pushes every probability to 0)."""
    p, dims = torch.sigmoid(logits), (1, 2, 3)
    return (1.0 - (2.0 * (p * target).sum(dims) + 1.0) / (p.sum(dims) + target.sum(dims) + 1.0)).mean()


def is_new_layer(name: str) -> bool:
    """Whether a head parameter is trained from scratch (not copied from the SD UNet)."""
    return name.startswith(NEW_LAYER_PREFIXES) or any(part in f".{name}" for part in NEW_LAYER_PARTS)


def is_cross_attention(name: str) -> bool:
    """Whether a head parameter belongs to a text cross-attention layer (SD's ``attn2``)."""
    return CROSS_ATTENTION_PART in f".{name}"


class Trainer:
    """Trains one head on ``source`` with a frozen ``backbone``; state lives in ``run_dir``.

    ``config.precision`` bf16 or fp16 (CUDA only) runs the head under autocast; the head's weights,
    the optimiser and the EMA stay float32. Inside a torch.distributed process group (see
    ``distributed.init_from_env``) the head is trained data-parallel.
    """

    def __init__(self, backbone: StableDiffusion, source: Source, config: TrainConfig, run_dir: str | os.PathLike,
                 model_name: str = "model", resuming: bool = False):
        """``resuming``: :meth:`resume` follows, whose last.pt holds every weight, so ``config.init`` is
        not read again (the file may be gone or rewritten since the run started); the head config it
        decided is read from the run's own head file."""
        self.backbone = backbone.eval().requires_grad_(False)
        self.source = source
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = backbone.device
        self.amp_dtype = AMP_DTYPES[config.precision]
        if self.amp_dtype is not None and self.device.type != "cuda":
            raise LdznetError(f"mixed precision ({config.precision}) is for CUDA; train in fp32 on {self.device.type}")
        self.model_name = model_name
        self.rank, self.world_size = distributed.world()
        self.order = ShardOrder(len(source), config.seed, self.rank, self.world_size, source.description)
        self.position = 0  # this process's next data position not yet consumed (not the prefetched one)
        self.unreadable = 0  # examples skipped in this run because they could not be read
        self._unusable = 0  # consumed positions in a row without a usable sample
        self.absent_drawn = 0  # samples of absent phrases drawn in this run (the presence output's negatives)
        self._examples: Iterator[tuple[int, Example]] | None = None
        # a resumed run's own head file has the init's config (resume() then loads every weight)
        init = (self.run_dir / HEAD if config.init else "") if resuming else config.init
        if resuming and config.init and not (self.run_dir / HEAD).is_file():
            raise LdznetError(f"{self.run_dir / HEAD} is missing: a run started from --init reads its head's shape "
                              "from it to resume; put the run's head.safetensors back")
        self.head, self.head_config = training_head(backbone, config.arch, config.resolution, config.seed,
                                                      config.decoder_init, config.sd_fusion,
                                                      config.presence_weight > 0, init)
        self.head.to(self.device).train()
        if config.freeze_head:  # the presence output alone learns; the frozen rest builds no graph
            self.head.requires_grad_(False)
            self.head.presence.requires_grad_(True)
        self.head.set_gradient_checkpointing(config.grad_checkpoint)
        self.model: nn.Module = self.head
        if self.world_size > 1:
            # gradients as views into DDP's all-reduce buckets: no second 3.7 GB copy at SD v1 size
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.head, device_ids=device_ids, gradient_as_bucket_view=True)
        groups = {False: [], True: []}
        for name, parameter in self.head.named_parameters():
            if not parameter.requires_grad:
                continue
            fast = is_new_layer(name) or (config.fast_cross_attention and is_cross_attention(name))
            groups[fast].append(parameter)
        lr = config.base_lr(self.world_size)
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[False], "lr": lr}, {"params": groups[True], "lr": lr * config.new_lr_scale}],
            lr=lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup, config.steps, config.schedule))
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=config.plateau_factor, patience=config.plateau_patience)
        fp16 = self.amp_dtype == torch.float16
        # torch < 2.3 has the scaler only as torch.cuda.amp.GradScaler
        self.scaler = (torch.amp.GradScaler("cuda", enabled=fp16) if hasattr(torch.amp, "GradScaler")
                       else torch.cuda.amp.GradScaler(enabled=fp16))
        self.ema = EMA(self.head, config.ema)
        self._pos_weight = torch.tensor(config.pos_weight, device=self.device)
        self.step = 0
        self.losses: list[float] = []  # of the last log_every steps
        self.window: list[float] = []  # since the last plateau check
        self._z: dict[str, Tensor] = {}
        self._context: dict[str, Conditioning] = {}

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files (rank 0)."""
        return self.rank == 0

    # -- data ------------------------------------------------------------------------------

    def draw(self) -> list[tuple[Sample, str]]:
        """A micro-batch of (sample at the training resolution, prompt) from the next usable
        positions of this process's data order; consumes them (``self.position``)."""
        if self._examples is None:  # one reader across steps: its workers keep reading ahead
            view = PositionView(self.source, self.order)
            self._examples = iterate_examples(view, itertools.count(self.position), self.config.workers,
                                              self._unreadable)
        batch, templates = [], TEMPLATES[self.config.templates]
        drawn: list[tuple[Example, np.random.Generator]] = []
        while len(batch) < self.config.batch_size:
            position, example = next(self._examples)
            candidates = example.samples(self.config.negatives)
            if not candidates:
                self._skip(position)
                continue
            self.position, self._unusable = position + 1, 0
            rng = example_rng(self.config.seed, self.rank, position)
            sample = fit_square(candidates[int(rng.integers(len(candidates)))], self.config.resolution, rng)
            batch.append((sample, templates[int(rng.integers(len(templates)))].format(sample.phrase)))
            drawn.append((example, rng))
        if self.config.negative_prob:
            batch = [self._random_negative(i, sample, drawn) or (sample, prompt)
                     for i, (sample, prompt) in enumerate(batch)]
        self.absent_drawn += sum(not sample.present for sample, _ in batch)
        return batch

    def _random_negative(self, index: int, sample: Sample,
                         drawn: list[tuple[Example, np.random.Generator]]) -> tuple[Sample, str] | None:
        """With probability ``negative_prob``, sample ``index`` made absent: a phrase that another image of
        the micro-batch shows and its own image does not name, an empty mask (None: kept as it is)."""
        example, rng = drawn[index]  # the example's own stream, past its phrase, crop and prompt
        if rng.random() >= self.config.negative_prob:
            return None
        others = borrowable_phrases((other for j, (other, _) in enumerate(drawn) if j != index), named_keys(example))
        if not others:
            return None
        phrase = others[int(rng.integers(len(others)))]
        templates = TEMPLATES[self.config.templates]
        negative = replace(sample, phrase=phrase, mask=np.zeros_like(sample.mask))
        return negative, templates[int(rng.integers(len(templates)))].format(phrase)

    def _unreadable(self, position: int, error: Exception) -> None:
        self.unreadable += 1
        log_error(self.order.index(position), error)  # the sources' errors name the file
        self._skip(position)

    def _skip(self, position: int) -> None:
        self.position = position + 1
        self._unusable += 1
        if self._unusable >= MAX_UNUSABLE:
            raise LdznetError(f"{self.source.description}: {MAX_UNUSABLE} examples in a row were unreadable "
                              "or had no usable phrase")

    def close_reader(self) -> None:
        """Stop the reader (and its workers); the next draw restarts it at ``self.position``."""
        if self._examples is not None:
            self._examples.close()
            self._examples = None

    @torch.no_grad()
    def _latent(self, sample: Sample) -> Tensor:
        if sample.key is not None and sample.key in self._z:
            return self._z[sample.key]
        pixels = to_model_input(sample.image, (self.config.resolution,) * 2).to(self.device, self.backbone.dtype)
        z = self.backbone.encode_image(pixels).float()
        if sample.key is not None:
            if len(self._z) >= LATENT_CACHE:  # a large data set is seen once per epoch: keep memory flat
                self._z.clear()
            self._z[sample.key] = z
        return z

    @torch.no_grad()
    def _text(self, prompt: str) -> Conditioning:
        if prompt not in self._context:
            if len(self._context) >= TEXT_CACHE:
                self._context.clear()
            self._context[prompt] = self.backbone.encode_text([prompt]).to(dtype=torch.float32)
        return self._context[prompt]

    # -- one step --------------------------------------------------------------------------

    def loss(self, batch: list[tuple[Sample, str]], generator: torch.Generator) -> Tensor:
        """Mean BCE of the head's logits against the masks, plus ``dice_weight`` x the mean soft
        Dice loss, plus ``presence_weight`` x the BCE of the presence logits against "the mask is
        not empty" (with ``freeze_head`` that last term alone); differentiable in the head only."""
        arch = self.config.arch
        conditioning = Conditioning.cat([self._text(prompt) for _, prompt in batch])
        context = conditioning.context
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
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                features = sd_features(self.backbone, inputs.to(self.backbone.dtype),
                                       conditioning.to(dtype=self.backbone.dtype), t.to(self.device),
                                       noise.to(self.device), self.head_config.sd_blocks)
        c = self.config
        with autocast(self.device, self.amp_dtype):
            args = (inputs, context) if features is None else (inputs, context, features)
            output = self.model(*args, with_presence=True) if c.presence_weight else self.model(*args)
        logits, presence = output if c.presence_weight else (output, None)
        loss = torch.zeros((), device=self.device)
        if presence is not None:
            present = target.flatten(1).amax(dim=1)
            loss = c.presence_weight * F.binary_cross_entropy_with_logits(presence.float(), present)
        if c.freeze_head:
            return loss
        logits = logits.float()
        if logits.shape[-2:] != target.shape[-2:]:  # backbones whose VAE does not downsample by 8
            logits = F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss + F.binary_cross_entropy_with_logits(logits, target, pos_weight=self._pos_weight)
        if c.dice_weight:
            loss = loss + c.dice_weight * soft_dice_loss(logits, target)
        return loss

    def train_step(self) -> float:
        """One optimiser step over ``accumulate`` micro-batches per process; returns the step's mean
        loss over all micro-batches and processes."""
        accumulate = self.config.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accumulate):
            index = (self.step * accumulate + micro) * self.world_size + self.rank
            seed = np.random.default_rng([self.config.seed, index]).integers(2 ** 62)
            generator = torch.Generator().manual_seed(int(seed))
            # DDP all-reduces in the backward pass; only the last micro-batch's need be
            last = micro == accumulate - 1
            with nullcontext() if last or self.model is self.head else self.model.no_sync():
                loss = self.loss(self.draw(), generator)
                self.scaler.scale(loss if accumulate == 1 else loss / accumulate).backward()
            total += loss.item()
        value = distributed.mean_over_ranks([total / accumulate], self.device)[0]
        if not math.isfinite(value):
            raise LdznetError(f"step {self.step}: the loss is {value}; lower the learning rate or use fp32")
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.head.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.config.schedule != "plateau" or self.step < self.config.warmup:
            self.scheduler.step()  # with "plateau", after warm-up the rate is the plateau scheduler's alone
        self.ema.update(self.head)
        self.step += 1
        self.window.append(value)
        if self.config.schedule == "plateau" and self.step % self.config.plateau_every == 0:
            self.plateau.step(float(np.mean(self.window)))
            self.window = []
        return value

    @property
    def lr(self) -> float:
        """The current rate of the SD-initialised layers."""
        return float(self.optimizer.param_groups[0]["lr"])

    # -- run, save, resume -----------------------------------------------------------------

    def run(self, progress: bool | None = None) -> float:
        """Train up to ``config.steps``, saving every ``save_every`` steps and at the end; returns
        the mean loss of the last ``log_every`` steps."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_abandoned_temporaries(self.run_dir, {CHECKPOINT, HEAD, LOG})
        progress = self.is_main and (sys.stderr.isatty() if progress is None else progress)
        log = RunLog(self.run_dir, self.step) if self.is_main else None
        start, first = time.perf_counter(), self.step
        samples = self.config.total_batch(self.world_size)
        try:
            with tqdm(total=self.config.steps, initial=self.step, disable=not progress, desc="train",
                      dynamic_ncols=True) as bar:
                while self.step < self.config.steps:
                    self.losses = (self.losses + [self.train_step()])[-self.config.log_every:]
                    bar.update(1)
                    if self.step == first + PRESENCE_CHECK_STEPS:
                        self._check_negatives()
                    if self.step % self.config.log_every == 0:
                        seconds = time.perf_counter() - start
                        bar.set_postfix(loss=f"{self.recent_loss:.4f}", lr=f"{self.lr:.3g}")
                        if log is not None:
                            log.write({"step": self.step, "loss": self.recent_loss, "lr": self.lr,
                                       "seconds": round(seconds, 3),
                                       "samples_per_second": round((self.step - first) * samples / seconds, 3)})
                    if self.step % self.config.save_every == 0 or self.step == self.config.steps:
                        self.save()
                if self.step == first:  # a finished run resumed: its head is written again, as after a step
                    self.save()
        finally:
            self.close_reader()
            if log is not None:
                log.close()
        skipped = round(distributed.mean_over_ranks([float(self.unreadable)], self.device)[0] * self.world_size)
        if skipped and self.is_main:
            print(f"{self.source.description}: skipped {skipped} unreadable example(s) (warnings above)",
                  file=sys.stderr)
        return self.recent_loss

    def _check_negatives(self) -> None:
        """Warn when a presence output has only met present phrases: the data names no absent phrase."""
        if not self.config.presence_weight:  # every rank returns here alike, so none waits in the sum below
            return
        absent = round(distributed.mean_over_ranks([float(self.absent_drawn)], self.device)[0] * self.world_size)
        if not absent and self.is_main:
            warnings.warn(f"no absent phrase in the first {PRESENCE_CHECK_STEPS} steps' samples: the presence "
                          f"output learns that every phrase is present; {self.source.description} names no absent "
                          "phrase, sample some with --negative-prob (CLIPSeg used 0.2)", UserWarning, stacklevel=2)

    @property
    def recent_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")

    def save(self) -> None:
        """Write RUN_DIR/last.pt (everything needed to resume) and RUN_DIR/head.safetensors (EMA).
        Every process must call it (the RNG states are gathered); rank 0 writes."""
        mine = {"torch": torch.get_rng_state(), "position": self.position}
        if torch.cuda.is_available():
            mine["cuda"] = torch.cuda.get_rng_state_all()
        states = distributed.gather_objects(mine)
        if self.is_main:
            self._write(states)
        distributed.barrier()

    def _write(self, states: list[dict]) -> None:
        state = {"config": asdict(self.config), "sd_model": self.model_name, "source": self.source.description,
                 "step": self.step, "losses": self.losses, "window": self.window,
                 "model": self.head.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "plateau": self.plateau.state_dict(), "scaler": self.scaler.state_dict(),
                 "data": {"positions": [r["position"] for r in states], "world_size": self.world_size},
                 "rng": {"torch": [r["torch"] for r in states]}}
        if "cuda" in states[0]:
            state["rng"]["cuda"] = [r["cuda"] for r in states]
        # The head first: a last.pt is never newer than the head beside it (a run stopped while its final
        # head is written resumes and writes it again, not a finished run with an older head).
        c = self.config
        save_head(self.ema.module(self.head_config), self.head_config, self.run_dir / HEAD, training={
            "steps": self.step, "data": self.source.description, "sd_model": self.model_name,
            "resolution": c.resolution, "batch_size": c.batch_size, "accumulate": c.accumulate,
            "processes": self.world_size, "lr": c.lr, "scale_lr": c.scale_lr, "new_lr_scale": c.new_lr_scale,
            "fast_cross_attention": c.fast_cross_attention,
            "warmup": c.warmup, "schedule": c.schedule, "ema": c.ema, "pos_weight": c.pos_weight,
            "dice_weight": c.dice_weight,
            "decoder_init": c.decoder_init, "precision": c.precision,
            "templates": c.templates, "negatives": c.negatives,
            **({"negative_prob": c.negative_prob} if c.negative_prob else {}), "seed": c.seed,
            "final_loss": self.recent_loss,
            **({"presence_weight": c.presence_weight, "init": Path(c.init).name, "freeze_head": c.freeze_head}
               if c.presence_weight or c.init else {})})
        with replacing(self.run_dir / CHECKPOINT) as temporary:  # Ctrl-C or a full disk keeps the previous one
            torch.save(state, temporary)

    def resume(self) -> None:
        """Continue from RUN_DIR/last.pt at each process's saved data position; only ``steps``, the
        save and log intervals, precision, gradient checkpointing and ``workers`` may differ. A
        different number of processes is allowed but changes the data each step draws (the run no
        longer repeats an uninterrupted one)."""
        path = self.run_dir / CHECKPOINT
        state = read_checkpoint(path, self.device)
        saved = TrainConfig.from_dict(state["config"])
        changed = [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(self.config, f.name)!r}"
                   for f in fields(TrainConfig)
                   if f.name not in _RESUME_FREE and getattr(saved, f.name) != getattr(self.config, f.name)]
        # what the run reads beyond its settings (absent from an older version's last.pt)
        for key, now in (("sd_model", self.model_name), ("source", self.source.description)):
            if key in state and state[key] != now:
                changed.append(f"{key}: {state[key]!r} -> {now!r}")
        if changed:
            raise LdznetError(f"{path}: the run was started with other settings ({'; '.join(changed)})")
        try:  # a tampered or foreign file: every key and shape is read inside, none escapes as a traceback
            data = state.get("data", {})
            positions = data.get("positions")  # absent from an older version's last.pt: the data order restarts
            if self.is_main and (positions is None or data.get("world_size", 1) != self.world_size):
                written = "without data positions" if positions is None else f"by {data['world_size']} process(es)"
                warnings.warn(f"{path} was written {written}, resuming with {self.world_size} process(es): the data "
                              "order differs from the uninterrupted run's", UserWarning, stacklevel=2)
            self._restore(state, positions)
            if self.step > self.config.steps:
                raise LdznetError(f"{path}: the run is at step {self.step}, past --steps {self.config.steps}; give "
                                  f"--steps {self.step} or more")
        except LdznetError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            raise CheckpointError(f"{path}: cannot resume from it, its state does not fit this run "
                                  f"({_reason(error)})") from error

    def _restore(self, state: dict, positions: list | None) -> None:
        """Load the weights, optimiser, schedules, RNG states, step and data position of a read last.pt."""
        self.head.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.plateau.load_state_dict(state["plateau"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]  # one state per process that wrote it; a new process count reuses them cyclically
        torch.set_rng_state(rng["torch"][self.rank % len(rng["torch"])].cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"][self.rank % len(rng["cuda"])]])
        self.step = int(state["step"])
        self.position = int(positions[self.rank % len(positions)]) if positions else 0  # cyclically, as the RNG
        self.close_reader()
        self.losses = list(state["losses"])
        self.window = list(state["window"])
