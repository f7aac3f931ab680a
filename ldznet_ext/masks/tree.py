"""The immutable mask-expression tree: canonical text (``str``) and evaluation on probability maps.

Semantics on maps in [0, 1]: OR is the elementwise max, AND the min, NOT is ``1 - p``; ``{*w}``
multiplies and ``{/w}`` (w > 0) divides, then clamps to [0, 1]; ``{+n}`` / ``{-n}`` dilate / erode by
a true disk of radius n pixels of the maps (the output image), see :func:`.ops.dilate`, which also
defines fractional radii. ``[...]`` (:class:`Selector`) keeps some instances of the map thresholded at
the job's threshold (:mod:`.instances`), so selection composes with the operators. Chained modifiers and
selectors apply left to right. :func:`.expression.parse` builds trees.
"""

from __future__ import annotations

import functools
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ExpressionError, LdznetError
from ..limits import MAX_RADIUS, THRESHOLD
from . import ops
from .instances import ORDERS, select_instances

__all__ = ["And", "Expression", "Modified", "Modifier", "Not", "Or", "Selector", "Term"]

RESERVED = '()|&!{}[]"'  # characters that end a free-text term
KEYWORDS = {"OR": "or", "AND": "and", "NOT": "not"}


class Expression(ABC):
    """An immutable mask-expression tree; ``str()`` gives the canonical text, which parses back equal."""

    __slots__ = ()
    precedence: ClassVar[int]  # binding strength, for minimal parentheses in str()

    def terms(self) -> tuple[str, ...]:
        """The distinct terms, in order of first appearance."""
        return tuple(dict.fromkeys(self._iter_terms()))

    def evaluate(self, probabilities: Mapping[str, Tensor], threshold: float = 0.5) -> Tensor:
        """Combine per-term maps, each float ``[H, W]`` or ``[B, H, W]`` in [0, 1] (same shape, dtype,
        device), keyed by the strings of :meth:`terms`; ``threshold`` makes the instances that selectors
        choose from. Returns a new tensor of that shape in [0, 1]."""
        maps = {}
        for term in self.terms():
            if term not in probabilities:
                given = sorted(probabilities)
                raise LdznetError(f"no probability map for term {term!r}; maps were given for {given!r}")
            maps[term] = probabilities[term]
        first_term, first = next(iter(maps.items()))
        for term, p in maps.items():
            if not isinstance(p, Tensor) or not p.is_floating_point() or p.ndim not in (2, 3):
                found = f"{p.dtype} tensor of shape {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
                raise LdznetError(f"the map for {term!r} must be a float tensor [H, W] or [B, H, W], got {found}")
            if (p.shape, p.dtype, p.device) != (first.shape, first.dtype, first.device):
                raise LdznetError(
                    f"the maps for {first_term!r} and {term!r} differ: {tuple(first.shape)} {first.dtype} on "
                    f"{first.device} vs {tuple(p.shape)} {p.dtype} on {p.device}; all maps must match"
                )
        THRESHOLD.check(threshold, "threshold")
        result = self._eval(maps, threshold)
        return result.clone() if any(result is p for p in maps.values()) else result

    def __str__(self) -> str:
        return self._format()

    def _child(self, child: Expression, parenthesize_below: int) -> str:
        text = child._format()
        return f"({text})" if child.precedence < parenthesize_below else text

    @abstractmethod
    def _iter_terms(self) -> Iterator[str]:
        """Every term occurrence, left to right."""

    @abstractmethod
    def _eval(self, maps: Mapping[str, Tensor], threshold: float) -> Tensor:
        """The map for this node; may return an input map itself."""

    @abstractmethod
    def _format(self) -> str:
        """Canonical text with minimal parentheses."""


def _invalid(message: str) -> ExpressionError:
    return ExpressionError(f"invalid expression tree: {message}")


