"""Mask expressions: grammar, canonical text, error positions and evaluation on exact small maps."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch

from ldznet_ext.errors import ExpressionError, LdznetError
from ldznet_ext.limits import MAX_RADIUS
from ldznet_ext.masks.expression import (MAX_CHARS, MAX_NESTING, MAX_SELECTORS, MAX_TERMS, And, Modified, Modifier, Not,
                                         Or, Term, parse, reparsed)
from ldznet_ext.masks.tree import MAX_SCALE

A, B, C, D = Term("a"), Term("b"), Term("c"), Term("d")


@pytest.mark.parametrize(
    "text, tree",
    [
        ("a OR b AND NOT c", Or((A, And((B, Not(C)))))),
        ("NOT a AND b OR c", Or((And((Not(A), B)), C))),
        ("a | b & !c", Or((A, And((B, Not(C)))))),
        ("(a OR b) AND c", And((Or((A, B)), C))),
        ("a OR b OR c AND d", Or((A, B, And((C, D))))),
        ("a OR (b OR c)", Or((A, Or((B, C))))),
        ("((a))", A),
        ("!!a", Not(Not(A))),
        ("NOT(a)AND(b)", And((Not(A), B))),
        ("a{+1}{*2}", Modified(A, (Modifier("+", 1), Modifier("*", 2)))),
        ("(a{+1}){*2}", Modified(A, (Modifier("+", 1), Modifier("*", 2)))),
        ("a { - 4 } ", Modified(A, (Modifier("-", 4),))),
        ("NOT a{+1.5}", Not(Modified(A, (Modifier("+", 1.5),)))),
        ("(NOT a){/2}", Modified(Not(A), (Modifier("/", 2),))),
        ("(a OR b){+.5}", Modified(Or((A, B)), (Modifier("+", 0.5),))),
        ("a{*2.}", Modified(A, (Modifier("*", 2),))),
    ],
)
def test_precedence_parentheses_and_modifiers(text, tree):
    assert parse(text) == tree


@pytest.mark.parametrize(
    "text, terms",
    [
        ("cat or dog", ("cat or dog",)),  # keywords are upper case only
        ("orange OR Norway", ("orange", "Norway")),
        ("ORange ANDroid NOTebook", ("ORange ANDroid NOTebook",)),
        ("  big \t red\n car  OR x", ("big red car", "x")),
        ("t-shirt AND-ish", ("t-shirt AND-ish",)),  # a keyword must stand alone between spaces or symbols
        ('"cat OR dog" OR " (x) {+1} "', ("cat OR dog", "(x) {+1}")),
        ("b OR a AND b OR c", ("b", "a", "c")),
        ("cat OR cat", ("cat",)),
        ("person's hat*2 OR a+b", ("person's hat*2", "a+b")),
    ],
)
def test_terms_are_normalised_and_listed_once_in_order(text, terms):
    assert parse(text).terms() == terms


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("goblin | sword", "goblin OR sword"),
        ("(cat | dog) & !collar {+8}", "(cat OR dog) AND NOT collar{+8}"),
        ("face{-4} OR hair{*1.5}", "face{-4} OR hair{*1.5}"),
        ("((a & b)) | (c)", "a AND b OR c"),
        ("a & (b & c)", "a AND (b AND c)"),
        ("(!a){+08.50}", "(NOT a){+8.5}"),
        ("a{*0.0000001}", "a{*0.0000001}"),
        ('"OR" OR "a|b" OR "x AND y" OR "cat and dog"', '"OR" OR "a|b" OR "x AND y" OR cat and dog'),
    ],
)
def test_canonical_text(text, canonical):
    e = parse(text)
    assert str(e) == canonical
    assert parse(canonical) == e


ERRORS = [
    ("", 0, "expected a mask expression such as 'cat OR dog', got empty text"),
    (" \t ", 0, "expected a mask expression such as 'cat OR dog', got empty text"),
    ("(a", 0, "'(' is never closed: expected ')'"),
    ("x AND ((a) OR b", 6, "'(' is never closed"),
    ("a)", 1, "unmatched ')': no '(' is open"),
    ("(a OR b)) OR c", 8, "unmatched ')'"),
    ("a{%3}", 2, "unknown modifier '%': expected one of '+', '-', '*', '/' after '{'"),
    ("a{+x}", 3, "expected a number after '{+', found 'x'"),
    ("a{+}", 3, "expected a number after '{+', found '}'"),
    ("a{+3", 1, "'{' is never closed: expected '}' after '{+3'"),
    ("a{+3 x}", 5, "expected '}' after '{+3', found 'x'"),
    ("a{+8]", 4, "expected '}' after '{+8', found ']'"),  # a modifier closes with '}' only
    ("a{+1e3}", 4, "expected '}' after '{+1', found 'e'"),
    ("a{", 1, "'{' is never closed: expected a modifier such as {+8}"),
    ("a{/0}", 3, "cannot divide by zero: '{/N}' needs N > 0"),
    ("a{*1000001}", 1, "'{*N}' scales by at most 1000000, got 1000001"),
    ("a{/0.0000009}", 1, "'{/N}' needs N >= 0.000001, got 0.0000009"),
    ("a{*" + "9" * 400 + "}", 3, "the number in '{*...}' is too large"),
    ("a} OR b", 1, "unexpected '}' without a '{'"),
    ("{+2} a", 0, "expected a term or '(' at the start, found '{+2}'"),
    ("cat OR", 6, "expected a term or '(' after 'OR', found the end of the text"),
    ("cat |  ", 7, "expected a term or '(' after '|', found the end of the text"),
    ("AND dog", 0, "expected a term or '(' at the start, found 'AND'"),
    ("a OR OR b", 5, "expected a term or '(' after 'OR', found 'OR'"),
    ("a & | b", 4, "expected a term or '(' after '&', found '|'"),
    ("!", 1, "expected a term or '(' after '!', found the end of the text"),
    ("a AND NOT", 9, "expected a term or '(' after 'NOT', found the end of the text"),
    ("()", 0, "empty parentheses: expected a term inside '()'"),
    ("a OR ( )", 5, "empty parentheses"),
    ('"abc', 0, "unterminated quote: expected a closing '\"'"),
    ('a OR "b', 5, "unterminated quote"),
    ('a OR " "', 5, "empty quoted term: expected text between the quotes"),
    ("a NOT b", 2, "expected 'OR', 'AND', a modifier or the end, found 'NOT' (write 'AND NOT' to subtract)"),
    ("(a ! b)", 3, "expected 'OR', 'AND', a modifier or ')', found '!'"),
    ("a (b)", 2, "expected 'OR', 'AND', a modifier or the end, found '('"),
    ('big "red car"', 4, "expected 'OR', 'AND', a modifier or the end, found the term 'red car'"),
    ("AND b{%3}", 0, "expected a term or '(' at the start, found 'AND'"),  # the leftmost problem wins
    ("a{+٣}", 3, "expected a number after '{+', found '٣'"),  # ASCII digits only
]


@pytest.mark.parametrize("text, position, message", ERRORS)
def test_errors_name_the_problem_and_its_position(text, position, message):
    with pytest.raises(ExpressionError) as info:
        parse(text)
    assert info.value.position == position
    assert str(info.value).startswith(message)
    assert str(info.value).endswith(f" at position {position}")


def test_nesting_is_limited():
    deep = "(" * MAX_NESTING + "a" + ")" * MAX_NESTING
    assert parse(deep) == A
    assert parse("!" * MAX_NESTING + "a").terms() == ("a",)
    with pytest.raises(ExpressionError, match=f"nested too deeply: at most {MAX_NESTING} levels") as info:
        parse("(" + deep + ")")
    assert info.value.position == MAX_NESTING
    with pytest.raises(ExpressionError, match="nested too deeply") as info:
        parse("(" * 40 + "!" * 30 + "a" + ")" * 40)
    assert info.value.position == 40 + 24


def test_nesting_is_counted_per_operand_not_over_the_whole_expression():
    """Each NOT and each '(' is left when its operand ends: without that, MAX_NESTING + 1 siblings
    were refused as nested too deeply."""
    count = MAX_NESTING + 1
    assert parse(" OR ".join(["NOT a"] * count)) == Or(tuple(Not(A) for _ in range(count)))
    assert parse(" OR ".join(["(a)"] * count)) == Or(tuple(A for _ in range(count)))


def test_selector_names_ignore_case_and_quoted_whitespace_collapses():
    assert parse("cat[LARGEST]") == parse("cat[largest]")
    assert parse('"big   cat"') == parse('"big cat"') == Term("big cat")


def test_distinct_terms_are_limited():
    """Each distinct term is one map at the image's size (and one head call): 667 two-letter terms
    in 2,000 characters took 16 GB and two minutes on a 1024 x 1024 image."""
    names = [f"t{i}" for i in range(MAX_TERMS + 1)]
    assert len(parse(" OR ".join(names[:-1]) + " OR t0").terms()) == MAX_TERMS  # repeats are one map
    text = " | ".join(names)
    with pytest.raises(ExpressionError, match=f"more than {MAX_TERMS} different terms") as info:
        parse(text)
    assert info.value.position == text.index(names[-1])


def test_text_is_limited_in_length():
    """The bound holds wherever text is parsed (the Python API's predict as well as a job): it is what
    keeps the count of operations of one expression small."""
    assert len(parse("a" * MAX_CHARS).terms()) == 1
    with pytest.raises(ExpressionError, match=f"^expression is {MAX_CHARS + 1} characters long; the limit is "
                                              f"{MAX_CHARS}$"):
        parse("a" * (MAX_CHARS + 1))


def test_a_tree_is_held_to_what_text_of_the_bound_can_make():
    """A tree is checked by its canonical text, which spells operators out (``a&b`` is ``a AND b``):
    every tree that text within the bound makes passes, and an OR of 100,000 repeats of one term (one
    map, but 100,000 maxima over the image) is refused."""
    dense = "&".join(["a"] * ((MAX_CHARS + 1) // 2))  # the most operators the bound allows
    assert len(dense) in (MAX_CHARS - 1, MAX_CHARS)
    assert str(reparsed(parse(dense))).count(" AND ") == dense.count("&")
    with pytest.raises(ExpressionError, match="^expression is .* characters long written out"):
        reparsed(Or(tuple(Term("a") for _ in range(100_000))))


def test_instance_selectors_are_limited():
    """Each selector is a connected-components pass over a map at the image's size: 660 of them fit in
    2,000 characters and took about a minute on a 4096 x 4096 image."""
    allowed = "a" + "[1]" * MAX_SELECTORS
    assert len(parse(allowed).terms()) == 1
    text = allowed + " OR b[largest]"
    with pytest.raises(ExpressionError, match=f"more than {MAX_SELECTORS} instance selectors") as info:
        parse(text)
    assert info.value.position == text.index("[largest]")


def test_grow_and_shrink_modifiers_are_bounded():
    """A {+N} costs N passes over the map, so N has --grow's bound, and so has their sum."""
    half = MAX_RADIUS / 2
    assert parse(f"a{{+{MAX_RADIUS}}}") == Modified(A, (Modifier("+", MAX_RADIUS),))
    assert len(parse(f"a{{+{half}}} OR b{{-{half}}}{{*9999}}").terms()) == 2  # {*w} costs one pass
    with pytest.raises(ExpressionError, match=f"at most {MAX_RADIUS} pixels") as info:
        parse(f"a{{-{MAX_RADIUS + 1}}}")
    assert info.value.position == 1
    text = f"a{{+{half}}}{{-{half}}} OR b{{+1}}"
    with pytest.raises(ExpressionError, match=f"grow and shrink by at most {MAX_RADIUS} pixels in all") as info:
        parse(text)
    assert info.value.position == text.index("{+1}")
    with pytest.raises(ExpressionError, match=f"at most {MAX_RADIUS}"):
        Modifier("-", 1e9)


@pytest.mark.parametrize("text, position, code", [
    ("cat\x00dog", 3, "U+0000"),
    ("cat OR \x1b[31mdog", 7, "U+001B"),
    ("caf\udce9", 3, "U+DCE9"),  # a byte that is not UTF-8 in a command-line argument
    ('"a\x7f"', 2, "U+007F"),
    ("cat \u202eOR dog", 4, "U+202E"),  # a right-to-left override: the term would print as other text
    ("a\u2066b", 1, "U+2066"),
    ("sky OR\u200b grass", 6, "U+200B"),  # printed as "sky OR grass", it was one term
    ("sky \u2060OR grass", 4, "U+2060"),
    ("\ufeffsky", 0, "U+FEFF"),
    ("gob\u00adlin", 3, "U+00AD"),
    ("sky OR\u200d grass", 6, "U+200D"),  # a joiner beside ASCII joins nothing
    ("\u200csky", 0, "U+200C"),
    ("\u200d\u043a\u043e\u0442", 0, "U+200D"),  # at the start it joins nothing, even before non-ASCII
    ("cat\U000e0041", 3, "U+E0041"),
])
def test_control_characters_and_lone_surrogates_are_refused(text, position, code):
    """They are never part of a word, and a lone surrogate cannot be written as UTF-8 (a manifest, an
    HTTP answer, a terminal)."""
    with pytest.raises(ExpressionError, match=re.escape(code)) as info:
        parse(text)
    assert info.value.position == position and "\n" not in str(info.value)
    assert parse("a\tb\r\nOR\x1cc").terms() == ("a b", "c")  # whitespace, as str.split() reads it
    assert parse("\u05e7\u05d8 OR dog").terms() == ("\u05e7\u05d8", "dog")  # right-to-left text itself is text
    # joiners inside words of scripts that need them (Persian "mi-khaham", an emoji family) are text
    assert parse("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 OR \U0001f468\u200d\U0001f469").terms() == (
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f468\u200d\U0001f469")


def test_parse_rejects_non_text():
    with pytest.raises(ExpressionError, match="a mask expression must be text, got bytes"):
        parse(b"cat")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Term(" cat"), "single spaces"),
        (lambda: Term(""), "non-empty"),
        (lambda: Term('say "hi"'), "cannot contain"),
        (lambda: Or((A,)), "Or needs two or more Expressions"),
        (lambda: And((A, "b")), "And needs two or more Expressions"),
        (lambda: Not("a"), "Not needs an Expression"),
        (lambda: Modified(Modified(A, (Modifier("+", 1),)), (Modifier("*", 2),)), "other than Modified"),
        (lambda: Modified(A, ()), "one or more Modifier"),
        (lambda: Modifier("%", 1), "one of '\\+', '-', '\\*', '/'"),
        (lambda: Modifier("+", -1), "finite number >= 0"),
        (lambda: Modifier("/", 0), "needs N > 0"),
    ],
)
def test_trees_are_validated(build, message):
    with pytest.raises(ExpressionError, match=message):
        build()


