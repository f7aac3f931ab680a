"""Mask expressions: ``goblin OR sword``, ``(cat | dog) & !collar {+8}``, ``face{-4} OR hair{*1.5}``.

Grammar (a superset of imaginAIry's)::

    expr := or            or  := and (("OR" | "|") and)*      and := not (("AND" | "&") not)*
    not  := ("NOT" | "!") not | mod                            mod := atom (modifier | selector)*
    atom := TERM | '"' text '"' | "(" expr ")"                modifier := "{" ("+"|"-"|"*"|"/") NUMBER "}"
    selector := "[" (ORDER? INDEX ("," INDEX)* | "largest" | "smallest") "]"
    ORDER := "left" | "top" | "center" | "area"                INDEX := "-"? DIGITS (not 0)

A TERM is free text up to one of the reserved characters ``( ) | & ! { } [ ] "``. The keywords OR, AND,
NOT are case-sensitive whole words (separated by spaces or reserved characters), so ``orange``,
``Norway`` and ``cat and dog`` stay terms. Whitespace inside a term is collapsed; a quoted term may
hold reserved characters and keywords (but no ``"``). NUMBER is ``12``, ``1.5``, ``.5`` or ``2.``,
optionally with spaces inside the braces.

Bounds, so that no expression costs unbounded time or memory: at most MAX_CHARS characters (which
bounds its operations), MAX_TERMS distinct terms (each
is a map at the image's size), MAX_SELECTORS instance selectors, MAX_NESTING levels of parentheses
and NOTs, and {+N} / {-N} adding up to MAX_RADIUS pixels (--grow's bound: each pixel is a pass over
the map). Control characters and lone surrogates (bytes that are not UTF-8) are refused.

The tree and its semantics (max, min, 1 - p, scaling, disk dilation/erosion) live in :mod:`.tree`;
its node classes are re-exported here.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import ExpressionError
from ..limits import MAX_RADIUS
from .instances import ORDERS
from .tree import KEYWORDS, MAX_INDEX, MAX_SCALE, RESERVED, And, Expression, Modified, Modifier, Not, Or, Selector, Term

__all__ = ["MAX_CHARS", "MAX_NESTING", "MAX_SELECTORS", "MAX_TERMS", "And", "Expression", "Modified", "Modifier",
           "Not", "Or", "Selector", "Term", "parse", "reparsed"]

MAX_CHARS = 2000
"""The length of an expression's text: it bounds the number of operations (each a pass over a map at the
image's size) that repeats of the same terms add."""
MAX_TREE_CHARS = 4 * MAX_CHARS
"""The length of a tree's canonical text (:func:`reparsed`), which spells operators out: text within
MAX_CHARS writes out to less than 3.5 times its length (``a&a`` is ``a AND a``; at most MAX_NESTING ``!``
become ``NOT``), so no tree that text makes is refused, and one built in code is held to the same work."""
MAX_NESTING = 64  # parentheses plus NOTs; keeps recursion in parsing, printing and evaluation shallow
MAX_TERMS = 16
"""Distinct terms of one expression: each is a head call and a map at the image's size (about 100 MB
at 2048 x 2048 through refinement), so their number bounds a mask's memory."""
MAX_SELECTORS = 2 * MAX_TERMS
"""Instance selectors of one expression: each finds the connected regions of a map at the image's size."""
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_SELECTOR_WORD = re.compile(r"[A-Za-z]+|-?[0-9]+|,")
# Control characters that are not whitespace (str.split() separates words at \t, \n, \x1c-\x1f, \x85),
# lone surrogates (the bytes that are not UTF-8 in a command-line argument, or a JSON "\udcff"), and the
# invisible format characters that make an expression print as other text (a manifest, a terminal line,
# the WebUI's prompt box): bidirectional marks, embeddings, overrides and isolates; zero-width spaces,
# word joiners, soft hyphens, byte order marks, invisible operators and tags ("sky OR\u200b grass" printed
# as "sky OR grass" and was one term). The zero-width (non-)joiner joins letters in Persian, Indic scripts
# and emoji, so it is refused only beside ASCII or at an end, where it joins nothing.
_NOT_TEXT = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\xad\u061c\u180e\u200b\u200e\u200f\u202a-\u202e"
                       "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]"
                       "|(?:^|(?<=[\x00-\x7f]))[\u200c\u200d]|[\u200c\u200d](?=[\x00-\x7f]|$)")
