"""The options several commands share are one definition (``ldznet_ext/cli/common.py``): every
``--device`` defaults to auto and is checked before anything loads, every ``--shard`` counts from 1."""

from __future__ import annotations

import argparse

from ldznet_ext import cli
from ldznet_ext.cli.common import segmenter_from_args
from ldznet_ext.limits import device_name


def _options(parser: argparse.ArgumentParser, dest: str, path: str = "ldznet"):
    """(command, action) of every option stored in ``dest``, in every sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, dest, f"{path} {name}")
        elif action.dest == dest:
            yield path, action


def test_every_device_option_defaults_to_auto_and_is_checked():
    devices = dict(_options(cli.build_parser(), "device"))
    assert sorted(devices) == ["ldznet batch", "ldznet demo", "ldznet eval", "ldznet mask", "ldznet train",
                               "ldznet world train-sd"]
    assert {command: (action.default, action.type) for command, action in devices.items()} == {
        command: ("auto", device_name) for command in devices}


def test_world_train_sd_refuses_an_unknown_device_before_any_work(ldznet, tmp_path):
    code, stdout, err = ldznet("world", "train-sd", "-o", tmp_path / "run", "--device", "meta")
    assert (code, stdout) == (2, "") and err.splitlines()[-1] == (
        "ldznet world train-sd: error: argument --device: unknown device 'meta': expected auto, cpu, cuda, "
        "cuda:N or mps")
    assert not (tmp_path / "run").exists()


def test_every_shard_option_counts_from_1():
    shards = dict(_options(cli.build_parser(), "shard"))
    assert sorted(shards) == ["ldznet batch", "ldznet eval"]
    assert all(action.default == (1, 1) and "1 <= K <= N" in action.help for action in shards.values())


def test_every_model_command_can_turn_cuda_graphs_off():
    graphs = dict(_options(cli.build_parser(), "cuda_graphs"))
    assert sorted(graphs) == ["ldznet batch", "ldznet eval", "ldznet mask"]
    assert {action.default for action in graphs.values()} == {True}


def test_no_cuda_graphs_reaches_the_segmenter_and_its_record():
    parser = cli.build_parser()
    for flags, expected in (([], True), (["--no-cuda-graphs"], False)):
        args = parser.parse_args(["mask", "image.png", "cat", "-o", "mask.png", *flags])
        segmenter, record = segmenter_from_args(args)
        assert (segmenter.settings.cuda_graphs, record["cuda_graphs"]) == (expected, expected)
