"""Every numeric option of every command is bounded, refused in one line before any work, and the
library's settings objects refuse the same values with the same words (``ldznet_ext/limits.py``)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from ldznet_ext import cli
from ldznet_ext.errors import LdznetError
from ldznet_ext.limits import SEED, THRESHOLD, Limit
from ldznet_ext.devices import resolve_device
from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.refine import RefineSettings
from ldznet_ext.segmenter import SegmenterSettings
from ldznet_ext.zeroshot import ZeroShotSettings


def _numeric_options(parser: argparse.ArgumentParser, path: str = "ldznet"):
    """(command, option, type) of every option whose values are numbers (not a list of choices), in
    every sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_options(sub, f"{path} {name}")
        elif action.choices is None and (action.type in (int, float) or hasattr(action.type, "limit")):
            yield path, action.option_strings[-1] if action.option_strings else action.dest, action.type


def test_every_numeric_option_of_every_command_is_bounded():
    options = list(_numeric_options(cli.build_parser()))
    assert len(options) > 40  # mask, batch, eval, train, world, data, demo
    unbounded = [f"{command} {option}" for command, option, kind in options
                 if kind in (int, float) or kind.limit.low is None or kind.limit.high is None]
    assert unbounded == []


def test_every_bounded_option_states_its_range_in_its_help():
    """The range is the Limit's: stated by the command's own text, or added from the Limit."""
    def helps(parser: argparse.ArgumentParser, path: str = "ldznet"):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from helps(sub, f"{path} {name}")
            elif hasattr(action.type, "limit"):
                yield f"{path} {action.option_strings[-1] if action.option_strings else action.dest}", action
    options = dict(helps(cli.build_parser()))
    assert [name for name, action in options.items() if not action.type.limit.stated_in(action.help)] == []
    assert options["ldznet mask --min-area"].help == "drop regions smaller than A pixels; 0..1000000000"
    assert options["ldznet world sample --seed"].help == "scene seed; 0..2^63-1"
    assert options["ldznet train --ema"].help.endswith("; [0, 1)")


# The values of issue #21, and one per kind of option: each is refused by argparse (status 2) in one line.
REFUSED = [
    (["mask", "i.png", "cat", "-o", "m.png", "--feather", "1e9"], "argument --feather: expected a number in [0, 256], got 1e9"),
    (["mask", "i.png", "cat", "-o", "m.png", "--resolution", "1000000"],
     "argument --resolution: expected an integer in [64, 2048], got 1000000"),
    (["mask", "i.png", "cat", "-o", "m.png", "--refine-radius", "1e12"],
     "argument --refine-radius: expected a number in [1, 2048], got 1e12"),
    (["mask", "i.png", "cat", "-o", "m.png", "--seed", "1e23"],
     f"argument --seed: expected an integer in [0, {2**63 - 1}], got '1e23'"),
    (["mask", "i.png", "cat", "-o", "m.png", "--seed", str(10**23)],
     f"argument --seed: expected an integer in [0, {2**63 - 1}], got {10**23}"),
    (["mask", "i.png", "cat", "-o", "m.png", "--draws", "65"], "argument --draws: expected an integer in [1, 64], got 65"),
    (["mask", "i.png", "cat", "-o", "m.png", "--grow=-1e9"], "argument --grow: expected a number in [-2048, 2048]"),
    (["mask", "i.png", "cat", "-o", "m.png", "--threshold", "nan"], "argument --threshold: expected a number in [0, 1)"),
    (["batch", "in", "cat", "-o", "out", "--batch-size", "100000"], "argument --batch-size: expected an integer in [1, 64]"),
    (["eval", "--workers", "-1"], "argument --workers: expected an integer in [0, 64], got -1"),
    (["eval", "--boundary", "0"], "argument --boundary: expected a number in (0, 64], got 0"),
    (["train", "--model", "m", "-o", "o", "--lr", "0"], "argument --lr: expected a number in (0, 1], got 0"),
    (["train", "--model", "m", "-o", "o", "--lr", "inf"], "argument --lr: expected a number in (0, 1], got inf"),
    (["train", "--model", "m", "-o", "o", "--steps", "1e23"], "argument --steps: expected an integer in [1, 10000000]"),
    (["world", "sample", "--seed", "-1", "-o", "o"], "argument --seed: expected an integer in [0, 9223372036854775807]"),
    (["world", "split", "test", "--count", "10000000"], "argument --count: expected an integer in [1, 1000000]"),
    (["data", "summary", "world:test:1", "--size", "100000"], "argument --size: expected an integer in [8, 4096]"),
    (["demo", "--threshold", "2"], "argument --threshold: expected a number in [0, 1), got 2"),
    (["mask", "absent.png", "cat", "-o", "m.png", "--device", "meta"],
     "argument --device: unknown device 'meta': expected auto, cpu, cuda, cuda:N or mps"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(a[:1] + a[-2:]) for a, _ in REFUSED])
def test_out_of_range_options_are_refused_in_one_line(ldznet, argv, message, tmp_path):
    code, stdout, err = ldznet(*argv)
    assert code == 2 and stdout == ""
    assert message in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"ldznet {argv[0]}")  # argparse's usage line, then one error line


