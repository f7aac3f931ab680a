"""`ldznet demo`: the embedded model on a micro-world scene, and its refusals before any work."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from ldznet_ext.cli import demo

pytestmark = pytest.mark.usefixtures("single_thread")


def test_demo_writes_four_pngs_and_scores_the_default_expression(ldznet, tmp_path):
    code, stdout, err = ldznet("demo", "--size", 64, "-o", tmp_path / "out")
    lines = stdout.splitlines()
    assert (code, err, len(lines)) == (0, "", 4)
    assert lines[0].startswith(f"scene {demo.split_seeds('test')[demo.DEFAULT_SCENE]} (")
    assert re.fullmatch(r"expression: \w+ \w+ OR \w+  \[LD-ZNet head, \d+ ms\]", lines[1])
    assert float(lines[2].removeprefix("IoU against the ground truth: ")) > 0.8
    assert lines[3] == f"wrote {tmp_path}/out/image.png, mask.png, probability.png, overlay.png"
    for name in ("image", "mask", "probability", "overlay"):
        assert np.asarray(Image.open(tmp_path / "out" / f"{name}.png")).shape[:2] == (64, 64)


def test_demo_says_which_terms_are_not_in_the_scene(ldznet, tmp_path):
    scene = demo.make_scene(demo.split_seeds("test")[demo.DEFAULT_SCENE], 64)
    absent = next(p for p in scene.spec.absent if p in ("sand", "water", "grass", "sky"))
    code, stdout, err = ldznet("demo", absent, "--size", 64, "-o", tmp_path)
    assert code == 0 and "IoU against the ground truth: 1.000" in stdout
    assert re.fullmatch(rf"no match for '{absent}' \(score 0\.\d\d\)\n", err)


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the arguments were checked")
    monkeypatch.setattr(demo, "load_segmenter", refuse)


def test_demo_refuses_bad_arguments_before_loading_the_model(ldznet, tmp_path, no_model):
    blocker = tmp_path / "file"
    blocker.write_text("mine\n")
    cases = {("-o", blocker): f"{blocker} is a file, not a folder",
             ("", "-o", tmp_path / "new"): "expected a mask expression such as 'cat OR dog', got empty text at position 0",
             ("--seed", 5, "--scene", 3): "argument --scene: not allowed with argument --seed"}
    for args, message in cases.items():
        code, stdout, err = ldznet("demo", *args)
        assert (code, stdout, err.splitlines()[-1]) == (2, "", f"ldznet demo: error: {message}")
    assert blocker.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_demo_replaces_only_what_an_earlier_demo_wrote(ldznet, tmp_path, no_model):
    """A user's image.png in the -o folder was overwritten; an earlier demo's files are replaced."""
    (tmp_path / "image.png").write_text("my picture\n")
    code, _, err = ldznet("demo", "--size", 64, "-o", tmp_path)
    assert (code, err) == (2, f"ldznet demo: error: {tmp_path}/image.png: exists and is no file of an earlier demo in "
                              f"{tmp_path}; choose another -o\n")
    assert (tmp_path / "image.png").read_text() == "my picture\n"


def test_a_second_demo_replaces_the_first(ldznet, tmp_path):
    for expression in ("sky", "grass"):
        code, _, _ = ldznet("demo", expression, "--size", 32, "-o", tmp_path)
        assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "image.png", "mask.png", "overlay.png",
                                                           "probability.png"]
    assert '"expression": "grass"' in (tmp_path / "demo.json").read_text()
