"""MaskJob: the one mask job every front end builds; ranges and messages from limits.py."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ldznet_ext import limits
from ldznet_ext.errors import ExpressionError, LdznetError
from ldznet_ext.detail import DetailPass
from ldznet_ext.job import MaskJob, with_grow
from ldznet_ext.masks.expression import parse
from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.refine import RefineSettings

DEFAULTS = {"expression": "", "mode": "LD-ZNet head", "threshold": 0.5, "grow": 0.0, "feather": 0.0,
            "invert": False, "combine": "replace", "refine": True, "keep_largest": None, "min_area": 0,
            "refine_strength": 1.0, "refine_radius": None, "presence": True}
FULL = MaskJob("goblin OR sword{+4}", "zero-shot", 0.35, -3, 2.5, True, "subtract", False, 2, 40, 0.25, 7.5)


def test_defaults():
    job = MaskJob()
    assert job.as_dict() == DEFAULTS and list(job.as_dict()) == list(DEFAULTS) == list(MaskJob.field_names())
    assert not job.active and not job.zero_shot
    assert job.mask_options() == MaskOptions() and job.refine_settings() == RefineSettings()


@pytest.mark.parametrize("name, low, high", [
    ("threshold", 0.0, math.nextafter(1.0, 0.0)), ("grow", -2048.0, 2048.0), ("feather", 0.0, 256.0),
    ("keep_largest", 1, 100_000), ("min_area", 0, 1_000_000_000), ("refine_strength", 0.0, 1.0),
    ("refine_radius", 1.0, 2048.0)])
def test_every_number_accepts_its_range_ends(name, low, high):
    for value in (low, high):
        stored = getattr(MaskJob(**{name: value}), name)
        assert stored == value and type(stored) is type(low)


@pytest.mark.parametrize("name, value, message", [
    ("threshold", 1.0, "threshold must be a number in [0, 1), got 1.0"),
    ("threshold", -0.01, "threshold must be a number in [0, 1), got -0.01"),
    ("threshold", True, "threshold must be a number in [0, 1), got True"),
    ("threshold", "half", "threshold must be a number in [0, 1), got 'half'"),
    ("threshold", "nan", "threshold must be a number in [0, 1), got 'nan'"),
    ("threshold", None, "threshold must be a number in [0, 1), got None"),  # only optional numbers may be None
    ("grow", 2048.5, "grow must be a number in [-2048, 2048], got 2048.5"),
    ("grow", -2049, "grow must be a number in [-2048, 2048], got -2049"),
    ("grow", math.inf, "grow must be a number in [-2048, 2048], got inf"),
    ("feather", -1, "feather must be a number in [0, 256], got -1"),
    ("feather", "1e400", "feather must be a number in [0, 256], got '1e400'"),  # as typed
    ("keep_largest", 0, "keep_largest must be an integer in [1, 100000], got 0"),
    ("keep_largest", 100_001, "keep_largest must be an integer in [1, 100000], got 100001"),
    ("keep_largest", 2.5, "keep_largest must be an integer in [1, 100000], got 2.5"),
    ("keep_largest", False, "keep_largest must be an integer in [1, 100000], got False"),
    ("keep_largest", 1e300, "keep_largest must be an integer in [1, 100000], got 1e+300"),
    ("min_area", -1, "min_area must be an integer in [0, 1000000000], got -1"),
    ("min_area", "3.5", "min_area must be an integer in [0, 1000000000], got 3.5"),
    ("refine_strength", 1.5, "refine_strength must be a number in [0, 1], got 1.5"),
    ("refine_radius", 0.5, "refine_radius must be a number in [1, 2048], got 0.5"),
    ("refine_radius", "auto", "refine_radius must be a number in [1, 2048], got 'auto'"),
    ("mode", "head", "mode must be one of 'LD-ZNet head', 'zero-shot', got 'head'"),
    ("combine", "xor", "combine must be one of 'replace', 'add', 'subtract', 'intersect', got 'xor'"),
    ("invert", 1, "invert must be true or false, got 1"),
    ("refine", "yes", "refine must be true or false, got 'yes'"),
    ("min_area", "5_0", "min_area must be an integer in [0, 1000000000], got '5_0'"),
    ("min_area", "\u0661\u0662", "min_area must be an integer in [0, 1000000000], got '\u0661\u0662'"),
    ("threshold", "0_5", "threshold must be a number in [0, 1), got '0_5'"),
    ("expression", 5, "expression must be text, got int"),
    ("expression", "a" * 2001, "expression is 2001 characters long; the limit is 2000"),
])
def test_bad_values_are_refused_by_name(name, value, message):
    with pytest.raises(LdznetError) as caught:
        MaskJob(**{name: value})
    assert str(caught.value) == message


def test_an_integer_too_long_to_print_is_described_by_its_size():
    with pytest.raises(LdznetError) as caught:
        MaskJob(min_area=10**5000)
    assert str(caught.value) == "min_area must be an integer in [0, 1000000000], got an integer of about 5001 digits"


def test_number_messages_are_the_limits_own():
    for name, limit in (("threshold", limits.THRESHOLD), ("grow", limits.GROW), ("feather", limits.FEATHER),
                        ("keep_largest", limits.KEEP_LARGEST), ("min_area", limits.MIN_AREA),
                        ("refine_strength", limits.REFINE_STRENGTH), ("refine_radius", limits.REFINE_RADIUS)):
        with pytest.raises(LdznetError) as caught:
            MaskJob(**{name: -5000})
        assert str(caught.value) == f"{name} must be {limit.describe()}, got -5000"


def test_text_from_json_script_args_and_infotext_is_read():
    job = MaskJob("  cat \n OR\tdog ", "ZERO-SHOT", " 0.4 ", "-3", "1.5", "TRUE", " Add ", "false", "5", "10.0",
                  "0.5", "8")
    assert job == MaskJob("cat OR dog", "zero-shot", 0.4, -3.0, 1.5, True, "add", False, 5, 10, 0.5, 8.0)
    assert job.as_dict() == {"expression": "cat OR dog", "mode": "zero-shot", "threshold": 0.4, "grow": -3.0,
                             "feather": 1.5, "invert": True, "combine": "add", "refine": False, "keep_largest": 5,
                             "min_area": 10, "refine_strength": 0.5, "refine_radius": 8.0, "presence": True}
    assert [type(v) for v in job.as_dict().values()] == [str, str, float, float, float, bool, str, bool, int, int,
                                                         float, float, bool]
    assert MaskJob(keep_largest=3.0, min_area=7.0).mask_options() == MaskOptions(keep_largest=3, min_area=7)


@pytest.mark.parametrize("expression, grow", [("cat{+2048}", 1), ("cat{+2000}", 49), ("cat{-1000} OR dog{+1000}", -49)])
def test_grow_and_the_expressions_own_add_up_to_the_bound(expression, grow):
    """grow is one more {+N} on the whole mask: with the expression's own it may not pass 2048 pixels in
    all, or the job's tree would be one that no text parses to."""
    with pytest.raises(LdznetError) as caught:
        MaskJob(expression, grow=grow)
    assert str(caught.value) == (f"grow {grow:g} and the expression's {{+N}} / {{-N}} add up to more than 2048 "
                                 "pixels")
    assert str(MaskJob(expression, grow=grow - (1 if grow > 0 else -1)).tree())


