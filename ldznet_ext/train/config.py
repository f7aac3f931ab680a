"""What a training run does (``TrainConfig``), the official recipe as a preset, and config files.

A run's settings are layered, later layers winning: the defaults (or, with ``--resume``, the
settings the run was started with), a preset (``preset: official`` in the file or ``--preset``),
the config file (``--config run.yaml``, YAML or JSON, keys = ``TrainConfig`` field names), the
command-line flags.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import LdznetError, special_file_kind
from ..limits import (ACCUMULATE, EMA_DECAY, FACTOR, GRAD_CLIP, LEARNING_RATE, LOSS_WEIGHT, LR_SCALE, NEGATIVE_PROB,
                      PATIENCE, RESOLUTION, SEED, STEP_INTERVAL, STEPS, TRAIN_BATCH_SIZE, WARMUP, WEIGHT_DECAY, WORKERS,
                      number_from_text, shown)
from ..modeling.build import ARCHITECTURES
from ..modeling.ldznet import FUSIONS
from ..precision import PRECISIONS
from .augment import TEMPLATES

SCHEDULES = ("constant", "cosine", "plateau")
FIELD_LIMITS = {
    "resolution": RESOLUTION, "steps": STEPS, "batch_size": TRAIN_BATCH_SIZE, "accumulate": ACCUMULATE,
    "lr": LEARNING_RATE, "new_lr_scale": LR_SCALE, "warmup": WARMUP, "plateau_factor": FACTOR,
    "plateau_patience": PATIENCE, "plateau_every": STEP_INTERVAL, "weight_decay": WEIGHT_DECAY, "ema": EMA_DECAY,
    "grad_clip": GRAD_CLIP, "pos_weight": LOSS_WEIGHT, "dice_weight": LOSS_WEIGHT, "presence_weight": LOSS_WEIGHT,
    "negative_prob": NEGATIVE_PROB, "seed": SEED, "workers": WORKERS, "save_every": STEP_INTERVAL,
    "log_every": STEP_INTERVAL}
"""The bound of every numeric field, held by the command line's flags and by config files alike."""