def test_trees_are_immutable_and_hashable():
    e = parse("a OR b{+1}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.operands = ()
    assert hash(e) == hash(parse("a | b {+1.0}"))
    assert Or((A, B)) != And((A, B))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Values exact in binary floating point, so every expected array below is exact.
MAPS = {
    "a": t([[0.25, 0.75], [0.5, 0.0]]),
    "b": t([[0.5, 0.125], [1.0, 0.5]]),
    "c": t([[1.0, 0.25], [0.0, 0.625]]),
}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a OR b", [[0.5, 0.75], [1.0, 0.5]]),
        ("a AND b", [[0.25, 0.125], [0.5, 0.0]]),
        ("NOT a", [[0.75, 0.25], [0.5, 1.0]]),
        ("a OR b AND c", [[0.5, 0.75], [0.5, 0.5]]),  # max(a, min(b, c))
        ("(a OR b) AND c", [[0.5, 0.25], [0.0, 0.5]]),
        ("NOT a AND b", [[0.5, 0.125], [0.5, 0.5]]),  # min(1 - a, b)
        ("NOT (a AND b)", [[0.75, 0.875], [0.5, 1.0]]),
        ("a{*2}", [[0.5, 1.0], [1.0, 0.0]]),  # 1.5 is clamped
        ("a{/4}", [[0.0625, 0.1875], [0.125, 0.0]]),
        ("a{*0}", [[0.0, 0.0], [0.0, 0.0]]),
        ("b{/0.5} AND c", [[1.0, 0.25], [0.0, 0.625]]),
        ("a{*2}{/4}", [[0.125, 0.25], [0.25, 0.0]]),  # left to right: the clamp happens before the division
        ("a{/4}{*2}", [[0.125, 0.375], [0.25, 0.0]]),
    ],
)
def test_evaluate_combines_exactly(text, expected):
    assert torch.equal(parse(text).evaluate(MAPS), t(expected))