@pytest.mark.parametrize("make, message", [
    (lambda: MaskOptions(feather=1e9), "feather must be a number in [0, 256], got 1000000000.0"),
    (lambda: MaskOptions(keep_largest=10**9), "keep_largest must be an integer in [1, 100000]"),
    (lambda: MaskOptions(threshold=1.0), "threshold must be a number in [0, 1), got 1.0"),
    (lambda: RefineSettings(radius=1e12), "refine radius must be a number in [1, 2048], got 1000000000000.0"),
    (lambda: RefineSettings(strength=float("nan")), "refine strength must be a number in [0, 1], got nan"),
    (lambda: SegmenterSettings(resolution=1_000_000), "resolution must be an integer in [64, 2048], got 1000000"),
    (lambda: SegmenterSettings(seed=10**23), f"seed must be an integer in [0, {2**63 - 1}], got {10**23}"),
    (lambda: SegmenterSettings(draws=10**23), f"draws must be an integer in [1, 64], got {10**23}"),
    (lambda: SegmenterSettings(timestep=1000), "timestep must be an integer in [0, 999], got 1000"),
    (lambda: ZeroShotSettings(draws=0), "draws must be an integer in [1, 64], got 0"),
])
def test_library_settings_refuse_the_same_values(make, message):
    with pytest.raises(LdznetError) as raised:
        make()
    assert str(raised.value) == message or str(raised.value).startswith(message)


@pytest.mark.parametrize("name", ["meta", "tpu", "cuda:x", "cpu:0", "vulkan", "", "cuda:007", "cuda:2147483648"])
def test_unknown_device_names_are_refused_before_loading(name):
    with pytest.raises(LdznetError, match="expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device(name)


@pytest.mark.parametrize("text, message", [
    ("0.99999999999999999", "expected a number in [0, 1), got 0.99999999999999999 (read as 1.0)"),
    ("1", "expected a number in [0, 1), got 1"),
    ("1e3", "expected a number in [0, 1), got 1e3"),
    ("nan", "expected a number in [0, 1), got nan"),
])
def test_a_value_that_rounds_out_of_range_says_what_it_was_read_as(text, message):
    with pytest.raises(ValueError) as error:
        THRESHOLD.parse(text)
    assert str(error.value) == message


def test_limit_describes_and_checks():
    assert Limit(float, 0, 1, low_open=True).describe() == "a number in (0, 1]"
    assert SEED.accepts(2**63 - 1) and not SEED.accepts(2**63) and not SEED.accepts(10**400)
    assert not Limit(float, 0, 2).accepts(True) and Limit(float, 0, 2).accepts(2)
    with pytest.raises(ValueError, match=r"expected an integer in \[0, 2\], got '1.5'"):
        Limit(int, 0, 2).parse("1.5")
    assert math.copysign(1, THRESHOLD.parse("-0")) == 1  # a report prints t = 0, not t = -0
    with pytest.raises(LdznetError) as error:  # a client's value may be megabytes: quoted shortened, one line
        Limit(float, 0, 1).check("x" * 5000 + "\n", "threshold")
    assert str(error.value) == f"threshold must be a number in [0, 1], got '{'x' * 12}...{'x' * 11}\\n'"


@pytest.mark.parametrize(("changes", "message"), [
    ({"timestep": 1000}, "timestep must be an integer in [0, 999], got 1000"),
    ({"resolution": 32}, "working resolution must be an integer in [64, 2048], got 32"),
    ({"resolution": 100_000}, "working resolution must be an integer in [64, 2048], got 100000"),
])
def test_the_webui_engine_options_use_the_library_limits(changes, message) -> None:
    from ldznet_ext.webui.engine import EngineOptions

    with pytest.raises(LdznetError) as error:
        EngineOptions(**changes)
    assert str(error.value) == message


def test_a_torch_device_is_checked_as_a_name_is():
    with pytest.raises(LdznetError, match="^the meta device computes nothing a mask can be made of; use cpu, cuda or mps$"):
        resolve_device(torch.device("meta"))
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LdznetError, match=r"^device 'cuda' was asked for but CUDA is not available; use the CPU \(--device cpu, device='cpu'\)$"):
            resolve_device(torch.device("cuda"))


@pytest.mark.parametrize("loader", ["head", "model"])
def test_the_model_loaders_check_dtype_device_and_path(loader):
    from ldznet_ext.defaults import default_model_paths
    from ldznet_ext.heads import load_head
    from ldznet_ext.sd.checkpoint import load_stable_diffusion

    load, path = {"head": (load_head, default_model_paths()[1]),
                  "model": (load_stable_diffusion, default_model_paths()[0])}[loader]
    assert next(load(path, dtype="bf16")[0].parameters() if loader == "head" else
                load(path, dtype="bf16").unet.parameters()).dtype == torch.bfloat16
    with pytest.raises(LdznetError, match="^unknown dtype 'half': expected one of fp32, fp16, bf16$"):
        load(path, dtype="half")
    with pytest.raises(LdznetError, match="^unsupported dtype torch.float64: expected one of fp32, fp16, bf16$"):
        load(path, dtype=torch.float64)
    with pytest.raises(LdznetError, match="^unknown device 'gpu': expected auto, cpu, cuda, cuda:N or mps$"):
        load(path, device="gpu")
    what = "head file" if loader == "head" else "model file"
    for bad, found in ((None, "NoneType"), (5, "int"), (b"x.safetensors", "bytes"), ("", "''")):
        with pytest.raises(LdznetError) as error:
            load(bad)
        assert str(error.value) == f"{what} must be a file path (text or pathlib.Path), got {found}"
