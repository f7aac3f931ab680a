"""Output paths are checked before any work: the same-file test (symlinks, hard links), folders that
cannot take a file, and `ldznet convert`, which must never overwrite the checkpoint it reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldznet_ext import checkpoint_io, heads, outputs
from ldznet_ext.cli import data as data_cli
from ldznet_ext.cli import eval as eval_cli
from ldznet_ext.errors import LdznetError
from ldznet_ext.modeling.build import build_head, head_config

TINY_HEAD = head_config("ldznet", "tiny", latent_size=8)
NO_PROC = not Path("/proc/self").is_dir()


def test_same_file_sees_through_symlinks_and_hard_links(tmp_path):
    original = tmp_path / "a.png"
    original.write_bytes(b"image")
    (tmp_path / "hard.png").hardlink_to(original)
    (tmp_path / "soft.png").symlink_to(original)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "later.png")
    (tmp_path / "other.png").write_bytes(b"image")
    assert outputs.same_file(original, tmp_path / "hard.png")
    assert outputs.same_file(tmp_path / "soft.png", original)
    assert outputs.same_file(tmp_path / "sub" / ".." / "a.png", original)  # through a missing folder: resolved
    assert outputs.same_file(tmp_path / "dangling.png", tmp_path / "later.png")  # neither exists yet
    assert not outputs.same_file(original, tmp_path / "other.png")  # equal bytes, another file
    assert not outputs.same_file(original, tmp_path / "new.png")


@pytest.mark.skipif(NO_PROC, reason="needs Linux's /proc, where no file can be created, even by root")
def test_writable_path_tries_to_create_a_file_there(tmp_path):
    with pytest.raises(LdznetError, match=r"^cannot write /proc/mask\.png: "):
        outputs.writable_path("/proc/mask.png")
    assert outputs.writable_path(tmp_path / "new" / "mask.png") == tmp_path / "new" / "mask.png"
    assert os.listdir(tmp_path / "new") == []  # the trial file is gone


def test_process_alive():
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    assert outputs.process_alive(os.getpid()) and outputs.process_alive(os.getppid())
    assert not outputs.process_alive(finished.pid)
    assert not outputs.process_alive(2**64)  # a temporary file's name can hold any number


def test_folders_a_failed_body_created_are_removed_when_empty(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with outputs.folders_removed_on_failure():
            outputs.writable_path(tmp_path / "a" / "b" / "mask.png")
            outputs.writable_folder(tmp_path / "kept" / "c")
            outputs.writable_folder(tmp_path / "d" / "e")
            (tmp_path / "d" / "e" / "out.png").write_bytes(b"written before the failure")
            raise KeyboardInterrupt
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "d", "d/e", "d/e/out.png", "kept"]
    with outputs.folders_removed_on_failure():  # a body that ends well keeps them
        outputs.writable_path(tmp_path / "f" / "mask.png")
    assert (tmp_path / "f").is_dir()
    outputs.writable_folder(tmp_path / "g")  # outside the context nothing is noted
    with pytest.raises(LdznetError):
        with outputs.folders_removed_on_failure():
            raise LdznetError("bad input")
    assert (tmp_path / "g").is_dir()


@pytest.mark.parametrize("command", ["mask", "train"])
def test_a_failed_command_leaves_no_folder_it_created(ldznet, tmp_path, command):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not a model")
    out = tmp_path / "new" / "folder"
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    args = {"mask": ["mask", image, "cat", "--model", model, "--zero-shot", "-o", out / "mask.png"],
            "train": ["train", "--arch", "znet", "--model", model, "-o", out]}[command]
    code, _, err = ldznet(*args)
    assert code == 2 and f"ldznet {command}: error: model.safetensors: cannot read" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "model.safetensors"]


def test_write_safetensors_leaves_no_temporary_and_a_killed_ones_is_recognised(tmp_path, monkeypatch, dead_pid):
    path = tmp_path / "head.safetensors"
    checkpoint_io.write_safetensors(path, {"w": torch.ones(2)}, {"head": {}})
    before, temporaries = path.read_bytes(), []

    def full_disk(tensors, filename, metadata):
        Path(filename).write_bytes(b"half")
        temporaries.append(Path(filename).name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "save_file", full_disk)
    with pytest.raises(OSError):
        checkpoint_io.write_safetensors(path, {"w": torch.zeros(2)}, {"head": {}})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["head.safetensors"]
    assert outputs.abandoned_target(temporaries[0]) is None  # ours: this process runs
    # had this process been killed there, the next run would know the file for what it is
    assert outputs.abandoned_target(temporaries[0].replace(str(os.getpid()), str(dead_pid))) == "head.safetensors"


def _full_disk(stream) -> None:
    stream.write(b"half")
    raise OSError(28, "No space left on device")


def test_a_failed_writer_leaves_no_temporary_and_every_target_as_it_was(tmp_path):
    with pytest.raises(OSError):
        outputs.stage_file(tmp_path / "mask.png", _full_disk)
    assert os.listdir(tmp_path) == []
    first = tmp_path / "first.png"
    first.write_bytes(b"old")
    with pytest.raises(OSError):  # the first file was staged when the second failed
        outputs.write_together({first: lambda stream: stream.write(b"new"), tmp_path / "second.png": _full_disk})
    assert os.listdir(tmp_path) == ["first.png"] and first.read_bytes() == b"old"


def test_a_report_suffix_is_read_in_any_case_and_an_empty_file_may_be_replaced(tmp_path):
    earlier = re.compile(r"\{")
    outputs.check_report_name(tmp_path / "r.JSON", (".json",), "--json", earlier, "a report")
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")  # holds nothing to lose
    outputs.check_report_name(empty, (".json",), "--json", earlier, "a report")
    other = tmp_path / "other.json"
    other.write_text("[]")
    with pytest.raises(LdznetError, match=f"^{re.escape(str(other))}: exists and is not a report; give a new name"):
        outputs.check_report_name(other, (".json",), "--json", earlier, "a report")


def test_a_mask_selects_a_pixel_from_128_up():
    assert outputs.selected_share(np.full((2, 2), 128, np.uint8)) == 1.0
    assert outputs.selected_share(np.array([[127, 128]], np.uint8)) == 0.5


# ---------------------------------------------------------------- ldznet convert


@pytest.fixture
def official(tmp_path, monkeypatch) -> Path:
    """A tiny checkpoint in the official layout (training weights only), as .safetensors: the one
    kind of source that `convert -o SOURCE` could silently replace with the head."""
    monkeypatch.setattr(heads, "head_config", lambda arch: TINY_HEAD)
    torch.manual_seed(0)
    state = {heads.OFFICIAL_MODEL_PREFIX + k: v.contiguous() for k, v in build_head(TINY_HEAD).state_dict().items()}
    path = tmp_path / "release.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture
def no_reading(monkeypatch):
    """Every case below is refused before the checkpoint is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")
    monkeypatch.setattr(heads, "read_state_dict", refuse)