def test_expression_is_parsed_at_construction():
    with pytest.raises(ExpressionError) as caught:
        MaskJob("cat AND")
    assert caught.value.position == 7
    with pytest.raises(ExpressionError, match="found 'OR' at position 12$"):  # in the text as typed
        MaskJob("cat    OR   OR dog")
    with pytest.raises(ExpressionError, match="at position 6$"):
        DetailPass("\t  cat)")
    assert MaskJob("  cat\t OR\n dog ").expression == "cat OR dog"  # recorded in one form
    assert MaskJob("a" * 2000).expression == "a" * 2000
    assert MaskJob(" \n ").active is False


def test_the_engines_pieces():
    assert FULL.tree() == with_grow(parse("goblin OR sword{+4}"), -3) == parse("(goblin OR sword{+4}){-3}")
    assert MaskJob("cat{+2}", grow=1.5).tree() == parse("cat{+2}{+1.5}")
    assert MaskJob("cat").tree() == parse("cat")
    assert FULL.mask_options() == MaskOptions(threshold=0.35, invert=True, keep_largest=2, min_area=40, feather=2.5)
    assert FULL.refine_settings() == RefineSettings(enabled=False, strength=0.25, radius=7.5)
    assert FULL.zero_shot and FULL.active
    with pytest.raises(LdznetError, match="^the mask expression is empty$"):
        MaskJob().tree()


