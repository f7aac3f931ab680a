"""Crafted inputs against the files that train, eval, data and mask read: a pipe or a device where a file
belongs is refused before it is opened (reading one blocks forever or never ends), and a config file's
numbers are read as the flags read them."""

from __future__ import annotations

import json
import os
import signal

import pytest

from ldznet_ext.errors import LdznetError, special_file_kind
from ldznet_ext.train.config import MAX_CONFIG_BYTES, read_config_file

pytestmark = pytest.mark.usefixtures("single_thread")


def _timed_out(signum: int, frame: object) -> None:
    raise TimeoutError("blocked on a pipe or a device: the special-file check did not refuse it")


@pytest.fixture(autouse=True)
def _fail_instead_of_hanging():
    """A regression of the special-file checks would block the suite forever on a pipe, or read /dev/zero
    until the machine's memory ends: each test here fails after 30 seconds instead."""
    previous = signal.signal(signal.SIGALRM, _timed_out)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def pipe(tmp_path):
    """A named pipe nobody writes to: opening it for reading would block forever."""
    def make(name: str):
        path = tmp_path / name
        os.mkfifo(path)
        return path
    return make


def test_the_kinds_of_special_files(pipe, tmp_path) -> None:
    assert special_file_kind(pipe("p")) == "a pipe"
    assert special_file_kind("/dev/null") == "a device"
    (tmp_path / "f").write_text("")
    assert [special_file_kind(p) for p in (tmp_path / "f", tmp_path, tmp_path / "absent")] == [None, None, None]


def test_mask_refuses_a_pipe_as_its_image(ldznet, tiny_model_files, pipe, tmp_path) -> None:
    sd, head = tiny_model_files
    code, out, err = ldznet("mask", pipe("photo.png"), "cat", "-o", tmp_path / "m.png", "--model", sd, "--head", head)
    assert (code, out) == (2, "")
    assert err == "ldznet mask: error: photo.png: a pipe, not an image file\n"


def test_eval_merge_refuses_a_pipe_or_a_device(ldznet, pipe) -> None:
    for path in (pipe("shard.json"), "/dev/zero"):
        code, out, err = ldznet("eval", "--merge", path)
        assert (code, out) == (2, "")
        kind = "a pipe" if path != "/dev/zero" else "a device"
        assert err == f"ldznet eval: error: {path}: {kind}, not a file; expected an eval result\n"


def test_a_manifest_that_is_a_pipe_is_one_invalid_entry(ldznet, pipe) -> None:
    path = pipe("rows.jsonl")
    code, out, _ = ldznet("data", "summary", f"jsonl:{path}")
    assert code == 1 and f"INVALID: cannot open: {path}: a pipe, not a manifest file" in out


@pytest.mark.parametrize("make, message", [
    (lambda tmp_path: "/dev/zero", "/dev/zero: a device, not a config file"),
    (lambda tmp_path: _written(tmp_path / "big.yaml", "# " + "x" * MAX_CONFIG_BYTES + "\n"),
     "big.yaml: larger than 1024 KiB; a config file holds a few settings"),
])
def test_a_config_file_that_is_no_config_file_is_refused_unread(tmp_path, make, message) -> None:
    with pytest.raises(LdznetError) as error:
        read_config_file(make(tmp_path))
    assert str(error.value).endswith(message)


def test_a_config_file_that_is_a_pipe_is_refused_unopened(pipe) -> None:
    path = pipe("run.yaml")
    with pytest.raises(LdznetError, match=f"^{path}: a pipe, not a config file$"):
        read_config_file(path)


def _written(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("steps: 1:20", "steps: expected an integer, got '1:20'"),  # YAML 1.1: 80, in base 60
    ("steps: 0x10", "steps: expected an integer, got '0x10'"),
    ("steps: 1_000", "steps: expected an integer, got '1_000'"),
    ('lr: "１"', "lr: expected a number, got '１'"),  # a fullwidth digit, which float() reads
    ('lr: "1_0e-5"', "lr: expected a number, got '1_0e-5'"),
    ("lr: 1" + "0" * 400, "lr: expected a number, got an integer of about 401 digits"),  # float() overflows
])
def test_config_numbers_are_read_as_the_flags_read_them(tmp_path, text, message) -> None:
    path = _written(tmp_path / "run.yaml", text + "\n")
    with pytest.raises(LdznetError) as error:
        read_config_file(path)
    assert str(error.value) == f"{path}: {message}"


def test_config_numbers_in_decimal_keep_their_values(tmp_path) -> None:
    """A leading zero is decimal (YAML 1.1 read 017 as 15), and YAML 1.2's exponents need no dot."""
    path = _written(tmp_path / "run.yaml", "steps: 017\nlr: 5e-7\nwarmup: +3\nseed: 0\n")
    assert read_config_file(path) == {"steps": 17, "lr": 5e-7, "warmup": 3, "seed": 0}
    assert read_config_file(_written(tmp_path / "run.json", json.dumps({"steps": 17}))) == {"steps": 17}


def test_plateau_settings_without_the_plateau_schedule_are_refused() -> None:
    from ldznet_ext.train.config import TrainConfig

    assert TrainConfig(schedule="plateau", plateau_every=5).plateau_every == 5
    with pytest.raises(LdznetError, match="^plateau_factor=0.25, plateau_every=5 set the plateau schedule, and the "
                                          "schedule is 'constant': drop them or use schedule 'plateau'$"):
        TrainConfig(schedule="constant", plateau_factor=0.25, plateau_every=5)


@pytest.mark.parametrize("version", [True, 2.0, "2"])
def test_a_result_file_version_must_be_an_integer(ldznet, tmp_path, version) -> None:
    from ldznet_ext.eval.evaluate import FORMAT

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": FORMAT, "version": version, "results": []}))
    code, out, err = ldznet("eval", "--merge", path)
    assert (code, out) == (2, "")
    assert err == f"ldznet eval: error: {path}: eval result version {version}, this ldznet reads 1, 2\n"