@pytest.mark.parametrize("link", ["itself", "symlink", "hard link"])
def test_convert_never_writes_over_its_checkpoint(ldznet, official, tmp_path, link, no_reading):
    before = official.read_bytes()
    target = {"itself": official, "symlink": tmp_path / "soft.safetensors",
              "hard link": tmp_path / "hard.safetensors"}[link]
    if link == "symlink":
        target.symlink_to(official)
    elif link == "hard link":
        target.hardlink_to(official)
    code, stdout, err = ldznet("convert", official, "--no-ema", "-o", target)
    assert (code, stdout) == (2, "")
    assert err == (f"ldznet convert: error: {target}: the same file as the checkpoint {official}; "
                   "give the head another name\n")
    assert official.read_bytes() == before


def test_convert_never_writes_over_an_existing_file(ldznet, official, tmp_path, no_reading):
    """README: convert -o must be a new name; a user's model named by mistake is not replaced."""
    model = tmp_path / "v1-5-pruned-emaonly.safetensors"
    model.write_bytes(b"the user's model")
    code, stdout, err = ldznet("convert", official, "--no-ema", "-o", model)
    assert (code, stdout) == (2, "")
    assert err == (f"ldznet convert: error: {model}: the file exists; convert writes a new head file, so give "
                   "a new name (or remove the old file first)\n")
    assert model.read_bytes() == b"the user's model"


def test_convert_checks_its_output_before_reading(ldznet, official, tmp_path, no_reading):
    (tmp_path / "file").write_text("")
    cases = {tmp_path / "head.ckpt": f"{tmp_path}/head.ckpt: a head is written as .safetensors; "
                                     "give a name ending in .safetensors",
             tmp_path / "file" / "h.safetensors": f"cannot write {tmp_path}/file/h.safetensors: "
                                                  f"{tmp_path}/file is a file, not a folder"}
    if not NO_PROC:
        cases[Path("/proc/h.safetensors")] = "cannot write /proc/h.safetensors: "
    for target, message in cases.items():
        code, stdout, err = ldznet("convert", official, "--no-ema", "-o", target)
        assert (code, stdout) == (2, "") and err.startswith(f"ldznet convert: error: {message}")


def test_convert_into_a_new_folder(ldznet, official, tmp_path):
    target = tmp_path / "models" / "head.safetensors"
    code, stdout, _ = ldznet("convert", official, "--no-ema", "-o", target)
    assert code == 0 and stdout.startswith(f"wrote {target}: ldznet head")
    assert heads.read_head_config(target) == TINY_HEAD


# ---------------------------------------------------------------- ldznet eval, ldznet data summary