def test_dilation_and_erosion_modifiers_use_true_disks():
    dot = torch.zeros(5, 5)
    dot[2, 2] = 1
    cross = t([[0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    disk2 = t([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    maps = {"dot": dot}
    assert torch.equal(parse("dot{+1}").evaluate(maps), cross)
    assert torch.equal(parse("dot{+2}").evaluate(maps), disk2)
    assert torch.equal(parse("dot{+1}{+1}").evaluate(maps), disk2)  # cross ⊕ cross is the radius-2 disk
    assert torch.equal(parse("dot{+2}{-1}").evaluate(maps), cross)  # only the cross fits the cross into disk2
    assert torch.equal(parse("dot{+2}{-2}").evaluate(maps), dot)
    assert torch.equal(parse("dot{+0}").evaluate(maps), dot)
    # The modifier binds tighter than NOT: NOT dilates first, then inverts; "(NOT dot){+1}" dilates the inverse.
    assert torch.equal(parse("NOT dot{+1}").evaluate(maps), 1 - cross)
    assert torch.equal(parse("(NOT dot){+1}").evaluate(maps), torch.ones(5, 5))
    assert torch.equal(parse("(NOT dot){-1}").evaluate(maps), 1 - cross)


def test_evaluate_accepts_batches_and_returns_new_tensors():
    batch = {k: torch.stack([v, 1 - v]) for k, v in MAPS.items()}
    out = parse("a OR b").evaluate(batch)
    assert torch.equal(out, torch.stack([t([[0.5, 0.75], [1.0, 0.5]]), t([[0.75, 0.875], [0.5, 1.0]])]))
    same = parse("a").evaluate(MAPS)
    assert torch.equal(same, MAPS["a"]) and same is not MAPS["a"]


def test_evaluate_rejects_missing_or_mismatched_maps():
    with pytest.raises(LdznetError, match=r"no probability map for term 'dog'; maps were given for \['a', 'b', 'c'\]"):
        parse("a OR dog").evaluate(MAPS)
    differ = r"the maps for 'a' and 'b' differ: \(2, 2\) torch.float32 on cpu vs \(3, 2\)"
    with pytest.raises(LdznetError, match=differ):
        parse("a OR b").evaluate({"a": MAPS["a"], "b": torch.zeros(3, 2)})
    with pytest.raises(LdznetError, match=r"^threshold must be a number in \[0, 1\), got 2$"):
        parse("a").evaluate(MAPS, threshold=2)
    not_float = r"the map for 'a' must be a float tensor \[H, W\] or \[B, H, W\], got torch.int64"
    with pytest.raises(LdznetError, match=not_float):
        parse("a").evaluate({"a": torch.zeros(2, 2, dtype=torch.long)})
    with pytest.raises(LdznetError, match="got ndarray"):
        parse("a").evaluate({"a": MAPS["a"].numpy()})


# Free-text terms that stay plain, and ones that canonical text must quote.
VOCABULARY = ["cat", "big red car", "orange", "Norway", "t-shirt", "a+b*2", "cat and dog", "ä ö", "person's hat",
              "OR", "NOT me", "a | b", "(x)", "{+1}", "x AND y", "don't!"]  # fmt: skip
AMOUNTS = [0, 1, 2.5, 0.125, 100, 1e-7, 3.3333, 123456789.5]


def random_tree(rng: random.Random, depth: int):
    kind = rng.choice(["term", "term", "not", "mod", "or", "and"] if depth else ["term"])
    if kind == "term":
        return Term(rng.choice(VOCABULARY))
    if kind == "not":
        return Not(random_tree(rng, depth - 1))
    if kind == "mod":
        operand = random_tree(rng, depth - 1)
        while isinstance(operand, Modified):
            operand = random_tree(rng, depth - 1)
        ops = [(op, a) for op in "+-*/" for a in AMOUNTS
               if not (op == "/" and a < 1 / MAX_SCALE) and not (op in "+-" and a > MAX_RADIUS)
               and not (op == "*" and a > MAX_SCALE)]
        return Modified(operand, tuple(Modifier(*rng.choice(ops)) for _ in range(rng.randint(1, 3))))
    operands = tuple(random_tree(rng, depth - 1) for _ in range(rng.randint(2, 4)))
    return (Or if kind == "or" else And)(operands)


def random_text(rng: random.Random, depth: int) -> str:
    """Surface syntax with random spellings, spacing and redundant parentheses."""
    space = lambda: rng.choice(["", " ", "  ", "\t"])  # noqa: E731
    kind = rng.choice(["term", "term", "quoted", "not", "mod", "or", "and", "paren"] if depth else ["term"])
    if kind == "term":
        return space() + rng.choice(VOCABULARY[:9]) + space()
    if kind == "quoted":
        return f'{space()}"{space()}{rng.choice(VOCABULARY)}{space()}"'
    if kind == "not":
        return rng.choice(["NOT ", "!", "! "]) + random_text(rng, depth - 1)
    if kind == "mod":
        amounts = ["1", "2.5", ".5", "10."]
        mods = "".join(f"{{{rng.choice('+-*')}{rng.choice(amounts)}}}" for _ in range(rng.randint(1, 2)))
        return f"({random_text(rng, depth - 1)}){space()}{mods}"
    if kind == "paren":
        return f"({random_text(rng, depth - 1)})"
    word = rng.choice(["OR", "|"] if kind == "or" else ["AND", "&"])
    return f" {word} ".join(f"({random_text(rng, depth - 1)})" for _ in range(rng.randint(2, 3)))


def test_random_trees_round_trip_through_canonical_text():
    rng = random.Random(1234)
    for _ in range(200):
        tree = random_tree(rng, rng.randint(0, 4))
        text = str(tree)
        assert parse(text) == tree, text
        assert str(parse(text)) == text


def test_random_texts_parse_to_canonical_fixed_points():
    rng = random.Random(5678)
    maps = {w: torch.rand(4, 5, generator=torch.Generator().manual_seed(i)) for i, w in enumerate(VOCABULARY)}
    for _ in range(200):
        text = random_text(rng, rng.randint(0, 4))
        tree = parse(text)
        canonical = str(tree)
        assert parse(canonical) == tree, (text, canonical)
        assert str(parse(canonical)) == canonical
        out = tree.evaluate(maps)
        assert out.shape == (4, 5) and 0 <= out.min() and out.max() <= 1


def test_the_largest_scale_keeps_an_absent_terms_zeros_zero():
    """0 x inf is NaN: an unbounded {*w} turned a term's zeros (an absent term) into NaN, and NaN selects
    nothing, also through OR and NOT."""
    zeros, half = torch.zeros(2, 2), torch.full((2, 2), 0.5)
    maps = {"a": zeros, "b": half}
    assert parse("NOT a{*1000000}").evaluate(maps).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert parse("NOT a{/0.000001}").evaluate(maps).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert parse("a{*1000000} OR b").evaluate(maps).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert parse("b{*1000000}").evaluate({"b": half.half()}).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ExpressionError, match="scales by a factor of at most 1000000"):
        Modifier("*", 1e39)
