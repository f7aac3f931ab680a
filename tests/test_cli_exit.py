"""`ldznet`'s exit statuses, as cli.py's docstring states them: one line on stderr, never a traceback."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import warnings

import pytest

from ldznet_ext import cli
from ldznet_ext.cli import mask as mask_cli
from ldznet_ext.errors import ImageError


def _raising(error: BaseException):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize("error, code, line", [
    (ImageError("photo.png: not an image"), 2, "ldznet mask: error: photo.png: not an image"),
    (PermissionError(13, "Permission denied", "out/m.png"), 1,
     "ldznet mask: error: [Errno 13] Permission denied: 'out/m.png'"),
    (MemoryError(), 1, "ldznet mask: error: out of memory"),
    (KeyboardInterrupt(), 130, "ldznet mask: interrupted"),
])
def test_exit_status_and_one_line(ldznet, monkeypatch, error, code, line):
    monkeypatch.setattr(mask_cli, "_run_mask", _raising(error))
    assert ldznet("mask", "photo.png", "cat", "-o", "m.png") == (code, "", line + "\n")


def test_an_interrupt_that_code_turned_into_another_error_is_an_interruption(ldznet, monkeypatch):
    """safetensors catches a KeyboardInterrupt raised while it reads and raises a ValueError instead: Ctrl-C
    during a model load was reported as a corrupt model file (status 2)."""
    def load_interrupted(args):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ImageError("model.safetensors: cannot read the file (ValueError: ...)") from None

    monkeypatch.setattr(mask_cli, "_run_mask", load_interrupted)
    assert ldznet("mask", "photo.png", "cat", "-o", "m.png") == (130, "", "ldznet mask: interrupted\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back
    monkeypatch.setattr(mask_cli, "_run_mask", _raising(ImageError("photo.png: not an image")))
    assert ldznet("mask", "photo.png", "cat", "-o", "m.png")[0] == 2  # no interrupt came this time


def test_usage_errors_are_status_2(ldznet):
    code, stdout, err = ldznet("mask", "photo.png")
    assert code == 2 and stdout == "" and err.splitlines()[-1].startswith("ldznet mask: error: ")


@pytest.mark.parametrize("args, line", [
    ((), "ldznet: error: the following arguments are required: COMMAND (see ldznet --help)"),
    (("world",), "ldznet world: error: the following arguments are required: WORLD_COMMAND (see ldznet world --help)"),
    (("data",), "ldznet data: error: the following arguments are required: COMMAND (see ldznet data --help)"),
])
def test_a_missing_command_is_one_line(ldznet, args, line):
    """It printed the whole help page on stdout (23 lines for `ldznet` alone)."""
    assert ldznet(*args) == (2, "", line + "\n")


@pytest.mark.parametrize("args, line", [
    (("mask", "photo.png", "cat", "-o", "a.png", "-o", "b.png"),
     "ldznet mask: error: argument -o/--output: given twice ('a.png', then 'b.png'); give it once"),
    (("mask", "photo.png", "cat", "-o", "a.png", "--threshold", "0.3", "--threshold", "0.6"),
     "ldznet mask: error: argument --threshold: given twice ('0.3', then '0.6'); give it once"),
    (("world", "sample", "--seed", "1", "--seed", "2", "-o", "s.png"),
     "ldznet world sample: error: argument --seed: given twice ('1', then '2'); give it once"),
])
def test_an_option_given_twice_with_two_values_is_refused(ldznet, monkeypatch, tmp_path, args, line):
    """argparse keeps the last value without a word: `mask -o a.png -o b.png` wrote b.png alone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mask_cli, "_run_mask", _raising(AssertionError("ran")))
    assert ldznet(*args) == (2, "", line + "\n")
    assert list(tmp_path.iterdir()) == []


def test_an_option_repeated_with_its_value_is_one_option(ldznet, monkeypatch):
    monkeypatch.setattr(mask_cli, "_run_mask", lambda args: print(args.output, args.threshold))
    assert ldznet("mask", "photo.png", "cat", "-o", "a.png", "-o", "a.png", "--threshold", "0.5",
                  "--threshold", "0.50") == (0, "a.png 0.5\n", "")


def test_the_docstring_states_the_statuses():
    assert "0 done, 1 a system error (OSError, out of memory), 2 bad input" in " ".join(cli.__doc__.split())
    assert "130 interrupted" in cli.__doc__


def test_warnings_are_one_line_and_the_display_is_restored(ldznet, monkeypatch):
    def warn(args):
        warnings.warn("prompt 'sky sky…' has 200 tokens but CLIP reads 75: dropped the last 125", UserWarning,
                      stacklevel=1)
        return 0

    shown = warnings.showwarning
    monkeypatch.setattr(mask_cli, "_run_mask", warn)
    assert ldznet("mask", "photo.png", "sky", "-o", "m.png") == (
        0, "", "ldznet mask: warning: prompt 'sky sky…' has 200 tokens but CLIP reads 75: dropped the last 125\n")
    assert warnings.showwarning is shown


def test_log_warnings_are_one_line_of_the_command_too(ldznet, monkeypatch):
    """The library logs what a host routes (a skipped example, a CUDA-graph fallback); the CLI shows each
    as its own warnings, and removes its handler after the command."""
    def log(args):
        logging.getLogger("ldznet_ext.data").warning("skipping example %d: %s", 2, "2.png: file not found")
        logging.getLogger("ldznet_ext.data").info("not shown")
        return 0

    monkeypatch.setattr(mask_cli, "_run_mask", log)
    handlers = list(logging.getLogger("ldznet_ext").handlers)
    assert ldznet("mask", "photo.png", "sky", "-o", "m.png") == (
        0, "", "ldznet mask: warning: skipping example 2: 2.png: file not found\n")
    assert logging.getLogger("ldznet_ext").handlers == handlers


def test_a_folder_given_as_the_image_is_named(ldznet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = ldznet("mask", ".", "sky", "-o", "m.png")
    assert code == 2 and err.startswith("ldznet mask: error: .: cannot read the file (")


def test_ctrl_c_while_the_commands_load_is_one_line_and_status_130():
    """Before a command runs nothing is written: the process ends at once, whatever the import it was in
    (one swallowed there used to let the mask be written with status 0, or left a traceback)."""
    code = ("import os, signal, sys; from ldznet_ext import cli\n"
            "def loading():\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    raise AssertionError('went on after Ctrl-C')\n"
            "cli.build_parser = loading\n"
            "sys.exit(cli.main(['mask', 'photo.png', 'cat', '-o', 'm.png']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "ldznet: interrupted\n")


def test_the_interrupt_handler_is_restored_when_the_command_runs(ldznet, monkeypatch):
    """A command gets Ctrl-C as a KeyboardInterrupt (not the loading phase's immediate exit), and the
    caller's handler is back when main returns."""
    seen = []

    def run(args):
        seen.append(signal.getsignal(signal.SIGINT))
        with pytest.raises(KeyboardInterrupt):
            seen[0](signal.SIGINT, None)
        return 0

    monkeypatch.setattr(mask_cli, "_run_mask", run)
    before = signal.getsignal(signal.SIGINT)
    assert ldznet("mask", "photo.png", "cat", "-o", "m.png")[0] == 0
    assert seen[0] is not cli._end_at_once and signal.getsignal(signal.SIGINT) is before