def test_replace_validates_and_the_job_is_frozen():
    assert FULL.replace(expression="cat", combine="ADD") == dataclasses.replace(FULL, expression="cat", combine="add")
    assert FULL.replace(expression="cat").tree() == parse("cat{-3}")
    with pytest.raises(LdznetError, match=r"^threshold must be a number in \[0, 1\), got 2$"):
        FULL.replace(threshold=2)
    with pytest.raises(LdznetError, match=r"^unknown fields \['thresold'\]; expected some of \[.*'threshold'"):
        FULL.replace(thresold=0.3)  # was dataclasses' raw TypeError
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL.threshold = 0.1
    assert hash(FULL) == hash(MaskJob(**FULL.as_dict()))


def test_dict_round_trip():
    data = FULL.as_dict()
    assert MaskJob.from_dict(data) == FULL
    assert MaskJob.from_dict(json.loads(json.dumps(data))) == FULL
    assert MaskJob.from_dict({"expression": "cat", "threshold": None, "keep_largest": None}) == MaskJob("cat")
    assert MaskJob.from_dict({"expression": "cat", "image": "..."}, other_fields=("image",)) == MaskJob("cat")
    assert FULL.manifest_settings() == {k: v for k, v in data.items() if k != "expression"}
    assert "expression" not in FULL.manifest_settings() and len(FULL.manifest_settings()) == 12


def test_from_dict_refuses_unknown_names_and_non_objects():
    with pytest.raises(LdznetError) as caught:
        MaskJob.from_dict({"expression": "cat", "colour": 1, "Threshold": 0.2}, other_fields=("image",))
    assert str(caught.value) == (
        "unknown fields ['Threshold', 'colour']; expected ['combine', 'expression', 'feather', 'grow', 'image', "
        "'invert', 'keep_largest', 'min_area', 'mode', 'presence', 'refine', 'refine_radius', 'refine_strength', 'threshold']")
    with pytest.raises(LdznetError, match=r"^a mask job must be an object \(a mapping\), got list$"):
        MaskJob.from_dict(["cat"])


def test_json_schema():
    schema = MaskJob.json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert {k: v for k, v in schema.items() if k != "properties"} == {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "LD-ZNet mask job", "type": "object",
        "additionalProperties": False}
    properties = schema["properties"]
    assert list(properties) == list(DEFAULTS)
    assert {name: spec["default"] for name, spec in properties.items()} == DEFAULTS
    assert all(isinstance(spec["description"], str) and spec["description"] for spec in properties.values())
    without_text = {name: {k: v for k, v in spec.items() if k not in ("default", "description")}
                    for name, spec in properties.items()}
    assert without_text == {
        "expression": {"type": "string", "maxLength": 2000},
        "mode": {"type": "string", "enum": ["LD-ZNet head", "zero-shot"]},
        "threshold": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "grow": {"type": "number", "minimum": -2048, "maximum": 2048},
        "feather": {"type": "number", "minimum": 0, "maximum": 256},
        "invert": {"type": "boolean"},
        "combine": {"type": "string", "enum": ["replace", "add", "subtract", "intersect"]},
        "refine": {"type": "boolean"},
        "keep_largest": {"type": ["integer", "null"], "minimum": 1, "maximum": 100_000},
        "min_area": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
        "refine_strength": {"type": "number", "minimum": 0, "maximum": 1},
        "refine_radius": {"type": ["number", "null"], "minimum": 1, "maximum": 2048},
        "presence": {"type": "boolean"},
    }
    assert properties["keep_largest"]["description"] == "keep only this many largest objects (null: all)"


def test_presence_is_a_job_switch():
    assert MaskJob.from_dict({"presence": "false"}).mask_options() == MaskOptions(presence=False)
    with pytest.raises(LdznetError, match="presence must be true or false, got 2"):
        MaskJob(presence=2)
