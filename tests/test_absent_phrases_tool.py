"""tools/absent_phrases.py: the kinds of absent phrases, which of them z can decide, and the look-alikes."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ldznet_ext.eval.evaluate import EvalResult
from ldznet_ext.eval.metrics import SegmentationMetrics
from ldznet_ext.world.data import SceneSet
from ldznet_ext.world.scenes import make_scene, phrase_labels, render, sample_scene, split_seeds
from ldznet_ext.world.spec import OBJECT_LABEL0

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("absent_phrases", ROOT / "tools" / "absent_phrases.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

SHAPE_PX = 500


@pytest.fixture(scope="module")
def scene():
    """Test seed 1000003 (a large red triangle, a large red square, a small purple circle on sky, grass and
    water) with four absent phrases, one of each kind."""
    spec = replace(sample_scene(1_000_003), absent=("sand", "crosses", "purple square", "red heart"))
    assert [(o.colour, o.shape) for o in spec.objects] == [("red", "triangle"), ("red", "square"),
                                                            ("purple", "circle")]
    scene = render(spec, 128)
    areas = [(scene.labels == OBJECT_LABEL0 + k).sum() for k in range(3)]
    assert areas[0] >= SHAPE_PX and areas[1] >= SHAPE_PX and 0 < areas[2] < SHAPE_PX, areas
    return scene


def test_each_absent_kind_names_the_objects_whose_shape_decides_it(scene):
    spec = scene.spec
    assert tool.absent_kind(spec, "sand") == ("absent stuff", ())
    assert tool.absent_kind(spec, "crosses") == ("absent shape", (0, 1, 2))
    assert tool.absent_kind(spec, "purple square") == ("present shape, other colour", (2,))
    assert tool.absent_kind(spec, "red heart") == ("present colour, other shape", (0, 1))
    assert tool.absent_kind(spec, "blue square") == ("present shape, other colour", ())  # colour decides


def test_lookalikes_are_the_present_phrases_that_a_shape_tells_apart(scene):
    spec = scene.spec
    assert tool.lookalike_objects(spec, "circles") == (2,)
    assert tool.lookalike_objects(spec, "red triangle") == (0, 1)
    assert tool.lookalike_objects(spec, "purple circle") is None  # the only purple object
    assert tool.lookalike_objects(spec, "sky") is None


def _as_set(scene) -> SceneSet:
    return SceneSet(scene.size, np.array([scene.spec.seed]), scene.image[None], scene.labels[None], (scene.caption,),
                    (phrase_labels(scene.spec),))


def _scored(scene, absent_maps: dict[str, float]) -> EvalResult:
    """Every present phrase scored with its own mask as the map; each absent phrase with a constant map."""
    metrics = SegmentationMetrics()
    for index, (phrase, truth) in enumerate(scene.phrases.items()):
        probability = (torch.from_numpy(truth).float() if phrase not in scene.spec.absent
                       else torch.full(truth.shape, absent_maps[phrase]))
        metrics.add(probability, truth, key=(0, index))
    return EvalResult("m", "world:test:1", metrics, examples=1, include_absent=True)


def test_report_counts_each_kind_and_the_lookalikes_iou(scene):
    result = _scored(scene, {"sand": 0.0, "crosses": 0.0, "purple square": 0.9, "red heart": 0.1})
    report = tool.report(result, [scene.spec], _as_set(scene), SHAPE_PX)
    assert report["kinds"] == {
        "absent stuff": {"absent": 1, "empty": 1, "decidable": 1, "decidable_empty": 1},
        "absent shape": {"absent": 1, "empty": 1, "decidable": 0, "decidable_empty": 0},
        "present shape, other colour": {"absent": 1, "empty": 0, "decidable": 0, "decidable_empty": 0},
        "present colour, other shape": {"absent": 1, "empty": 1, "decidable": 1, "decidable_empty": 1}}
    present = [p for p in scene.phrases if p not in scene.spec.absent]
    circles = scene.phrases["circles"].sum()
    assert report["lookalikes"] == 1 and report["present"] == len(present) == 9
    assert report["lookalike_miou_points"] == pytest.approx(100 * circles / (1 + circles) / 9)
    assert report["present_miou"] == pytest.approx(np.mean([m.sum() / (1 + m.sum()) for p, m in scene.phrases.items()
                                                            if p in present]))
    # Every object counts as known at 0 px: each absent phrase is decidable and nothing looks alike.
    everything = tool.report(result, [scene.spec], _as_set(scene), 0)
    assert all(e["decidable"] == 1 for e in everything["kinds"].values()) and everything["lookalikes"] == 0


def _write(tmp_path, result: EvalResult) -> Path:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"format": "ldznet-eval", "version": 2, "results": [result.to_dict()]}))
    return path


def test_the_command_reads_an_eval_file_of_the_world(tmp_path, capsys):
    first = make_scene(split_seeds("test")[0])  # its one absent phrase: grass
    result = _scored(first, {"grass": 0.0})
    assert tool.main([str(_write(tmp_path, result))]) == 0
    out = capsys.readouterr().out
    assert "| absent stuff | 1 | 1 | 1 | 1 |" in out and "| all | 1 | 1 | 1 | 1 |" in out


@pytest.mark.parametrize("change, message", [
    ({"include_absent": False}, "evaluated without absent phrases"),
    ({"data": "phrasecut:/d:test"}, "expected micro-world data"),
    ({"data": "world:test:2"}, "present in one of the result and this micro world"),  # scene 2's phrases differ
    ({"data": "world:test:2?negatives=1"}, "names phrases the world did not draw"),
])
def test_results_it_cannot_read_are_one_line(tmp_path, capsys, change, message):
    first = make_scene(split_seeds("test")[0])
    result = replace(_scored(first, {"grass": 0.0}), **change)
    if change.get("data") == "world:test:2":  # the same records keyed to the second scene
        result.metrics.keys = [(1, k) for _, k in result.metrics.keys]
    assert tool.main([str(_write(tmp_path, result))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("absent_phrases: error:") and message in err and err.count("\n") == 1


def test_shape_px_has_bounds(tmp_path, capsys):
    assert tool.main(["missing.json", "--shape-px", "-1"]) == 2
    assert "--shape-px -1: expected 0..16384" in capsys.readouterr().err