_SELECTOR_ALIASES = {"largest": ("area", (1,)), "smallest": ("area", (-1,))}


@dataclass(frozen=True)
class _Token:
    kind: str  # "term", "or", "and", "not", "(", ")", "mod", "end"
    pos: int
    text: str = ""  # the term, or the operator as typed
    modifier: Modifier | Selector | None = None

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the text"
        if self.kind == "term":
            return f"the term {self.text!r}"
        return f"'{self.text}'"


def _found(text: str, i: int) -> str:
    return f"{text[i]!r}" if i < len(text) else "the end of the text"


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _lex_modifier(text: str, start: int) -> tuple[Modifier, int]:
    """Read ``{op number}`` from ``text[start] == '{'``; return it and the index after ``}``."""
    i = _skip_space(text, start + 1)
    if i == len(text):
        raise ExpressionError("'{' is never closed: expected a modifier such as {+8}", start)
    op = text[i]
    if op not in "+-*/":
        raise ExpressionError(f"unknown modifier {op!r}: expected one of '+', '-', '*', '/' after '{{'", i)
    i = _skip_space(text, i + 1)
    number = _NUMBER.match(text, i)
    if not number:
        raise ExpressionError(f"expected a number after '{{{op}', found {_found(text, i)}", i)
    amount = float(number.group())
    if not math.isfinite(amount):
        raise ExpressionError(f"the number in '{{{op}...}}' is too large", i)
    if op in "+-" and amount > MAX_RADIUS:  # as --grow: each pixel of radius is a pass over the map
        raise ExpressionError(f"'{{{op}N}}' grows or shrinks by at most {MAX_RADIUS} pixels, got {number.group()}",
                              start)
    if op == "/" and amount == 0:
        raise ExpressionError("cannot divide by zero: '{/N}' needs N > 0", i)
    if op == "*" and amount > MAX_SCALE:
        raise ExpressionError(f"'{{*N}}' scales by at most {MAX_SCALE:.0f}, got {number.group()}", start)
    if op == "/" and amount < 1 / MAX_SCALE:
        raise ExpressionError(f"'{{/N}}' needs N >= {1 / MAX_SCALE:.6f}, got {number.group()}", start)
    end = _skip_space(text, number.end())
    if end == len(text):
        raise ExpressionError(f"'{{' is never closed: expected '}}' after '{{{op}{number.group()}'", start)
    if text[end] != "}":
        raise ExpressionError(f"expected '}}' after '{{{op}{number.group()}', found {_found(text, end)}", end)
    return Modifier(op, amount), end + 1


def _selector_index(word: re.Match[str]) -> int:
    index = int(word.group())
    if index == 0 or abs(index) > MAX_INDEX:
        raise ExpressionError(f"instance index {word.group()} is out of range: 1..{MAX_INDEX} counts from the "
                              "first, -1.. from the last", word.start())
    return index


def _lex_selector(text: str, start: int) -> tuple[Selector, int]:
    """Read ``[order i, j]``, ``[largest]`` or ``[smallest]`` from ``text[start] == '['``; return it and
    the index after ``]``."""
    words = []
    i = _skip_space(text, start + 1)
    while i < len(text) and text[i] != "]":
        word = _SELECTOR_WORD.match(text, i)
        if not word:
            raise ExpressionError(f"unexpected {_found(text, i)} in an instance selector: expected an index such "
                                  "as [1], [-1], [1,3], [largest] or [area 2]", i)
        words.append(word)
        i = _skip_space(text, word.end())
    if i == len(text):
        raise ExpressionError("'[' is never closed: expected an instance selector such as [1]", start)
    if not words:
        raise ExpressionError("empty instance selector: expected an index such as [1] or [largest]", start)
    names = [w for w in words if w.group().isalpha()]
    if len(words) == 1 and names and names[0].group().lower() in _SELECTOR_ALIASES:
        return Selector(*_SELECTOR_ALIASES[names[0].group().lower()]), i + 1
    order = "left"
    if words[0].group().isalpha():
        order = words.pop(0).group().lower()
        if order in _SELECTOR_ALIASES:
            raise ExpressionError(f"[{order}] stands alone; to pick several by size write [area 1, 2] "
                                  "(largest first) or [area -1, -2] (smallest first)", names[0].start())
        if order not in ORDERS:
            raise ExpressionError(f"unknown instance order {order!r}: expected one of {', '.join(ORDERS)}, "
                                  "'largest' or 'smallest'", names[0].start())
    indices = []
    for position, word in enumerate(words):
        wants_index = position % 2 == 0
        if wants_index != (word.group() != ",") or (wants_index and word.group().isalpha()):
            expected = "an index" if wants_index else "',' or ']'"
            raise ExpressionError(f"expected {expected} in the instance selector, found {word.group()!r}", word.start())
        if wants_index:
            indices.append(_selector_index(word))
    if not indices or len(words) % 2 == 0:
        raise ExpressionError("expected an index before ']' in the instance selector", i)
    return Selector(order, tuple(indices)), i + 1


