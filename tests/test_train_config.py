"""`ldznet train --config FILE`: YAML and JSON settings, the official preset, and the precedence
defaults < preset < file < flags (with --resume: the run's saved settings at the bottom)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

import pytest
import torch

from ldznet_ext.checkpoint_io import read_metadata
from ldznet_ext.cli import build_parser, main
from ldznet_ext.errors import LdznetError
from ldznet_ext.train.config import FIELD_LIMITS, PRESETS, TrainConfig, compose_config, read_config_file
from ldznet_ext.train.trainer import CHECKPOINT, HEAD

pytestmark = pytest.mark.usefixtures("single_thread")
DEFAULTS = TrainConfig().__dict__


def test_yaml_file_over_preset_under_flags(tmp_path):
    path = tmp_path / "run.yaml"
    # YAML 1.1 reads 5e-7 (no dot) as a string: floats are coerced
    path.write_text("preset: official\narch: znet\nlr: 5e-7\nema: 0.999\nsteps: 10\nnegatives: true\n")
    values = read_config_file(path)
    assert values == {"preset": "official", "arch": "znet", "lr": 5e-7, "ema": 0.999, "steps": 10, "negatives": True}
    config = compose_config(DEFAULTS, values, {"steps": 20, "seed": None})
    assert (config.arch, config.lr, config.steps, config.seed) == ("znet", 5e-7, 20, 0)  # flag > file; None = unset
    assert (config.ema, config.negatives) == (0.999, True)  # file > preset
    assert (config.resolution, config.schedule, config.scale_lr, config.grad_checkpoint) == (384, "plateau", True, True)
    assert compose_config(DEFAULTS, {"ema": 0.99}, {"preset": "official"}).ema == 0.99  # a flag's preset is under the file
    assert compose_config(DEFAULTS).ema == 0.999 and compose_config(DEFAULTS, None, {"preset": "official"}).ema == 0.9999


def test_json_file_and_the_official_rate():
    official = TrainConfig(**PRESETS["official"])
    assert official.total_batch(8) == 32 and official.base_lr(8) == 5e-7 * 32  # 1.6e-5 on 8 GPUs, batch 4
    assert TrainConfig(lr=1e-4, batch_size=4, accumulate=2).base_lr(8) == 1e-4  # unscaled by default


def test_bad_files_and_values(tmp_path):
    cases = {"a.yaml": "stpes: 3\n", "b.json": json.dumps({"steps": "ten"}), "c.yaml": "- 1\n- 2\n",
             "d.json": "{", "e.yaml": "preset: paper\n", "f.yaml": "negatives: 1\n", "g.yaml": "a: [\n"}
    messages = {"a.yaml": r"unknown key\(s\) stpes", "b.json": "steps: expected an integer, got 'ten'",
                "c.yaml": "expected a mapping", "d.json": "not valid JSON", "e.yaml": "unknown preset 'paper'",
                "f.yaml": "negatives: expected true or false, got 1$",
                "g.yaml": r"g.yaml: not valid YAML \(line 2, column 1: expected the node content, but found '<stream end>'\)$"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(LdznetError, match=messages[name]):
            read_config_file(tmp_path / name)
    with pytest.raises(LdznetError, match="cannot read"):
        read_config_file(tmp_path / "missing.yaml")
    with pytest.raises(LdznetError, match="sd_fusion='concat' is an LD-ZNet option"):
        TrainConfig(arch="znet", sd_fusion="concat")
    with pytest.raises(LdznetError, match="schedule must be one of constant, cosine, plateau"):
        TrainConfig(schedule="step")
    with pytest.raises(LdznetError, match=r"dice_weight must be a number in \[0, 1000\], got -1.0"):
        TrainConfig(dice_weight=-1.0)


def _alias_bomb() -> str:
    """Nine levels of ten references each: a few hundred bytes whose value has 10^9 leaves."""
    levels = ["- &b0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"- &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]" for i in range(1, 9)]
    return "data:\n" + "".join(f"  {line}\n" for line in levels)


@pytest.mark.parametrize("name, content, message", [
    ("latin.yaml", b"steps: 3\nseed: \xff\n", r"^.*latin.yaml: cannot read the config file \('utf-8' codec can't"),
    ("preset.yaml", b"preset: [1]\n", r"preset.yaml: unknown preset \[1\]; expected one of official$"),
    ("huge.yaml", b"seed: " + b"9" * 5000 + b"\n", r"huge.yaml: cannot read the YAML \(ValueError: Exceeds the limit"),
    ("deep.yaml", b"steps: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"deep.yaml: cannot read the YAML \(RecursionError"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, r"deep.json: not valid JSON \(maximum recursion depth"),
    ("bomb.yaml", _alias_bomb().encode(), r"bomb.yaml: data: expected a string, got \[\['x', 'x', "),
])
def test_config_files_no_reader_expects_are_one_line(tmp_path, name, content, message):
    """They were a UnicodeDecodeError, TypeError, ValueError or RecursionError traceback, or 30 s and
    2 GB printing an alias bomb's value."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LdznetError, match=message) as error:
        read_config_file(tmp_path / name)
    assert "\n" not in str(error.value) and len(str(error.value)) - len(str(tmp_path)) < 400


