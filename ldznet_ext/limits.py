"""The allowed range of every numeric setting, in one place.

The command-line options (:func:`bounded_number`) and the library's settings objects
(``MaskOptions``, ``RefineSettings``, ``SegmenterSettings``, ``ZeroShotSettings``) check against
the same :class:`Limit`, so a value is refused with the same words wherever it comes from, and
before any work starts. Upper bounds keep a typo (``--feather 1e9``) from becoming a huge
allocation or a run that never ends; they sit well above any useful value.
"""

from __future__ import annotations

import argparse
import decimal
import math
import numbers
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LdznetError


@dataclass(frozen=True)
class Limit:
    """A finite ``kind`` (int or float) in [low, high]; ``low_open``/``high_open`` exclude that end."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """E.g. "an integer in [64, 2048]", "a number in (0, 1]", "a number >= 0"."""
        what = "an integer" if self.kind is int else "a number"
        low, high = _text(self.low), _text(self.high)
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {high}"
        return what if self.kind is int else "a finite number"

    def span(self) -> str:
        """The range as a help text writes it: "0..64" (both ends included), else "(0, 1]"."""
        low, high = _text(self.low), "2^63-1" if self.high == 2**63 - 1 else _text(self.high)
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"{low}..{high}"
        return self.describe().split(" in ", 1)[-1]

    def stated_in(self, text: str) -> bool:
        """Whether ``text`` (a help text) gives this range: its span, or its ends in brackets, commas
        between digits ignored ("1,000"); 2^63-1 stands for that high end."""
        text = re.sub(r"(?<=\d),(?=\d)", "", text)
        return self.span() in text or self.describe().split(" in ", 1)[-1] in text

    def accepts(self, value: object) -> bool:
        """Whether ``value`` is of the kind (bools are not numbers here), finite and within range."""
        kind = numbers.Integral if self.kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):  # ints: no float overflow
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def check(self, value, name: str):
        """``value`` if accepted, else LdznetError "NAME must be ..., got VALUE" (VALUE shortened as
        ``reprlib.repr`` does: a value sent by a client may be megabytes long)."""
        if not self.accepts(value):
            raise LdznetError(f"{name} must be {self.describe()}, got {shown(value)}")
        return value

    def bounded(self, value: object, name: str) -> int | float:
        """``value`` (a number, not its text) checked as :meth:`check` does and stored as the kind: floats as
        float (a Fraction or numpy number would reach torch as itself), integers as int (an integral float
        such as 3.0 from a slider or JSON counts)."""
        if self.kind is int and isinstance(value, float) and value.is_integer() and self.accepts(int(value)):
            value = int(value)
        self.check(value, name)
        return float(value) if self.kind is float else int(value)

    def parse(self, text: str):
        """``text`` as the kind within range; ValueError with a one-line reason otherwise."""
        try:
            value = number_from_text(text, self.kind)
        except ValueError:
            raise ValueError(f"expected {self.describe()}, got {text!r}") from None
        if not self.accepts(value):  # 0.99999999999999999 is read as 1.0: say so, or the text looks in range
            read = "" if _exactly(text, value) else f" (read as {value!r})"
            raise ValueError(f"expected {self.describe()}, got {text}{read}")
        return value + 0 if value == 0 else value  # "-0" is 0: a report would print "t = -0"


def _exactly(text: str, value: int | float) -> bool:
    """Whether ``value`` is the number ``text`` writes, not a rounding of it."""
    if isinstance(value, float) and not math.isfinite(value):
        return True
    try:
        return decimal.Decimal(text.strip()) == decimal.Decimal(value)
    except (decimal.InvalidOperation, ValueError):
        return True


def number_from_text(text: str, kind: type) -> int | float:
    """``kind(text)`` for text written with ASCII digits and no "_" (Python's int() and float() also
    read "1_000" and other scripts' digits, which no option, JSON value or infotext means); ValueError
    otherwise."""
    if not text.isascii() or "_" in text:
        raise ValueError(f"not a number: {text!r}")
    return kind(text)


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 2  # reprlib's 6 levels of 6 items print a nested list as 100,000 characters


def shown(value: object) -> str:
    """``value`` for a message, shortened as ``reprlib.repr`` does; an integer too long for ``repr``
    (over 4300 digits) by its size."""
    if isinstance(value, numbers.Integral) and abs(int(value)).bit_length() > 1000:
        return f"an integer of about {int(abs(int(value)).bit_length() * math.log10(2)) + 1} digits"
    return _SHORT.repr(value)


def bounded_number(limit: Limit) -> Callable[[str], float]:
    """An argparse type for values within ``limit`` (its ``limit`` attribute says which)."""
    def convert(text: str):
        try:
            return limit.parse(text)
        except ValueError as error:  # argparse prints only an ArgumentTypeError's own words
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.limit = limit
    return convert


DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]{0,2}))?|mps")  # torch reads no padded or huge index


def check_device_name(name: str) -> str:
    """``name`` if it is one of :data:`DEVICE_NAMES`; LdznetError otherwise (``meta`` and other torch
    device types compute nothing a mask can be made of). Whether the device exists is
    ``devices.resolve_device``'s to say."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise LdznetError(f"unknown device {name!r}: expected {DEVICE_NAMES}")
    return name


def device_name(text: str) -> str:
    """An argparse type for ``--device``: :func:`check_device_name`, refused before anything loads."""
    try:
        return check_device_name(text)
    except LdznetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _text(bound: float | None) -> str:
    if bound is None:
        return ""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


MAX_RADIUS = 2048  # output pixels: far beyond any useful edge move
MAX_FEATHER = 256
MAX_STEPS = 10_000_000
MAX_WORKERS = 64

# Models and sampling
RESOLUTION = Limit(int, 64, 2048)  # working side in pixels
TIMESTEP = Limit(int, 0, 999)  # SD v1's 1000-step schedule
DRAWS = Limit(int, 1, 64)
PROPAGATION_STEPS = Limit(int, 0, 64)  # zero-shot: self-attention multiplications of the cross-attention map
SHARPEN = Limit(float, 1, 64)  # zero-shot: exponent of the self-attention before renormalising its rows
DOWNSCALE = Limit(int, 1, 64)  # a spatial transformer's side as a fraction 1/D of the latent's
ATTENTION_BLOCK = Limit(int, 1, 64)  # zero-shot: a spatial-transformer block of the layout, from 1
CROSS_ATTENTION = Limit(float, 0, 1)  # zero-shot: the cross-attention map's weight in the blend
SCALE_WEIGHT = Limit(float, 0, 1000)
SEED = Limit(int, 0, 2**63 - 1)  # torch.Generator.manual_seed's range
PIXELS = Limit(int, 1, 1_000_000_000)  # --max-pixels: an image's pixel count
BATCH_SIZE = Limit(int, 1, 64)  # images predicted together
SHARDS = Limit(int, 1, 1_000_000)  # N of --shard K/N: more shards than any machine pool runs

# Masks (MaskOptions) and edge refinement (RefineSettings)
THRESHOLD = Limit(float, 0, 1, high_open=True)
GROW = Limit(float, -MAX_RADIUS, MAX_RADIUS)
# A Gaussian soft edge costs its width per pixel: beyond a few hundred pixels it is slow on a large
# image (a 2048 px feather on 4096 x 4096 runs for minutes) and no longer an edge.
FEATHER = Limit(float, 0, MAX_FEATHER)
KEEP_LARGEST = Limit(int, 1, 100_000)
MIN_AREA = Limit(int, 0, PIXELS.high)
REFINE_STRENGTH = Limit(float, 0, 1)
REFINE_RADIUS = Limit(float, 1, MAX_RADIUS)
REFINE_EPS = Limit(float, 0, 1, low_open=True)  # squared colour units of a [0, 1] image

# The WebUI's detail pass: one img2img per instance after generation
DENOISING = Limit(float, 0, 1, low_open=True)  # 0 would repaint nothing
SAMPLING_STEPS = Limit(int, 1, 1000)
CROP_PADDING = Limit(int, 0, MAX_RADIUS)  # pixels around an instance's box

# Data, evaluation and training
RENDER_SIZE = Limit(int, 8, 4096)  # a micro-world scene's side: world.scenes.render's range
MICRO_IMAGE_SIZE = Limit(int, 64, 1024)  # the micro SD's training side; also a multiple of 64 (its UNet's depth)
MIN_SNR_GAMMA = Limit(float, 0, 10_000)  # micro UNet loss weighting: 0 off, >= 1,175 (SNR at t = 0) all 1
SCENES = Limit(int, 1, 1_000_000)  # seeds of one split
SCENE_INDEX = Limit(int, 0, SCENES.high - 1)
WORKERS = Limit(int, 0, MAX_WORKERS)
PROCESSES = Limit(int, 1, MAX_WORKERS)
EXAMPLES = Limit(int, 1, 100_000_000)
BOUNDARY_TOLERANCE = Limit(float, 0, 64, low_open=True)  # pixels
# What an eval result file may hold (EvalResult.from_dict): a sample's pixel counts are bounded by the
# largest image any command reads; keys are (example index, phrase position); shards split examples.
SAMPLE_PIXELS = Limit(int, 0, PIXELS.high)
SAMPLE_KEY = Limit(int, 0, 2**63 - 1)
EXAMPLE_COUNT = Limit(int, 0, EXAMPLES.high)
SECONDS = Limit(float, 0, 1e9)  # an evaluation's seconds: about 32 years (1e308 printed 'inf ms per mask')
STEPS = Limit(int, 1, MAX_STEPS)
STEP_INTERVAL = Limit(int, 1, MAX_STEPS)
WARMUP = Limit(int, 0, MAX_STEPS)
TRAIN_BATCH_SIZE = Limit(int, 1, 4096)
TIME_BUDGET = Limit(float, 0, 1e7)  # seconds a training run may take before it stops
ACCUMULATE = Limit(int, 1, 1024)
LEARNING_RATE = Limit(float, 0, 1, low_open=True)
LR_SCALE = Limit(float, 0, 1000, low_open=True)
FACTOR = Limit(float, 0, 1, low_open=True, high_open=True)  # a rate multiplier that lowers the rate
PATIENCE = Limit(int, 0, 10_000)  # 0: cut the rate after every window without improvement
WEIGHT_DECAY = Limit(float, 0, 1)
EMA_DECAY = Limit(float, 0, 1, high_open=True)
GRAD_CLIP = Limit(float, 0, 1e6)
LOSS_WEIGHT = Limit(float, 0, 1000)
NEGATIVES = Limit(int, 1, 8)  # absent phrases a data spec's ?negatives=K adds to each example
NEGATIVE_PROB = Limit(float, 0, 1, high_open=True)  # 1 would leave no present phrase to learn masks from