@dataclass(frozen=True)
class TrainConfig:
    """What a run does.

    batch_size: samples per process and micro-batch; accumulate: micro-batches per optimiser step (total
    batch = batch_size x accumulate x processes). lr: AdamW rate of the SD-initialised layers, or with
    scale_lr the rate per sample of the total batch (ldm's rule: the rate used is lr x total batch);
    new_lr_scale: multiplier for the layers trained from scratch; fast_cross_attention: the text
    cross-attention layers (``attn2``) get that multiplier too (an SD model that barely uses its text,
    as the micro one, hands the head cross-attention that must relearn fast); warmup: steps of linear
    warm-up; schedule after it: "constant", "cosine" (to 0 at ``steps``) or "plateau" (torch's
    ReduceLROnPlateau on the mean training loss of every ``plateau_every`` steps, times
    ``plateau_factor`` after ``plateau_patience`` windows without improvement); ema: EMA decay (with
    ldm's (1+n)/(10+n) ramp); pos_weight: BCE weight of mask pixels; dice_weight: weight of a soft Dice
    loss added to the BCE (per sample, so a small object counts as much as the sky, as in the per-sample
    mIoU); decoder_init: "identity" or "default" (torch's, as the official code); sd_fusion: LD-ZNet's
    "attention" or the "concat" ablation; templates: "plain" (the phrase as is) or "phrasecut";
    negatives: also train on the data's absent phrases (empty masks); negative_prob: CLIPSeg's negative
    sampling, for data that names no absent phrase (PhraseCut): with this probability a sample's phrase is
    replaced by a phrase of another image of its micro-batch that its own image does not name, with an
    empty mask (CLIPSeg's PhraseCut loader, ``negative_prob``; an image's unnamed things can make a false
    negative, as there); precision: "fp32", or "bf16"/"fp16" autocast
    (CUDA; the frozen SD model is loaded in it, the head's weights stay fp32); grad_checkpoint:
    recompute the head's activations in the backward pass; workers: processes that read examples ahead
    (0: read in the training process; the results are the same either way); presence_weight: > 0 gives
    the head a presence output, trained with that weight x BCE(presence logit, mask not empty) (it needs
    ``negatives`` or ``negative_prob``: without absent phrases every target is "present"); init: a
    head file of the same architecture and backbone to start from (the saved head keeps its SD blocks,
    timestep and presence level; a presence output it lacks is drawn from ``seed``); freeze_head: train
    the presence output alone, every other tensor of the ``init`` head stays as it is (its maps do not
    change).
    """

    arch: str = "ldznet"
    data: str = "world:train:10000"
    resolution: int = 128
    steps: int = 2000
    batch_size: int = 8
    accumulate: int = 1
    lr: float = 1e-4
    scale_lr: bool = False
    new_lr_scale: float = 10.0
    fast_cross_attention: bool = False
    warmup: int = 100
    schedule: str = "constant"
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    plateau_every: int = 1000
    weight_decay: float = 0.01
    ema: float = 0.999
    grad_clip: float = 1.0
    pos_weight: float = 1.0
    dice_weight: float = 0.0
    decoder_init: str = "identity"
    sd_fusion: str = "attention"
    templates: str = "plain"
    negatives: bool = True
    negative_prob: float = 0.0
    precision: str = "fp32"
    grad_checkpoint: bool = False
    seed: int = 0
    workers: int = 0
    presence_weight: float = 0.0
    init: str = ""
    freeze_head: bool = False
    save_every: int = 500
    log_every: int = 10

    def __post_init__(self):
        choices = {"arch": ARCHITECTURES, "schedule": SCHEDULES, "decoder_init": ("identity", "default"),
                   "sd_fusion": FUSIONS, "templates": tuple(TEMPLATES), "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LdznetError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.sd_fusion != "attention" and self.arch != "ldznet":
            raise LdznetError(f"sd_fusion={self.sd_fusion!r} is an LD-ZNet option; {self.arch} reads no SD features")
        for name, limit in FIELD_LIMITS.items():  # a config file is held to the flags' bounds (NaN too)
            limit.check(getattr(self, name), name)
        plateau = [f"{name}={getattr(self, name)}" for name, default in _PLATEAU_DEFAULTS.items()
                   if getattr(self, name) != default]
        if plateau and self.schedule != "plateau":
            raise LdznetError(f"{', '.join(plateau)} set the plateau schedule, and the schedule is {self.schedule!r}: "
                              "drop them or use schedule 'plateau'")
        if self.resolution % 64:
            raise LdznetError(f"resolution must be a multiple of 64, got {self.resolution}")
        if self.presence_weight > 0.0 and not (self.negatives or self.negative_prob):  # one class to learn
            raise LdznetError("presence_weight > 0 trains the presence output on absent phrases: keep the data's "
                              "(--negatives) or sample some (--negative-prob)")
        if self.negative_prob and self.batch_size < 2:
            raise LdznetError("negative_prob draws a phrase of another image of the micro-batch: batch_size must be "
                              f"2 or more, got {self.batch_size}")
        if self.freeze_head and not (self.init and self.presence_weight > 0.0):
            raise LdznetError("freeze_head trains the presence output of an existing head alone: it needs init "
                              "(the head file) and presence_weight > 0")

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainConfig:
        """A config from the fields in ``data`` (other keys are ignored; missing fields take defaults)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def total_batch(self, world_size: int) -> int:
        """Samples per optimiser step over ``world_size`` processes."""
        return self.batch_size * self.accumulate * world_size

    def base_lr(self, world_size: int) -> float:
        """The AdamW rate of the SD-initialised layers with ``world_size`` processes."""
        return self.lr * self.total_batch(world_size) if self.scale_lr else self.lr


PRESETS: dict[str, dict[str, Any]] = {
    "official": dict(resolution=384, batch_size=4, lr=5e-7, scale_lr=True, new_lr_scale=1.0, warmup=0,
                     schedule="plateau", plateau_factor=0.5, plateau_patience=1, weight_decay=0.01, ema=0.9999,
                     grad_clip=0.0, decoder_init="default", templates="phrasecut", negatives=False,
                     grad_checkpoint=True),
}
"""Named settings. "official": the released model's recipe (the paper and the official code,
koutilya-pnvr/LD-ZNet): 384 px, batch 4 per GPU, AdamW at 5e-7 per sample of the total batch
(1.6e-5 on 8 GPUs), ReduceLROnPlateau(0.5, patience 1), EMA 0.9999, every layer at the same rate,
no clipping (Lightning's default), torch's decoder init, the nine PhraseCut templates, no negatives,
gradient checkpointing."""


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


_PLATEAU_DEFAULTS = {name: getattr(TrainConfig, name) for name in ("plateau_factor", "plateau_patience",
                                                                     "plateau_every")}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """A file or flag value as the field's type; YAML reads 5e-7 (no dot) as a string."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        try:  # text as a flag's (no other scripts' digits, no "_"); an int too large for a float is no number
            number = number_from_text(value, float) if isinstance(value, str) else float(value)
            value, ok = (value, False) if isinstance(value, bool) else (number, True)
        except (TypeError, ValueError, OverflowError):
            ok = False
    else:
        ok = isinstance(value, str)
    if not ok:
        # shortened: a YAML alias bomb is a small file whose value prints as billions of items
        raise LdznetError(f"{name}: expected {_KIND_NAMES[type(default)]}, got {shown(value)}")
    return value


def check_values(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` with each key checked to be a TrainConfig field (or ``preset``) and each value
    coerced to the field's type; LdznetError naming ``where`` otherwise."""
    defaults = asdict(TrainConfig())
    unknown = sorted(set(values) - set(defaults) - {"preset"})
    if unknown:
        raise LdznetError(f"{where}: unknown key(s) {', '.join(unknown)}; expected preset or one of "
                          f"{', '.join(defaults)}")
    checked = {}
    for name, value in values.items():
        try:
            checked[name] = value if name == "preset" else _coerce(name, value, defaults[name])
        except LdznetError as error:
            raise LdznetError(f"{where}: {error}") from None
    if "preset" in checked and (not isinstance(checked["preset"], str) or checked["preset"] not in PRESETS):
        raise LdznetError(f"{where}: unknown preset {shown(checked['preset'])}; expected one of {', '.join(PRESETS)}")
    return checked


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a YAML (.yaml, .yml) or JSON file: one mapping of TrainConfig fields (and
    optionally ``preset``), checked and typed."""
    path = Path(path)
    if kind := special_file_kind(path):
        raise LdznetError(f"{path}: {kind}, not a config file")
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise LdznetError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file holds a few "
                              "settings")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LdznetError(f"{path}: cannot read the config file ({error})") from error
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # transformers requires PyYAML; imported here as only config files need it

        try:
            values = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as error:
            raise LdznetError(f"{path}: not valid YAML ({_one_line(error)})") from error
        except (ValueError, RecursionError) as error:  # an integer of 4300+ digits, brackets thousands deep
            raise LdznetError(f"{path}: cannot read the YAML ({type(error).__name__}: {error})") from error
    else:
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise LdznetError(f"{path}: not valid JSON ({error})") from error
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise LdznetError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    return check_values(values, str(path))


MAX_CONFIG_BYTES = 1024 * 1024
"""A config file's size: far beyond every field written out, and a bound on what a mistaken path reads."""


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's safe loader with YAML 1.2's numbers: PyYAML reads YAML 1.1, where ``1:20`` is 80 (base 60),
    ``017`` is 15 (octal) and ``0x10``, ``1_000`` are numbers, none of which a flag takes; here they are
    text, which a number field refuses, and a number is written in decimal as on the command line."""
    import yaml

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(int_tag, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    Loader.add_implicit_resolver(float_tag, re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"
                                                       r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
                                 list("-+0123456789."))
    Loader.add_constructor(int_tag, lambda loader, node: int(loader.construct_scalar(node)))  # 017 is 17
    return Loader


def _one_line(error: Exception) -> str:
    """A YAML error as one line: the problem and where, without PyYAML's quoted source lines."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def compose_config(base: Mapping[str, Any], file_values: Mapping[str, Any] | None = None,
                   flags: Mapping[str, Any] | None = None) -> TrainConfig:
    """The run's config: ``base`` (defaults or a resumed run's settings), then the preset named by
    ``flags`` or else by the file, then the file, then the flags (None values in flags are unset)."""
    file_values = dict(file_values or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    preset = flags.pop("preset", None) or file_values.pop("preset", None)
    file_values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise LdznetError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**base, **PRESETS.get(preset, {}), **file_values, **flags})