def _lex_words(text: str, start: int, stop: int) -> Iterator[_Token]:
    """Split free text into terms and keyword tokens."""
    words: list[re.Match[str]] = []
    for word in re.finditer(r"\S+", text[start:stop]):
        if word.group() in KEYWORDS:
            if words:
                yield _Token("term", start + words[0].start(), " ".join(w.group() for w in words))
                words = []
            yield _Token(KEYWORDS[word.group()], start + word.start(), word.group())
        else:
            words.append(word)
    if words:
        yield _Token("term", start + words[0].start(), " ".join(w.group() for w in words))


_SYMBOLS = {"(": "(", ")": ")", "|": "or", "&": "and", "!": "not"}


def _tokenize(text: str) -> Iterator[_Token]:
    """Tokens on demand, so the parser reports the leftmost problem first."""
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _SYMBOLS:
            yield _Token(_SYMBOLS[c], i, c)
            i += 1
        elif c == "{":
            modifier, end = _lex_modifier(text, i)
            yield _Token("mod", i, text[i:end], modifier)
            i = end
        elif c == "}":
            raise ExpressionError("unexpected '}' without a '{' (modifiers look like {+8})", i)
        elif c == "[":
            selector, end = _lex_selector(text, i)
            yield _Token("mod", i, text[i:end], selector)
            i = end
        elif c == "]":
            raise ExpressionError("unexpected ']' without a '[' (instance selectors look like [1])", i)
        elif c == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise ExpressionError("unterminated quote: expected a closing '\"'", i)
            term = " ".join(text[i + 1 : end].split())
            if not term:
                raise ExpressionError("empty quoted term: expected text between the quotes", i)
            yield _Token("term", i, term)
            i = end + 1
        else:
            end = i
            while end < len(text) and text[end] not in RESERVED:
                end += 1
            yield from _lex_words(text, i, end)
            i = end
    yield _Token("end", len(text))


def _unexpected(token: _Token, closer: str) -> ExpressionError:
    """A token where an operator, a modifier or ``closer`` should follow a complete operand."""
    hint = " (write 'AND NOT' to subtract)" if token.kind == "not" else ""
    message = f"expected 'OR', 'AND', a modifier or {closer}, found {token.describe()}{hint}"
    return ExpressionError(message, token.pos)