@dataclass(frozen=True)
class Term(Expression):
    """A text prompt; ``text`` is whitespace-normalised, non-empty and holds no ``"``."""

    text: str
    precedence: ClassVar[int] = 5

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text or " ".join(self.text.split()) != self.text:
            raise _invalid(f"a term must be non-empty text with single spaces between words, got {self.text!r}")
        if '"' in self.text:
            raise _invalid(f"a term cannot contain '\"', got {self.text!r}")

    def _iter_terms(self) -> Iterator[str]:
        yield self.text

    def _eval(self, maps: Mapping[str, Tensor], threshold: float) -> Tensor:
        return maps[self.text]

    def _format(self) -> str:
        plain = not any(c in RESERVED for c in self.text) and not any(w in KEYWORDS for w in self.text.split())
        return self.text if plain else f'"{self.text}"'


def _format_number(x: float) -> str:
    text = format(Decimal(repr(x)), "f")  # shortest round-trip digits, never an exponent
    return text.rstrip("0").rstrip(".") if "." in text else text


MAX_SCALE = 1_000_000.0
"""The largest factor of ``{*N}`` (and of ``{/N}``'s 1 / N): past it every pixel above 0 is 1 already, and an
unbounded one would make 0 x inf = NaN of a term's zeros (an empty mask, silently)."""


@dataclass(frozen=True)
class Modifier:
    """``{op amount}``: op ``+`` dilate / ``-`` erode by ``amount`` pixels, ``*`` / ``/`` scale and clamp."""

    op: str
    amount: float

    def __post_init__(self) -> None:
        if self.op not in ("+", "-", "*", "/"):
            raise _invalid(f"a modifier's op must be one of '+', '-', '*', '/', got {self.op!r}")
        a = self.amount
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or a < 0:
            raise _invalid(f"a modifier's amount must be a finite number >= 0, got {a!r}")
        if self.op == "/" and a == 0:
            raise _invalid("'{/N}' needs N > 0")
        if self.op in "+-" and a > MAX_RADIUS:  # as --grow: each pixel of radius is a pass over the map
            raise _invalid(f"'{{{self.op}N}}' grows or shrinks by at most {MAX_RADIUS} pixels, got {a!r}")
        if (self.op == "*" and a > MAX_SCALE) or (self.op == "/" and a < 1 / MAX_SCALE):
            raise _invalid(f"'{{{self.op}N}}' scales by a factor of at most {MAX_SCALE:.0f}, got {a!r}")
        object.__setattr__(self, "amount", float(a))

    def apply(self, p: Tensor) -> Tensor:
        """Apply to a map ``[..., H, W]`` in [0, 1]; returns a new map in [0, 1]."""
        if self.op == "+":
            return ops.dilate(p, self.amount)
        if self.op == "-":
            return ops.erode(p, self.amount)
        scaled = p * self.amount if self.op == "*" else p / self.amount
        return scaled.clamp_(0, 1)

    def __str__(self) -> str:
        return f"{{{self.op}{_format_number(self.amount)}}}"


MAX_INDEX = 10_000  # instance indices in a selector; more objects than this are not told apart by number


@dataclass(frozen=True)
class Selector:
    """``[order i, j, ...]``: keep the instances at 1-based places ``indices`` (negative: from the end)
    in ``order`` (:data:`.instances.ORDERS`); ``[largest]`` is ``[area 1]``, ``[smallest]`` ``[area -1]``."""

    order: str
    indices: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise _invalid(f"a selector's order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        indices = tuple(self.indices) if isinstance(self.indices, (list, tuple)) else ()
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and 0 < abs(i) <= MAX_INDEX
                                  for i in indices):
            raise _invalid(f"a selector needs 1-based indices, non-zero, at most {MAX_INDEX} in size, "
                           f"got {self.indices!r}")
        object.__setattr__(self, "indices", indices)

    def apply(self, p: Tensor, threshold: float) -> Tensor:
        """``p`` ``[..., H, W]`` kept on the chosen instances of ``p > threshold``, 0 elsewhere."""
        return select_instances(p, threshold, self.order, self.indices)

    def __str__(self) -> str:
        if self.order == "area" and self.indices in ((1,), (-1,)):
            return "[largest]" if self.indices == (1,) else "[smallest]"
        prefix = "" if self.order == "left" else f"{self.order} "
        return f"[{prefix}{','.join(map(str, self.indices))}]"


