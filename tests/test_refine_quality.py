"""The boundary F-score against hand-computed values, and refinement beating bilinear upsampling on
a fixed subset of the micro world with the embedded model (head and zero-shot)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldznet_ext.defaults import default_model_paths
from ldznet_ext.eval.boundary import BoundaryMetrics, boundary_counts, boundary_f_score, f_score, mask_boundary
from ldznet_ext.loading import load_segmenter
from ldznet_ext.refine import RefineSettings
from ldznet_ext.world.scenes import make_scene, split_seeds


def columns(height: int, width: int, start: int, stop: int) -> np.ndarray:
    """A bool [height, width] mask selecting columns [start, stop)."""
    mask = np.zeros((height, width), bool)
    mask[:, start:stop] = True
    return mask


def test_boundary_is_the_inner_edge_without_the_image_border():
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    expected = mask.copy()
    expected[2, 2] = False  # the centre has all four neighbours inside
    assert np.array_equal(mask_boundary(mask), expected)
    # A mask touching the border has no edge there: only column 2 (next to the background) is.
    assert np.array_equal(mask_boundary(columns(3, 6, 0, 3)), columns(3, 6, 2, 3))
    assert not mask_boundary(np.ones((4, 4), bool)).any()


def test_f_score_hand_computed():
    truth = columns(3, 10, 0, 5)  # boundary: column 4, three pixels
    shifted = columns(3, 10, 0, 7)  # boundary: column 6, two pixels away
    assert boundary_counts(shifted, truth, 1.0) == (0, 3, 0, 3)
    assert boundary_f_score(shifted, truth, 1.0) == 0.0
    assert boundary_f_score(shifted, truth, 2.0) == 1.0
    # Two edges each: columns 2 and 5 (truth) against 2 and 7: half of each side matches at 1 px.
    truth, wider = columns(3, 10, 2, 6), columns(3, 10, 2, 8)
    assert boundary_counts(wider, truth, 1.0) == (3, 6, 3, 6)
    assert boundary_f_score(wider, truth, 1.0) == pytest.approx(0.5)
    assert boundary_f_score(wider, truth, 2.0) == 1.0
    # Against columns 0..6 (edge at column 6): column 7 matches, column 2 does not; P = 3/6, R = 3/3.
    assert boundary_counts(wider, columns(3, 10, 0, 7), 1.0) == (3, 6, 3, 3)
    assert f_score((3, 6, 3, 3)) == pytest.approx(2 / 3)


def test_f_score_of_empty_boundaries():
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert boundary_f_score(empty, empty) == 1.0
    assert boundary_f_score(full, empty) == 1.0  # neither has an edge inside the image
    assert boundary_f_score(columns(4, 4, 0, 2), empty) == 0.0
    assert boundary_f_score(empty, columns(4, 4, 0, 2)) == 0.0


def test_boundary_metrics_pick_the_best_threshold():
    truth = columns(4, 8, 0, 4)
    metrics = BoundaryMetrics(tolerance=0.0)
    metrics.add(torch.from_numpy(truth * np.float32(0.35)), truth)  # foreground only below 0.35
    metrics.add(torch.from_numpy(truth * np.float32(0.95)), truth)  # foreground at every threshold
    summary = metrics.summary()
    # Thresholds 0.1 .. 0.3 score 1 on both samples; 0.4 .. 0.9 (and 0.5) only on the second.
    assert summary.count == 2
    assert summary.boundary_f == 1.0 and summary.boundary_f_threshold == pytest.approx(0.1)
    assert summary.boundary_f_at_binary == 0.5


@pytest.fixture(scope="module")
def scenes() -> list:
    """Three test-split scenes rendered at 256 px, twice the micro model's 128 px."""
    return [make_scene(int(seed), 256) for seed in split_seeds("test", 3)]


@pytest.mark.parametrize("zero_shot", [False, True])
def test_refinement_beats_bilinear_on_the_micro_world(scenes, zero_shot):
    sd, head = default_model_paths()
    segmenter = load_segmenter(sd, None if zero_shot else head, device="cpu")
    plain = segmenter.with_settings(refine=RefineSettings(enabled=False))
    scores = {"refined": BoundaryMetrics(), "bilinear": BoundaryMetrics()}
    for scene in scenes:
        present = [(phrase, mask) for phrase, mask in scene.phrases.items() if mask.any()]
        for name, engine in (("refined", segmenter), ("bilinear", plain)):
            engine.set_image(scene.image)
            maps = engine.predict_terms([phrase for phrase, _ in present])
            for phrase, mask in present:
                scores[name].add(maps[phrase], mask)
    refined, bilinear = scores["refined"].summary(), scores["bilinear"].summary()
    assert refined.count == bilinear.count == 31  # the present phrases of the three scenes
    assert refined.boundary_f > 1.5 * bilinear.boundary_f  # measured: 2.6x (head), 2.0x (zero-shot)
