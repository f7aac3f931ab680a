"""Crafted inputs against the features of December 2026 (presence heads, --init, eval results): each is
refused in one line naming the file and field, never with a traceback."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ldznet_ext.checkpoint_io import read_metadata, read_state_dict, write_safetensors
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.eval.evaluate import EvalResult
from ldznet_ext.eval.metrics import SegmentationMetrics
from ldznet_ext.heads import load_head, read_head_config
from ldznet_ext.train.config import TrainConfig, compose_config, read_config_file

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]


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


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool, args, message", [
    ("feature_ablation", ["--data", "nonsense"], "unknown data spec"),
    ("feature_ablation", ["--resolution", "100000"], "argument --resolution: expected an integer in [64, 2048]"),
    ("feature_ablation", ["--seed", "-1"], "argument --seed: expected an integer in [0, "),
    ("feature_ablation", ["--ldznet-head", "missing.safetensors"], "LD-ZNet head not found: missing.safetensors"),
    ("feature_ablation", ["--model", "."], "model . is a folder; expected "),
    ("feature_ablation", ["--data", "world:test:1", "--json", "."], "cannot write .: it is a folder"),
    ("feature_probe", ["--train", "1", "--val", "1", "--test", "1", "--json", "."], "cannot write .: it is a folder"),
    ("feature_ablation", ["--ldznet-head", "{znet}"], "micro-znet.safetensors: a znet head given as the LD-ZNet head"),
    ("binding_run", ["-o", "/dev/null", "--unet-steps", "2"], "/dev/null is a file, not a folder"),
    ("binding_run", ["-o", "run"], "--unet-steps auto (the default) fits the steps to --time-budget-s"),
    ("binding_run", ["-o", "run", "--unet-steps", "2", "--snapshots", "0"], "--snapshots must be at least 1, got 0"),
    ("binding_run", ["-o", "run", "--unet-steps", "2", "--device", "banana"], "unknown device 'banana'"),
    ("binding_run", ["-o", "run", "--unet-steps", "2", "--init-model", "missing.safetensors"],
     "--init-model not found: missing.safetensors"),
    ("calibrate_presence", ["collect", "--data", "nonsense:x", "-o", "f.json"], "unknown data spec 'nonsense:x'"),
    ("calibrate_presence", ["choose", "missing.json"], "missing.json: not found; expected a features file"),
    ("choose_presence_level", ["missing.safetensors", "-o", "x.safetensors"], "checkpoint not found: missing"),
    ("choose_presence_level", ["{head}", "-o", "x.safetensors"],
     "head.safetensors: the head has no presence output to choose a level for"),
    ("choose_presence_level", ["{head}", "--max-drop", "nan", "-o", "x.safetensors"],
     "argument --max-drop: expected a number in [0, 100], got nan"),
])
def test_tools_refuse_bad_arguments_in_one_line(tiny_model_files, monkeypatch, capsys, tmp_path, tool, args,
                                                message) -> None:
    monkeypatch.chdir(tmp_path)
    znet = ROOT / "ldznet_ext" / "world" / "weights" / "micro-znet.safetensors"
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *(a.format(head=tiny_model_files[1], znet=znet) for a in args)])
    with pytest.raises(SystemExit) as exit_:
        _tool(tool).main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"{tool}.py: error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rows, args, message", [
    # a present phrase scored 0.005 is lost at every level from 0.01: its IoU of 1 drops to 0
    ([{"present": True, "scores": [0.005], "empty": False, "iou": [1.0] * 49},
      {"present": False, "scores": [0.5], "empty": False}], ["--max-drop", "5"],
     "no level keeps the present phrases' mIoU within --max-drop 5 points of 100.00; allow a larger drop"),
    # PhraseCut names no absent phrase: every level would return all of nothing empty
    ([{"present": True, "scores": [0.9], "empty": False, "iou": [1.0] * 49}], ["--data", "phrasecut:d:val"],
     "phrasecut:d:val names no absent phrase, so no presence level can be chosen on it; use data that does (the "
     "micro world, a manifest or folder with empty masks) or add ?negatives=1 to its spec"),
])
def test_choose_presence_level_says_when_it_cannot_choose(tiny_model_files, monkeypatch, capsys, tmp_path, rows,
                                                          args, message) -> None:
    head = _crafted_head(tmp_path, tiny_model_files[1], presence=True)  # its metadata is all the check reads
    tool = _tool("choose_presence_level")
    monkeypatch.setattr(tool, "collect", lambda *_: rows)
    monkeypatch.setattr(sys, "argv", ["choose_presence_level.py", str(head), *args, "-o",
                                      str(tmp_path / "out.safetensors")])
    with pytest.raises(SystemExit) as exit_:
        tool.main()
    assert exit_.value.code == 2 and capsys.readouterr().err == f"choose_presence_level.py: error: {message}\n"
    assert not (tmp_path / "out.safetensors").exists()


def test_choose_presence_level_never_writes_over_its_head(tiny_model_files, monkeypatch, capsys, tmp_path) -> None:
    head = _crafted_head(tmp_path, tiny_model_files[1], presence=True)
    before = head.read_bytes()
    tool = _tool("choose_presence_level")
    monkeypatch.setattr(tool, "collect", lambda *args: pytest.fail("collected before refusing the output"))
    monkeypatch.setattr(sys, "argv", ["choose_presence_level.py", str(head), "-o", str(head)])
    with pytest.raises(SystemExit) as exit_:
        tool.main()
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        f"choose_presence_level.py: error: {head}: the same file as the head {head}; give the output another name\n")
    assert head.read_bytes() == before


def test_choose_presence_level_scores_on_the_given_model(tiny_model_files, monkeypatch, capsys, tmp_path) -> None:
    head = _crafted_head(tmp_path, tiny_model_files[1], presence=True)
    tool, seen = _tool("choose_presence_level"), []
    rows = [{"present": True, "scores": [0.9], "empty": False, "iou": [1.0] * 49},
            {"present": False, "scores": [0.5], "empty": False}]
    monkeypatch.setattr(tool, "collect", lambda *args: seen.append(args[2:]) or rows)
    monkeypatch.setattr(tool, "load_head", lambda path: (None, read_head_config(path)))
    monkeypatch.setattr(tool, "save_head", lambda *args, **kwargs: None)
    monkeypatch.setattr(sys, "argv", ["choose_presence_level.py", str(head), "--model", "sd.safetensors",
                                      "--device", "cpu", "-o", str(tmp_path / "out.safetensors")])
    tool.main()
    assert seen == [("sd.safetensors", "cpu")]


@pytest.fixture(scope="module")
def sd1_folder(tiny_model_files, tmp_path_factory) -> Path:
    from fixtures_models import TINY_VAE8
    from ldznet_ext.sd.unet import unet_config
    from test_diffusers_folder import write_folder
    return write_folder(tmp_path_factory.mktemp("sd1") / "tiny-sd1", read_state_dict(tiny_model_files[0]),
                        unet_config("tiny"), TINY_VAE8, text_heads=2)


def _edited_folder(folder: Path, tmp_path: Path, config: str, **fields) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    path = copy / config
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **fields}))
    return copy


@pytest.mark.parametrize("config, fields, message", [
    ("vae/config.json", {"scaling_factor": "x"}, "field 'scaling_factor' is \"x\"; expected a number in (0, 100]"),
    ("vae/config.json", {"scaling_factor": float("nan")},
     "field 'scaling_factor' is NaN; expected a number in (0, 100]"),
    ("vae/config.json", {"scaling_factor": -1.0}, "field 'scaling_factor' is -1.0; expected a number in (0, 100]"),
    ("scheduler/scheduler_config.json", {"prediction_type": "sample"},
     "field 'prediction_type' is \"sample\"; expected \"epsilon\" or \"v_prediction\""),
    ("unet/config.json", {"attention_head_dim": 10**6},
     "the UNet in unet/ does not fit its config.json: 1000000 heads do not divide the 32 channels of level 0"),
])
def test_diffusers_configs_that_would_change_the_masks_silently_are_refused(sd1_folder, tmp_path, config, fields,
                                                                            message) -> None:
    from ldznet_ext.sd.diffusers_folder import read_diffusers_folder
    folder = _edited_folder(sd1_folder, tmp_path, config, **fields)
    with pytest.raises(CheckpointError) as error:
        read_diffusers_folder(folder)
    where = "" if message.startswith("the UNet") else f"{config}: "
    assert str(error.value) == f"tiny-sd1: {where}{message}"


def test_nan_presence_scores_are_refused_not_read_as_absent(tiny_sd, tiny_head) -> None:
    from dataclasses import replace

    from ldznet_ext.modeling.build import build_head
    from ldznet_ext.segmenter import Segmenter, SegmenterSettings
    from fixtures_models import random_image
    head, config = tiny_head
    config = replace(config, presence=True)
    with_presence = build_head(config)
    with_presence.load_state_dict(head.state_dict(), strict=False)
    with torch.no_grad():
        with_presence.presence.mlp[2].bias.fill_(float("nan"))  # a corrupt file: NaN > level is False, "absent"
    segmenter = Segmenter(tiny_sd, with_presence.eval(), config, SegmenterSettings(resolution=64))
    segmenter.set_image(random_image(64, 64, seed=3))
    with pytest.raises(LdznetError, match="the model produced NaN/inf presence scores; its weights may be corrupt"):
        segmenter.predict("sky")


def test_a_plain_pickle_given_as_a_checkpoint_is_one_line_without_torch_warnings(tmp_path) -> None:
    import pickle
    import warnings

    path = tmp_path / "plain.ckpt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))  # not torch's format: read by nothing, run by nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="^plain.ckpt: cannot read the file"):
            read_state_dict(path)
    assert [str(w.message) for w in caught] == []