@dataclass(frozen=True)
class Modified(Expression):
    """``operand{..}[..]``: modifiers and selectors applied left to right; the operand is never itself
    Modified."""

    operand: Expression
    modifiers: tuple[Modifier | Selector, ...]
    precedence: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if not isinstance(self.operand, Expression) or isinstance(self.operand, Modified):
            raise _invalid(f"a Modified operand must be an Expression other than Modified, got {self.operand!r}")
        mods = tuple(self.modifiers) if isinstance(self.modifiers, (list, tuple)) else ()
        if not mods or not all(isinstance(m, (Modifier, Selector)) for m in mods):
            raise _invalid(f"Modified needs one or more Modifier or Selector objects, got {self.modifiers!r}")
        object.__setattr__(self, "modifiers", mods)

    def _iter_terms(self) -> Iterator[str]:
        yield from self.operand._iter_terms()

    def _eval(self, maps: Mapping[str, Tensor], threshold: float) -> Tensor:
        p = self.operand._eval(maps, threshold)
        for modifier in self.modifiers:
            p = modifier.apply(p, threshold) if isinstance(modifier, Selector) else modifier.apply(p)
        return p

    def _format(self) -> str:
        return self._child(self.operand, self.precedence) + "".join(map(str, self.modifiers))


@dataclass(frozen=True)
class Not(Expression):
    """``NOT operand``: 1 - p."""

    operand: Expression
    precedence: ClassVar[int] = 3

    def __post_init__(self) -> None:
        if not isinstance(self.operand, Expression):
            raise _invalid(f"Not needs an Expression, got {self.operand!r}")

    def _iter_terms(self) -> Iterator[str]:
        yield from self.operand._iter_terms()

    def _eval(self, maps: Mapping[str, Tensor], threshold: float) -> Tensor:
        return 1 - self.operand._eval(maps, threshold)

    def _format(self) -> str:
        return "NOT " + self._child(self.operand, self.precedence)


@dataclass(frozen=True)
class _Chain(Expression):
    operands: tuple[Expression, ...]
    keyword: ClassVar[str]
    _combine: ClassVar[Callable[[Tensor, Tensor], Tensor]]  # folds the operands' maps left to right

    def __post_init__(self) -> None:
        operands = tuple(self.operands) if isinstance(self.operands, (list, tuple)) else ()
        if len(operands) < 2 or not all(isinstance(o, Expression) for o in operands):
            raise _invalid(f"{type(self).__name__} needs two or more Expressions, got {self.operands!r}")
        object.__setattr__(self, "operands", operands)

    def _iter_terms(self) -> Iterator[str]:
        for operand in self.operands:
            yield from operand._iter_terms()

    def _format(self) -> str:
        # A nested chain of the same kind keeps its parentheses, so str() round-trips to an equal tree.
        return f" {self.keyword} ".join(self._child(o, self.precedence + 1) for o in self.operands)

    def _eval(self, maps: Mapping[str, Tensor], threshold: float) -> Tensor:
        return functools.reduce(self._combine, (operand._eval(maps, threshold) for operand in self.operands))


@dataclass(frozen=True)
class And(_Chain):
    """``a AND b AND ...``: elementwise min."""

    precedence: ClassVar[int] = 2
    keyword: ClassVar[str] = "AND"
    _combine = staticmethod(torch.minimum)


@dataclass(frozen=True)
class Or(_Chain):
    """``a OR b OR ...``: elementwise max."""

    precedence: ClassVar[int] = 1
    keyword: ClassVar[str] = "OR"
    _combine = staticmethod(torch.maximum)