def test_train_command_with_config_file(tiny_model_files, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("arch: znet\ndata: world:train:2\nresolution: 64\nbatch_size: 2\nsteps: 5\nsave_every: 1\n"
                      "log_every: 1\nwarmup: 0\n")
    run = tmp_path / "run"
    common = ["train", "--model", str(tiny_model_files[0]), "--device", "cpu", "-o", str(run)]
    assert main([*common, "--config", str(config), "--steps", "1", "--lr", "3e-4"]) == 0
    saved = torch.load(run / CHECKPOINT, weights_only=True)["config"]
    assert (saved["arch"], saved["steps"], saved["lr"], saved["batch_size"]) == ("znet", 1, 3e-4, 2)
    assert "znet head, 1 step on world:train:2 with 1 process(es)" in capsys.readouterr().out
    config.write_text("steps: 2\n")  # a resumed run takes its saved settings, then the file, then the flags
    assert main([*common, "--resume", "--config", str(config)]) == 0
    assert read_metadata(run / HEAD)["training"]["steps"] == 2
    config.write_text("seed: 1\n")
    assert main([*common, "--resume", "--config", str(config), "--steps", "3"]) == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err


def test_a_presence_output_needs_negatives(tmp_path, capsys):
    message = ("presence_weight > 0 trains the presence output on absent phrases: keep the data's (--negatives) or "
               "sample some (--negative-prob)")
    with pytest.raises(LdznetError) as raised:
        TrainConfig(presence_weight=1.0, negatives=False)
    assert str(raised.value) == message
    with pytest.raises(LdznetError, match=r"keep the data's \(--negatives\) or sample some \(--negative-prob\)$"):
        compose_config(DEFAULTS, {"presence_weight": 1.0}, {"preset": "official"})  # the preset turns them off
    assert TrainConfig(**{**PRESETS["official"], "presence_weight": 1.0, "negatives": True}).negatives
    (tmp_path / "run.yaml").write_text("negatives: false\npresence_weight: 2\n")
    assert main(["train", "--arch", "znet", "--model", "m.safetensors", "-o", str(tmp_path / "run"),
                 "--config", str(tmp_path / "run.yaml")]) == 2
    assert capsys.readouterr().err == f"ldznet train: error: {message}\n"
    assert not (tmp_path / "run").exists()


def _train_subparser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["train"]


def test_flags_and_config_files_share_one_bound_per_field(tmp_path, capsys):
    numeric = {f.name for f in fields(TrainConfig) if type(DEFAULTS[f.name]) in (int, float)}
    assert set(FIELD_LIMITS) == numeric
    bounded = {a.dest: a.type.limit for a in _train_subparser()._actions if hasattr(a.type, "limit")}
    assert bounded == FIELD_LIMITS  # each flag's range is the table's
    common = ["train", "--arch", "znet", "--model", "m.safetensors", "-o", str(tmp_path / "run")]
    for flag, value, message in [("--plateau-factor", "1", "expected a number in (0, 1), got 1"),
                                 ("--ema", "1", "expected a number in [0, 1), got 1"),
                                 ("--plateau-patience", "-1", "expected an integer in [0, 10000], got -1")]:
        with pytest.raises(SystemExit):
            main([*common, flag, value])
        assert capsys.readouterr().err.endswith(f"error: argument {flag}: {message}\n")
    with pytest.raises(LdznetError, match=r"^ema must be a number in \[0, 1\), got 1.0$"):
        TrainConfig(ema=1.0)
    with pytest.raises(LdznetError, match=r"^plateau_patience must be an integer in \[0, 10000\], got 100000$"):
        TrainConfig(plateau_patience=100_000)
    assert TrainConfig(schedule="plateau", plateau_patience=0).plateau_patience == 0  # torch's patience 0: cut after every bad window


def test_a_run_folder_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("mine\n")
    assert main(["train", "--arch", "znet", "--model", str(tmp_path / "missing.safetensors"), "-o", str(blocker)]) == 2
    assert capsys.readouterr().err == f"ldznet train: error: {blocker} is a file, not a folder\n"
    assert blocker.read_text() == "mine\n"
