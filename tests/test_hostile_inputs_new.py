"""Crafted inputs against the features of December 2026 (presence heads, --init, eval results): each is
refused in one line naming the file and field, never with a traceback."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from ldznet_ext.checkpoint_io import read_metadata, read_state_dict, write_safetensors
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.eval.evaluate import EvalResult
from ldznet_ext.eval.metrics import SegmentationMetrics
from ldznet_ext.heads import load_head, read_head_config
from ldznet_ext.train.config import TrainConfig, compose_config, read_config_file

pytestmark = pytest.mark.usefixtures("single_thread")


def _crafted_head(tmp_path, head_file, **fields):
    """``head_file`` with its 'ldznet.head' metadata fields changed (a dotted name: a nested one)."""
    metadata = read_metadata(head_file)
    for name, value in fields.items():
        *outer, last = name.split("__")
        where = metadata["head"]
        for key in outer:
            where = where[key]
        where[last] = value
    path = tmp_path / "crafted.safetensors"
    write_safetensors(path, read_state_dict(head_file), metadata)
    return path


def test_a_huge_integer_presence_level_is_refused(tiny_model_files, tmp_path) -> None:
    path = _crafted_head(tmp_path, tiny_model_files[1], presence=True, presence_level=10**400)
    assert '"presence_level": 1000' in json.dumps(read_metadata(path)["head"])  # the file holds the integer
    with pytest.raises(CheckpointError, match="^crafted.safetensors: field 'ldznet.head', key 'presence_level' is "
                                              "a number; expected a finite number$"):
        read_head_config(path)


@pytest.mark.parametrize("field, value", [("latent_size", 10**12), ("unet__model_channels", 10**12),
                                          ("latent_size", 10**400)])
def test_sizes_no_head_can_have_are_refused(tiny_model_files, tmp_path, field, value) -> None:
    path = _crafted_head(tmp_path, tiny_model_files[1], **{field: value})
    with pytest.raises(CheckpointError, match="^crafted.safetensors: field 'ldznet.head' describes no head that can "
                                              "be built \\("):
        load_head(path)



@pytest.mark.parametrize("text, message", [
    ("presence_weight: .nan", "presence_weight must be a number in [0, 1000], got nan"),
    ("presence_weight: 1e9", "presence_weight must be a number in [0, 1000], got 1000000000.0"),
    ("dice_weight: .inf", "dice_weight must be a number in [0, 1000], got inf"),
    ("lr: 1e9", "lr must be a number in (0, 1], got 1000000000.0"),
    ("batch_size: 1000000000", "batch_size must be an integer in [1, 4096], got 1000000000"),
])
def test_config_file_values_have_the_command_line_bounds(tmp_path, text, message) -> None:
    (tmp_path / "run.yaml").write_text(text + "\n")
    with pytest.raises(LdznetError) as error:
        compose_config(asdict(TrainConfig()), read_config_file(tmp_path / "run.yaml"))
    assert str(error.value) == message


def test_a_nan_presence_weight_is_one_line_before_training(ldznet, tiny_model_files, tmp_path) -> None:
    (tmp_path / "run.yaml").write_text("presence_weight: .nan\n")
    code, out, err = ldznet("train", "--arch", "ldznet", "--model", tiny_model_files[0], "--config",
                            tmp_path / "run.yaml", "-o", tmp_path / "run", "--data", "world:train:2", "--resolution",
                            "64", "--batch-size", "2", "--steps", "1")
    assert (code, out, err) == (2, "", "ldznet train: error: presence_weight must be a number in [0, 1000], got nan\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["presence", "include_absent"])
@pytest.mark.parametrize("value", ["false", 0, None, [True]])
def test_eval_result_flags_must_be_true_or_false(key, value) -> None:
    data = EvalResult("m", "world:test:2", SegmentationMetrics(0.5), presence=True).to_dict()
    assert EvalResult.from_dict(json.loads(json.dumps(data))).presence is True
    data[key] = value  # "false" was read as True and merged with results scored otherwise
    with pytest.raises(LdznetError, match=f"^shard.json: not an ldznet eval result .*'{key}' is "):
        EvalResult.from_dict(data, "shard.json")


def test_resume_does_not_need_the_init_file_again(ldznet, tiny_model_files, tmp_path) -> None:
    sd_file, head_file = tiny_model_files
    init = tmp_path / "init.safetensors"
    init.write_bytes(head_file.read_bytes())
    common = ("train", "--arch", "ldznet", "--model", sd_file, "--data", "world:train:2", "--resolution", "64",
              "--batch-size", "2", "-o", tmp_path / "run")
    assert ldznet(*common, "--steps", "1", "--save-every", "1", "--init", init, "--presence-weight", "1",
                  "--freeze-head")[0] == 0
    assert ldznet(*common[:-1], tmp_path / "whole", "--steps", "2", "--init", init, "--presence-weight", "1",
                  "--freeze-head")[0] == 0
    init.unlink()  # last.pt holds every weight: the run resumes without it
    code, out, err = ldznet(*common, "--steps", "2", "--resume")
    assert (code, err) == (0, "") and "2 steps" in out
    resumed, whole = read_state_dict(tmp_path / "run" / "head.safetensors"), read_state_dict(tmp_path / "whole" /
                                                                                            "head.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
