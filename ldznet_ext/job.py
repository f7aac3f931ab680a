"""One mask job: the expression and every option that shapes its mask, validated once.

Every front end builds a :class:`MaskJob`: the WebUI script args and infotext (``webui/request.py``),
``POST /ldznet/v1/mask`` (:meth:`MaskJob.from_dict`), the LD-ZNet tab, and the batch manifest's
"settings" (:meth:`MaskJob.manifest_settings`). Numeric ranges and their messages are those of
``limits.py``; values from JSON, script args or infotext may be strings ("0.4", "true").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields

from .errors import ExpressionError, LdznetError
from .limits import (FEATHER, GROW, KEEP_LARGEST, MAX_RADIUS, MIN_AREA, REFINE_RADIUS, REFINE_STRENGTH, THRESHOLD,
                     Limit, number_from_text)
from .masks.expression import MAX_CHARS, parse, reparsed
from .masks.ops import MaskOptions
from .masks.tree import Expression, Modified, Modifier
from .refine import RefineSettings

HEAD_MODE = "LD-ZNet head"
ZERO_SHOT_MODE = "zero-shot"
MODES = (HEAD_MODE, ZERO_SHOT_MODE)
COMBINE_MODES = ("replace", "add", "subtract", "intersect")


def number_field(default, limit: Limit, description: str, optional: bool = False):
    """A dataclass field checked against ``limit`` (``optional``: None allowed) and described in the JSON Schema."""
    return field(default=default, metadata={"limit": limit, "optional": optional, "description": description})


def _choice(choices: tuple[str, ...], description: str):
    return field(default=choices[0], metadata={"choices": choices, "description": description})


def _flag(default: bool, description: str):
    return field(default=default, metadata={"flag": True, "description": description})


@dataclass(frozen=True)
class MaskJob:
    """One mask: what to select and how to turn its probability into the mask (see each field's
    description, or :meth:`json_schema`). Invalid values raise LdznetError naming the field; a
    malformed expression raises ExpressionError with its position."""

    expression: str = field(default="", metadata={
        "description": 'mask expression, e.g. "goblin OR sword{+4}"; "" = no mask'})
    mode: str = _choice(MODES, "LD-ZNet head: the selected head; zero-shot: the model's own attention")
    threshold: float = number_field(0.5, THRESHOLD, "a pixel is selected when its probability is above this")
    grow: float = number_field(0.0, GROW, "grow the mask by this many pixels (negative: shrink)")
    feather: float = number_field(0.0, FEATHER, "soft-edge radius in pixels")
    invert: bool = _flag(False, "swap selected and kept")
    combine: str = _choice(COMBINE_MODES, "how the mask meets a brush or uploaded mask")
    refine: bool = _flag(True, "snap the mask's edges to the image's (false: bilinear upsampling)")
    keep_largest: int | None = number_field(None, KEEP_LARGEST, "keep only this many largest objects (null: all)",
                                       optional=True)
    min_area: int = number_field(0, MIN_AREA, "drop objects smaller than this many pixels")
    refine_strength: float = number_field(1.0, REFINE_STRENGTH, "edge refinement: 0 bilinear .. 1 fully guided")
    refine_radius: float | None = number_field(None, REFINE_RADIUS, "how far refinement may move an edge, in pixels "
                                          "(null: automatic)", optional=True)
    # On by default: an inpainting run on a mask of a few weak blobs, where the named thing is not, repaints
    # what the user wanted kept; the rule is tuned to lose few present terms, and false turns it off.
    presence: bool = _flag(True, "decide per term whether it is in the image; a term not found selects nothing")
    _tree: Expression | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for spec in _fields():
            value = getattr(self, spec.name)
            if "limit" in spec.metadata:
                value = checked_number(value, spec)
            elif "choices" in spec.metadata:
                value = checked_choice(value, spec.name, spec.metadata["choices"])
            elif "flag" in spec.metadata:
                value = checked_flag(value, spec.name)
            else:
                value = _checked_expression(value)
            object.__setattr__(self, spec.name, value)
        typed = self.expression
        object.__setattr__(self, "expression", " ".join(typed.split()))  # one form in records and infotext
        # ExpressionError now, with its position in the text as typed, rather than mid-generation
        tree = parse(typed) if self.expression else None
        if tree is not None and self.grow:
            try:  # the one bound grow can break: the expression's {+N} / {-N} and grow together
                reparsed(with_grow(tree, self.grow))
            except ExpressionError:
                raise LdznetError(f"grow {self.grow:g} and the expression's {{+N}} / {{-N}} add up to more than "
                                  f"{MAX_RADIUS:g} pixels") from None
        object.__setattr__(self, "_tree", tree)

    @property
    def active(self) -> bool:
        """Whether there is an expression to mask."""
        return bool(self.expression)

    @property
    def zero_shot(self) -> bool:
        """Whether the job's masks come from the model's own attention (no head)."""
        return self.mode == ZERO_SHOT_MODE

    def tree(self) -> Expression:
        """The parsed expression with ``grow`` applied to the whole mask; LdznetError when empty."""
        if self._tree is None:
            raise LdznetError("the mask expression is empty")
        return with_grow(self._tree, self.grow)

    def mask_options(self) -> MaskOptions:
        """What ``Segmenter.predict`` takes of the job: threshold, region filters, invert, feather, presence."""
        return MaskOptions(threshold=self.threshold, invert=self.invert, keep_largest=self.keep_largest,
                           min_area=self.min_area, feather=self.feather, presence=self.presence)

    def refine_settings(self) -> RefineSettings:
        """The job's edge refinement, for ``ModelSettings(refine=...)`` or ``Segmenter.with_settings``."""
        return RefineSettings(enabled=self.refine, strength=self.refine_strength, radius=self.refine_radius)

    def replace(self, **changes) -> MaskJob:
        """A copy with ``changes`` (validated as in the constructor); LdznetError naming an unknown field."""
        known = {spec.name for spec in _fields()}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise LdznetError(f"unknown fields {unknown}; expected some of {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Every field by name, JSON-ready (``from_dict`` reads it back)."""
        return {spec.name: getattr(self, spec.name) for spec in _fields()}

    def manifest_settings(self) -> dict:
        """The "settings" of a batch manifest line: every field but the expression (a line of its own)."""
        return {name: value for name, value in self.as_dict().items() if name != "expression"}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The job's fields in order (``from_dict``'s keys)."""
        return tuple(spec.name for spec in _fields())

    @classmethod
    def from_dict(cls, values: Mapping, other_fields: Collection[str] = ()) -> MaskJob:
        """A job from JSON-like ``values``; a null value means the field's default. ``other_fields``
        are names the caller reads itself (allowed, not part of the job); any other unknown name is
        an LdznetError that lists the known ones."""
        if not isinstance(values, Mapping):
            raise LdznetError(f"a mask job must be an object (a mapping), got {type(values).__name__}")
        known = set(cls.field_names())
        unknown = sorted(map(str, set(values) - known - set(other_fields)))
        if unknown:
            raise LdznetError(f"unknown fields {unknown}; expected {sorted(known | set(other_fields))}")
        return cls(**{name: value for name, value in values.items() if name in known and value is not None})

    @classmethod
    def json_schema(cls) -> dict:
        """A JSON Schema (draft 2020-12) of :meth:`from_dict`'s input: types, choices, ranges,
        defaults and descriptions."""
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "LD-ZNet mask job",
                "type": "object", "additionalProperties": False,
                "properties": {spec.name: _field_schema(spec) for spec in _fields()}}


def _fields() -> tuple[dataclasses.Field, ...]:
    return tuple(spec for spec in fields(MaskJob) if spec.init)


def _checked_expression(value) -> str:
    if not isinstance(value, str):
        raise LdznetError(f"expression must be text, got {type(value).__name__}")
    return value


def checked_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices`` (case and surrounding spaces ignored); LdznetError otherwise."""
    for choice in choices:
        if isinstance(value, str) and value.strip().lower() == choice.lower():
            return choice
    raise LdznetError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def checked_flag(value: object, name: str) -> bool:
    """A bool, or the text "true"/"false" in any case, as a bool; LdznetError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise LdznetError(f"{name} must be true or false, got {value!r}")


def checked_number(value: object, spec: dataclasses.Field) -> int | float | None:
    """``value`` (a number or its text) checked against the field's Limit; floats are stored as
    float, integers as int (an integral float such as 3.0 from a slider or JSON counts)."""
    if value is None and spec.metadata["optional"]:
        return None
    return spec.metadata["limit"].bounded(_parsed(value) if isinstance(value, str) else value, spec.name)


def _parsed(text: str):
    """The number in ``text``, or ``text`` itself (which the Limit then refuses by name, as typed: 5,000
    nines are too many digits for an int and read as a float are inf, which the user did not type)."""
    for kind in (int, float):
        try:
            number = number_from_text(text, kind)
        except ValueError:
            continue
        return number if math.isfinite(number) else text
    return text


def _field_schema(spec: dataclasses.Field) -> dict:
    metadata = spec.metadata
    if "limit" in metadata:
        limit: Limit = metadata["limit"]
        kind = "integer" if limit.kind is int else "number"
        schema = {"type": [kind, "null"] if metadata["optional"] else kind, **_range(limit)}
    elif "choices" in metadata:
        schema = {"type": "string", "enum": list(metadata["choices"])}
    elif "flag" in metadata:
        schema = {"type": "boolean"}
    else:
        schema = {"type": "string", "maxLength": MAX_CHARS}
    return {**schema, "default": spec.default, "description": metadata["description"]}


def _range(limit: Limit) -> dict:
    bounds = {}
    if limit.low is not None:
        bounds["exclusiveMinimum" if limit.low_open else "minimum"] = limit.low
    if limit.high is not None:
        bounds["exclusiveMaximum" if limit.high_open else "maximum"] = limit.high
    return bounds


def with_grow(expression: Expression, pixels: float) -> Expression:
    """The expression with its final map grown (``pixels`` > 0) or shrunk (< 0) by a disk of
    ``abs(pixels)``. Done on the probability map: thresholding commutes with dilation, so this
    equals growing the thresholded mask, and it happens before the component filters."""
    if pixels == 0:
        return expression
    modifier = Modifier("+" if pixels > 0 else "-", abs(pixels))
    if isinstance(expression, Modified):
        return Modified(expression.operand, (*expression.modifiers, modifier))
    return Modified(expression, (modifier,))