@pytest.fixture
def no_work(monkeypatch):
    """Every case below is refused before a model, a result or a data set is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")
    for name in ("segmenter_from_args", "read_results"):
        monkeypatch.setattr(eval_cli, name, refuse)
    monkeypatch.setattr(data_cli, "summarize", refuse)


def test_eval_and_data_summary_never_write_over_what_they_read(ldznet, tmp_path, no_work):
    inputs = {name: tmp_path / name for name in ("data.jsonl", "scenes.npz", "head.safetensors", "shard.json")}
    for path in inputs.values():
        path.write_text(f"{path.name} stays\n")
    manifest, scenes, head, shard = inputs.values()
    table = tmp_path / "table.md"
    cases = {
        ("eval", "--data", manifest, "--json", manifest): f"{manifest}: the same file as the data {manifest}",
        ("eval", "--data", f"jsonl:{manifest}", "--markdown", manifest):
            f"{manifest}: the same file as the data jsonl:{manifest}",
        ("eval", "--data", f"world:{scenes}", "--json", scenes): f"{scenes}: the same file as the data world:{scenes}",
        ("eval", "--head", head, "--data", "world:test:1", "--markdown", head): f"{head}: the same file as the head",
        ("eval", "--merge", shard, "--json", shard): f"{shard}: the same file as a result to merge",
        ("eval", "--data", "world:test:1", "--json", table, "--markdown", table):
            f"{table}: the same file as the output {table}",
        ("data", "summary", "world:test:1", manifest, "--json", manifest):
            f"{manifest}: the same file as the data {manifest}",
    }
    for args, message in cases.items():
        code, stdout, err = ldznet(*args)
        command = "data summary" if args[0] == "data" else args[0]
        assert (code, stdout, err) == (2, "", f"ldznet {command}: error: {message}; give each output its own name\n")
    assert {path.read_text() for path in inputs.values()} == {f"{path.name} stays\n" for path in inputs.values()}
    assert not table.exists()


def test_data_summary_checks_its_output_before_reading(ldznet, tmp_path, no_work):
    code, stdout, err = ldznet("data", "summary", "world:test:1", "--json", tmp_path)
    assert (code, stdout, err) == (2, "", f"ldznet data summary: error: cannot write {tmp_path}: it is a folder\n")


def test_reports_are_named_as_reports_and_replace_only_earlier_ones(ldznet, tmp_path, no_work):
    """A data set's images and masks are not inputs the commands name (the manifest lists them), and its
    JSON files (PhraseCut's refer_val.json) may sit beside: a report goes only to a .json / .md name, and
    an existing .json only if an earlier report of the command wrote it."""
    mask, annotations = tmp_path / "mask.png", tmp_path / "refer_val.json"
    mask.write_bytes(b"\x89PNG mask stays")
    annotations.write_text('{"refer": "stays"}\n')
    cases = {
        ("eval", "--data", "world:test:1", "--json", mask): f"{mask}: --json writes a .json file; give a name "
                                                            "ending in .json",
        ("eval", "--data", "world:test:1", "--markdown", mask): f"{mask}: --markdown writes a .md file; give a name "
                                                                "ending in .md",
        ("data", "summary", "world:test:1", "--json", mask): f"{mask}: --json writes a .json file; give a name "
                                                             "ending in .json",
        ("eval", "--data", "world:test:1", "--json", annotations):
            f"{annotations}: exists and is not an earlier ldznet eval --json result; give a new name, or remove the "
            "file first",
        ("data", "summary", "world:test:1", "--json", annotations):
            f"{annotations}: exists and is not an earlier ldznet data summary --json; give a new name, or remove the "
            "file first",
    }
    for args, message in cases.items():
        command = "data summary" if args[0] == "data" else args[0]
        assert ldznet(*args) == (2, "", f"ldznet {command}: error: {message}\n")
    assert (mask.read_bytes(), annotations.read_text()) == (b"\x89PNG mask stays", '{"refer": "stays"}\n')


def test_an_earlier_report_is_replaced(ldznet, tmp_path, monkeypatch):
    """The patterns match what the commands write: a second run over the first one's report goes through."""
    from ldznet_ext.cli.data import EARLIER_SUMMARY
    from ldznet_ext.cli.eval import EARLIER_RESULT
    summary = tmp_path / "summary.json"
    assert ldznet("data", "summary", "world:test:1", "--json", summary)[0] == 0
    assert EARLIER_SUMMARY.match(summary.read_text())
    assert ldznet("data", "summary", "world:test:1", "--json", summary)[0] == 0
    result = tmp_path / "result.json"
    assert ldznet("eval", "--data", "world:test:1", "--json", result)[0] == 0
    assert EARLIER_RESULT.match(result.read_text())
    assert ldznet("eval", "--data", "world:test:1", "--json", result)[0] == 0
