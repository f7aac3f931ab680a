"""The mask settings of one generation: from script args (UI or API), to and from infotext, and
the ``mask: <expression>`` line of a prompt. Pure Python: no WebUI, no gradio.

Script args are positional (the order of ``ARG_NAMES``), as the host passes component values and
as API clients send ``alwayson_scripts: {"ld-znet mask": {"args": [...]}}``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from ..errors import LdznetError
from ..masks.expression import parse
from ..masks.ops import MaskOptions
from ..refine import RefineSettings

TITLE = "LD-ZNet mask"
MODES = ("LD-ZNet head", "zero-shot")
ZERO_SHOT_MODE = MODES[1]
COMBINE_MODES = ("replace", "add", "subtract", "intersect")
ARG_NAMES = ("expression", "mode", "threshold", "grow", "feather", "invert", "combine", "refine")
MAX_GROW = 256
MAX_FEATHER = 256
MAX_EXPRESSION_CHARS = 2000

INFOTEXT_KEYS = {
    "expression": "LD-ZNet mask",
    "mode": "LD-ZNet mode",
    "threshold": "LD-ZNet threshold",
    "grow": "LD-ZNet grow",
    "feather": "LD-ZNet feather",
    "invert": "LD-ZNet invert",
    "combine": "LD-ZNet combine",
    "refine": "LD-ZNet refine",
}
"""Infotext key of each setting; the expression's key is the accordion's title."""

_MASK_LINE = re.compile(r"^[ \t]*mask[ \t]*:(.*)(?:\n|$)", re.IGNORECASE | re.MULTILINE)


def _number(value, name: str, low: float, high: float, *, integer: bool = False, high_open: bool = False) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise LdznetError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise LdznetError(f"{name} must be a finite number, got {value!r}")
    inside = low <= value < high if high_open else low <= value <= high
    if not inside:
        raise LdznetError(f"{name} must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}")
    if integer and value != int(value):
        raise LdznetError(f"{name} must be a whole number of pixels, got {value!r}")
    return float(value)


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise LdznetError(f"{name} must be true or false, got {value!r}")


def _choice(value, name: str, choices: Sequence[str]) -> str:
    for choice in choices:
        if isinstance(value, str) and value.strip().lower() == choice.lower():
            return choice
    raise LdznetError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


@dataclass(frozen=True)
class MaskRequest:
    """One mask job. expression: mask expression ("" = off); mode: one of MODES; threshold in
    [0, 1); grow: pixels, negative shrinks; feather: soft-edge radius in pixels; invert: swap
    selected and kept; combine: how the mask meets a brush/uploaded mask (one of COMBINE_MODES);
    refine: snap the mask's edges to the image's (``refine.py``; False: bilinear upsampling)."""

    expression: str = ""
    mode: str = MODES[0]
    threshold: float = 0.5
    grow: float = 0.0
    feather: float = 0.0
    invert: bool = False
    combine: str = COMBINE_MODES[0]
    refine: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.expression, str):
            raise LdznetError(f"expression must be text, got {type(self.expression).__name__}")
        if len(self.expression) > MAX_EXPRESSION_CHARS:
            raise LdznetError(f"expression is {len(self.expression)} characters long; the limit is {MAX_EXPRESSION_CHARS}")
        object.__setattr__(self, "expression", " ".join(self.expression.split()))
        object.__setattr__(self, "mode", _choice(self.mode, "mode", MODES))
        object.__setattr__(self, "threshold", _number(self.threshold, "threshold", 0, 1, high_open=True))
        object.__setattr__(self, "grow", _number(self.grow, "grow", -MAX_GROW, MAX_GROW))
        object.__setattr__(self, "feather", _number(self.feather, "feather", 0, MAX_FEATHER))
        object.__setattr__(self, "invert", _flag(self.invert, "invert"))
        object.__setattr__(self, "combine", _choice(self.combine, "combine", COMBINE_MODES))
        object.__setattr__(self, "refine", _flag(self.refine, "refine"))
        if self.expression:
            parse(self.expression)  # ExpressionError now, with its position, rather than mid-generation

    @property
    def active(self) -> bool:
        return bool(self.expression)

    @property
    def zero_shot(self) -> bool:
        return self.mode == ZERO_SHOT_MODE

    def options(self) -> MaskOptions:
        return MaskOptions(threshold=self.threshold, invert=self.invert, feather=self.feather)

    def refine_settings(self) -> RefineSettings:
        return RefineSettings(enabled=self.refine)

    def with_expression(self, expression: str) -> MaskRequest:
        return MaskRequest(**{**self.as_dict(), "expression": expression})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def infotext(self) -> dict[str, str]:
        """Infotext parameters (the host quotes values that need it)."""
        values = self.as_dict()
        return {key: _format(values[name]) for name, key in INFOTEXT_KEYS.items()}

    @classmethod
    def from_infotext(cls, params: Mapping[str, str]) -> MaskRequest | None:
        """The request recorded in parsed infotext, or None when it holds no LD-ZNet mask."""
        if not params.get(INFOTEXT_KEYS["expression"]):
            return None
        return cls(**{name: params[key] for name, key in INFOTEXT_KEYS.items() if key in params})

    @classmethod
    def from_args(cls, args: Sequence) -> MaskRequest:
        """From positional script args in ARG_NAMES order; missing trailing args take defaults,
        None means "default" (the host fills unsent API args with the UI's defaults)."""
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise LdznetError(f"args must be a list in the order {list(ARG_NAMES)}, got {type(args).__name__}")
        if len(args) > len(ARG_NAMES):
            raise LdznetError(f"got {len(args)} args, expected at most {len(ARG_NAMES)}: {list(ARG_NAMES)}")
        values = {name: value for name, value in zip(ARG_NAMES, args) if value is not None}
        if not isinstance(values.get("expression", ""), str):
            raise LdznetError(f"expression (arg 0) must be text, got {values['expression']!r}")
        return cls(**values)


def _format(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def split_mask_line(prompt: str) -> tuple[str, str | None]:
    """(prompt without its ``mask: <expression>`` line, the expression or None).

    The line may stand anywhere in the prompt; "mask:" is case-insensitive. Two mask lines are an
    error, since which one wins would be a guess.
    """
    found = _MASK_LINE.findall(prompt)
    if not found:
        return prompt, None
    if len(found) > 1:
        raise LdznetError(f"the prompt has {len(found)} 'mask:' lines; write one, e.g. 'mask: cat OR dog'")
    expression = " ".join(found[0].split())
    if not expression:
        raise LdznetError("the prompt's 'mask:' line is empty; write the expression after it, e.g. 'mask: cat'")
    return _MASK_LINE.sub("", prompt).strip(), expression


def combine(mask: np.ndarray, brush: np.ndarray | None, mode: str) -> np.ndarray:
    """Combine our mask with a brush/uploaded mask, both uint8 [H, W] (255 = repaint).

    replace: ours; add: union (max); subtract: ours minus the brush; intersect: min. Without a
    brush mask every mode returns ours. Soft (feathered) values combine as fuzzy sets.
    """
    mode = _choice(mode, "combine", COMBINE_MODES)
    if brush is None or mode == "replace":
        return mask.copy()
    if brush.shape != mask.shape:
        raise LdznetError(f"the brush mask is {brush.shape[1]}x{brush.shape[0]} but the image is "
                          f"{mask.shape[1]}x{mask.shape[0]}; they must be the same size")
    if mode == "add":
        return np.maximum(mask, brush)
    if mode == "intersect":
        return np.minimum(mask, brush)
    return np.minimum(mask, 255 - brush)
