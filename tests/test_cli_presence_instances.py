"""`ldznet mask` with the embedded micro model and its head, end to end: a term not in the image is
named and selects nothing, --require-match exits 3, --instances writes one mask per object."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldznet_ext.loading import load_segmenter, resolve_model_paths
from ldznet_ext.world.scenes import make_scene
from ldznet_ext.world.spec import OBJECT_LABEL0

SEED = 1_000_005  # world:test: two crosses apart, an orange heart; the sky is one of its absent phrases

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory: pytest.TempPathFactory):
    resolution = load_segmenter(*resolve_model_paths(None, None, False), device="cpu").resolution
    scene = make_scene(SEED, resolution)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(scene.image).save(path)
    return path, scene


def test_absent_term_is_named_and_selects_nothing(ldznet, scene_file, tmp_path) -> None:
    image, scene = scene_file
    code, out, err = ldznet("mask", image, "sky OR crosses", "-o", tmp_path / "m.png", "--instances",
                            "--device", "cpu")
    assert code == 0 and "no match for 'sky' (score 0.0" in err and ", 2 instances" in out
    report = json.loads((tmp_path / "m-instances.json").read_text())
    assert report["terms"]["sky"]["found"] is False and report["terms"]["crosses"]["found"] is True
    assert [(e["order"], e["file"]) for e in report["instances"]] == [(1, "m-1.png"), (2, "m-2.png")]
    first = np.asarray(Image.open(tmp_path / "m-1.png")) > 127
    crosses = [k for k, o in enumerate(scene.spec.objects) if o.shape == "cross"]
    left = min(crosses, key=lambda k: np.nonzero(scene.labels == OBJECT_LABEL0 + k)[1].min())
    truth = scene.labels == OBJECT_LABEL0 + left
    assert (first & truth).sum() / (first | truth).sum() > 0.7  # the leftmost cross
    mask = np.asarray(Image.open(tmp_path / "m.png")) > 127
    assert np.array_equal(mask, first | (np.asarray(Image.open(tmp_path / "m-2.png")) > 127))


def test_a_word_the_embedded_model_never_saw_is_named_and_selects_nothing(ldznet, scene_file, tmp_path) -> None:
    code, out, err = ldznet("mask", scene_file[0], "goblin OR crosses", "-o", tmp_path / "m.png", "--device", "cpu")
    assert code == 0 and err.strip() == "no match for 'goblin' (none of its words is one the model was trained on)"
    code, _, err = ldznet("mask", scene_file[0], "goblin", "-o", tmp_path / "g.png", "--require-match", "--device", "cpu")
    assert code == 3 and "no match for 'goblin'" in err
    assert not np.asarray(Image.open(tmp_path / "g.png")).any()
    code, _, err = ldznet("mask", scene_file[0], "orange goblin", "-o", tmp_path / "o.png", "--device", "cpu")
    assert code == 0 and "goblin" not in err  # half known: the model looks for something orange


def test_require_match_exits_3_on_an_empty_mask(ldznet, scene_file, tmp_path) -> None:
    image, _ = scene_file
    code, _, err = ldznet("mask", image, "sky", "-o", tmp_path / "e.png", "--require-match", "--device", "cpu")
    assert code == 3 and "no match for 'sky'" in err and (tmp_path / "e.png").exists()
    code, _, err = ldznet("mask", image, "sky", "-o", tmp_path / "f.png", "--require-match", "--no-presence",
                          "--device", "cpu")
    assert code == 3 and "no match" not in err  # the sky's map stays under the threshold anyway
    assert ldznet("mask", image, "crosses[1]", "-o", tmp_path / "g.png", "--require-match", "--device", "cpu")[0] == 0


def test_one_instance_is_counted_in_the_singular(ldznet, scene_file, tmp_path) -> None:
    image, _ = scene_file
    code, out, _ = ldznet("mask", image, "crosses[1]", "-o", tmp_path / "one.png", "--instances", "--device", "cpu")
    assert code == 0 and out.rstrip().endswith(", 1 instance")


def test_instance_names_replace_only_an_earlier_runs_masks(ldznet, scene_file, tmp_path) -> None:
    """NAME-k.png is a name the command derives, not one the user gave: a file of that name is replaced
    only when the earlier run's report lists it, and a run with fewer objects removes the earlier extras."""
    image, _ = scene_file
    notes = tmp_path / "m-2.png"
    notes.write_text("my notes\n")
    code, out, err = ldznet("mask", image, "crosses", "-o", tmp_path / "m.png", "--instances", "--device", "cpu")
    assert (code, out) == (2, "") and err == (f"ldznet mask: error: {notes}: exists and is no instance mask of an "
                                              f"earlier run of -o {tmp_path / 'm.png'}; move it, or choose another -o\n")
    assert notes.read_text() == "my notes\n"
    notes.unlink()
    assert ldznet("mask", image, "crosses", "-o", tmp_path / "m.png", "--instances", "--device", "cpu")[1].endswith(
        ", 2 instances\n")
    assert ldznet("mask", image, "crosses", "-o", tmp_path / "m.png", "--instances", "--device", "cpu")[0] == 0
    assert ldznet("mask", image, "crosses[1]", "-o", tmp_path / "m.png", "--instances", "--device", "cpu")[1].endswith(
        ", 1 instance\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1.png", "m-instances.json", "m.png"]
    (tmp_path / "m-instances.json").write_text('{"instances": [{"file": "../scene.png"}, {"file": "m-1.png"}]}\n')
    assert ldznet("mask", image, "sky", "-o", tmp_path / "m.png", "--instances", "--device", "cpu")[0] == 0
    assert image.exists()  # a report that names other files removes none of them
    (tmp_path / "m-instances.json").write_text("my notes\n")
    code, _, err = ldznet("mask", image, "crosses", "-o", tmp_path / "m.png", "--instances", "--device", "cpu")
    assert code == 2 and err.startswith(f"ldznet mask: error: {tmp_path / 'm-instances.json'}: exists and is not the "
                                        "instance report of an earlier run of -o")