class _Parser:
    """Recursive descent over the tokens; ``after`` names what precedes an operand, for messages."""

    def __init__(self, tokens: Iterator[_Token]):
        self.tokens = tokens
        self.current = next(tokens)
        self.nesting = 0
        self.terms: set[str] = set()
        self.radius = 0.0  # of every {+N} and {-N} so far: each pixel of it is a pass over the map
        self.selectors = 0

    def peek(self) -> _Token:
        return self.current

    def take(self) -> _Token:
        token = self.current
        if token.kind != "end":
            self.current = next(self.tokens)
        return token

    def chain(
        self, kind: str, node_type: type[Or] | type[And], operand: Callable[[str], Expression], after: str
    ) -> Expression:
        operands = [operand(after)]
        while self.peek().kind == kind:
            operands.append(operand(f"after '{self.take().text}'"))
        return operands[0] if len(operands) == 1 else node_type(tuple(operands))

    def expr(self, after: str) -> Expression:
        return self.chain("or", Or, self.conjunction, after)

    def conjunction(self, after: str) -> Expression:
        return self.chain("and", And, self.negation, after)

    def negation(self, after: str) -> Expression:
        nots = 0
        while self.peek().kind == "not":
            token = self.take()
            nots += 1
            self.enter(token)
            after = f"after '{token.text}'"
        node = self.modified(after)
        for _ in range(nots):
            node = Not(node)
        self.nesting -= nots
        return node

    def modified(self, after: str) -> Expression:
        node = self.atom(after)
        modifiers: list[Modifier | Selector] = []
        while self.peek().kind == "mod":
            token = self.take()
            if isinstance(token.modifier, Modifier) and token.modifier.op in "+-":
                self.radius += token.modifier.amount
                if self.radius > MAX_RADIUS:
                    raise ExpressionError(f"an expression's {{+N}} and {{-N}} grow and shrink by at most {MAX_RADIUS} "
                                          "pixels in all", token.pos)
            if isinstance(token.modifier, Selector):
                self.selectors += 1
                if self.selectors > MAX_SELECTORS:
                    raise ExpressionError(f"more than {MAX_SELECTORS} instance selectors", token.pos)
            modifiers.append(token.modifier)
        if not modifiers:
            return node
        if isinstance(node, Modified):  # "(a{+1}){*2}" is the same tree as "a{+1}{*2}"
            return Modified(node.operand, node.modifiers + tuple(modifiers))
        return Modified(node, tuple(modifiers))

    def atom(self, after: str) -> Expression:
        token = self.take()
        if token.kind == "term":
            self.terms.add(token.text)
            if len(self.terms) > MAX_TERMS:
                raise ExpressionError(f"more than {MAX_TERMS} different terms; split the expression into several "
                                      "masks", token.pos)
            return Term(token.text)
        if token.kind != "(":
            raise ExpressionError(f"expected a term or '(' {after}, found {token.describe()}", token.pos)
        if self.peek().kind == ")":
            raise ExpressionError("empty parentheses: expected a term inside '()'", token.pos)
        self.enter(token)
        node = self.expr("after '('")
        close = self.take()
        if close.kind == "end":
            raise ExpressionError("'(' is never closed: expected ')'", token.pos)
        if close.kind != ")":
            raise _unexpected(close, "')'")
        self.nesting -= 1
        return node

    def enter(self, token: _Token) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            message = f"expression nested too deeply: at most {MAX_NESTING} levels of '(' and NOT"
            raise ExpressionError(message, token.pos)


def _check_characters(text: str) -> None:
    """Refuse what is no part of a word and could not be written as UTF-8 to a manifest, an HTTP answer
    or a terminal."""
    found = _NOT_TEXT.search(text)
    if found is None:
        return
    code = f"U+{ord(found.group()):04X}"
    if "\ud800" <= found.group() <= "\udfff":
        raise ExpressionError(f"{code} is not a character (text that is not UTF-8?); retype the expression",
                              found.start())
    kind = "control" if unicodedata.category(found.group()) == "Cc" else "invisible"
    raise ExpressionError(f"{kind} character {code} in the expression; remove it", found.start())


def parse(text: str) -> Expression:
    """Parse a mask expression; raises :class:`ExpressionError` with the 0-based position of the problem."""
    if not isinstance(text, str):
        raise ExpressionError(f"a mask expression must be text, got {type(text).__name__}")
    if not text.strip():
        raise ExpressionError("expected a mask expression such as 'cat OR dog', got empty text", 0)
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"expression is {len(text)} characters long; the limit is {MAX_CHARS}")
    return _parse(text)


def _parse(text: str) -> Expression:
    _check_characters(text)
    parser = _Parser(_tokenize(text))
    node = parser.expr("at the start")
    token = parser.take()
    if token.kind == ")":
        raise ExpressionError("unmatched ')': no '(' is open", token.pos)
    if token.kind != "end":
        raise _unexpected(token, "the end")
    return node


def reparsed(expression: Expression) -> Expression:
    """A tree built in code held to the bounds of text: its canonical text parsed again, so that it
    meets every rule :func:`parse` applies (ExpressionError as for text). The result evaluates as the
    tree does."""
    if not isinstance(expression, Expression):
        raise ExpressionError(f"expected a mask expression, got {type(expression).__name__}")
    try:
        text = str(expression)
    except RecursionError:  # far deeper than MAX_NESTING: printing it would exhaust Python's stack
        raise ExpressionError(f"expression nested too deeply: at most {MAX_NESTING} levels of '(' and NOT") from None
    if len(text) > MAX_TREE_CHARS:
        raise ExpressionError(f"expression is {len(text)} characters long written out; the limit is "
                              f"{MAX_TREE_CHARS} (and {MAX_CHARS} for text)")
    return _parse(text)
