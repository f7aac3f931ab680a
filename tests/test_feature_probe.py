"""tools/feature_probe.py: mask pooling, the linear probe, and the object table of a few real scenes."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldznet_ext.world.scenes import make_scene
from ldznet_ext.world.spec import OBJECT_LABEL0, VOCABULARY

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("feature_probe", ROOT / "tools" / "feature_probe.py")
probe = importlib.util.module_from_spec(_spec)
sys.modules["feature_probe"] = probe  # dataclasses look their module up there
_spec.loader.exec_module(probe)


def _grid() -> torch.Tensor:
    """[2, 4, 4]: channel 0 numbers the cells 0..15 row by row, channel 1 is 100 + that."""
    cells = torch.arange(16, dtype=torch.float32).view(4, 4)
    return torch.stack([cells, 100 + cells])


def test_pooling_is_the_mean_of_the_cells_under_the_mask():
    mask = np.zeros((8, 8), bool)  # each grid cell is 2 x 2 pixels
    mask[2:6, 4:6] = True  # cells (1, 2) and (2, 2) whole: numbers 6 and 10
    assert probe.pool_over_mask(_grid(), mask).tolist() == [8.0, 108.0]


def test_pooling_weights_a_cell_by_the_share_of_it_the_mask_covers():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True  # cell 0 whole
    mask[0:2, 2] = True  # half of cell 1
    assert probe.mask_weights(mask, (4, 4))[0, :3].tolist() == [1.0, 0.5, 0.0]
    assert probe.pool_over_mask(_grid(), mask).tolist() == pytest.approx([0.5 / 1.5, 100 + 0.5 / 1.5])


def test_latent_window_is_centred_on_the_mask_and_zero_beyond_the_border():
    z = torch.arange(1, 17, dtype=torch.float32).view(1, 4, 4)
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True  # centroid in latent cell (0.25, 0.25): a 2 x 2 window starts at (-1, -1)
    assert probe.latent_window(z, mask, 2).tolist() == [0.0, 0.0, 0.0, 1.0]
    mask[:] = True
    assert probe.latent_window(z, mask, 2).tolist() == [6.0, 7.0, 10.0, 11.0]


def _blobs(count: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points around one far corner per class (a one-hot times 10) with unit noise: linearly separable."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % classes
    return (10 * np.eye(classes)[labels] + rng.normal(size=(count, classes))).astype(np.float32), labels


def test_probe_separates_separable_classes_exactly():
    train, val, test = _blobs(120, 3, 0), _blobs(60, 3, 1), _blobs(300, 3, 2)
    decay, fitted = probe.select_probe(train, val, 3)
    assert decay in probe.WEIGHT_DECAYS
    assert (fitted.predict(test[0]) == test[1]).mean() == 1.0


def _table(count: int, seed: int) -> probe.ObjectTable:
    """Balanced shapes and colours (``count`` a multiple of 36); sources "separable" (a one-hot of both,
    times 10, plus unit noise), "shuffled" (the same rows in another order, so the labels are shuffled against them) and "noise"."""
    rng = np.random.default_rng(seed)
    shape, colour = np.arange(count) % 6, (np.arange(count) // 6) % 6
    separable = 10 * np.concatenate([np.eye(6)[shape], np.eye(6)[colour]], axis=1) + rng.normal(size=(count, 12))
    features = {"separable": separable, "shuffled": rng.permutation(separable), "noise": rng.normal(size=(count, 64))}
    area = np.resize([50, 200, 800, 3000], count)  # every area bin
    return probe.ObjectTable({k: v.astype(np.float32) for k, v in features.items()}, shape, colour, area)


def test_report_is_exact_on_separable_sources_and_at_chance_on_shuffled_or_noise():
    report = probe.probe_report({"train": _table(360, 0), "val": _table(144, 1), "test": _table(1080, 2)})
    assert report["bins"] == {"< 100 px": 270, "100-400 px": 270, "400-1600 px": 270, ">= 1600 px": 270}
    for target in ("shape", "colour"):
        results = report["targets"][target]
        assert list(results) == ["chance (majority class)", "separable", "shuffled", "noise"]
        assert results["chance (majority class)"]["accuracy"] == pytest.approx(1 / 6)  # balanced: exact
        assert results["separable"]["accuracy"] == 1.0
        assert set(results["separable"]["bins"].values()) == {1.0}
        for source in ("shuffled", "noise"):  # within 5 standard deviations of chance on 1,080 objects
            assert abs(results[source]["accuracy"] - 1 / 6) < 0.057, (target, source)
        assert results["noise"]["dims"] == 64 and results["separable"]["decay"] in probe.WEIGHT_DECAYS


def test_probe_ignores_constant_inputs():
    x, y = _blobs(60, 3, 7)
    with_constant = np.concatenate([x, np.ones((60, 1), np.float32)], axis=1)
    fitted = probe.fit_probe(with_constant, y, 3, 1e-2)
    assert torch.isfinite(fitted.weight).all() and fitted.weight[-1].abs().max() == 0


@pytest.fixture(scope="module")
def segmenter():
    from ldznet_ext.defaults import DEFAULT_HEAD_NAME, DEFAULT_SD_NAME, WEIGHTS_DIR
    from ldznet_ext.loading import load_segmenter
    torch.set_num_threads(1)
    return load_segmenter(WEIGHTS_DIR / DEFAULT_SD_NAME, WEIGHTS_DIR / DEFAULT_HEAD_NAME, device="cpu",
                          resolution=probe.SIZE)


def test_object_table_has_one_row_per_visible_object_of_six_scenes(segmenter):
    seeds = range(6)
    table = probe.object_table(segmenter, seeds)
    objects = [(obj, (scene.labels == OBJECT_LABEL0 + k).sum()) for scene in map(make_scene, seeds)
               for k, obj in enumerate(scene.spec.objects)]
    objects = [(obj, area) for obj, area in objects if area]
    assert table.shape.tolist() == [VOCABULARY.shapes.index(obj.shape) for obj, _ in objects]
    assert table.colour.tolist() == [VOCABULARY.colours.index(obj.colour) for obj, _ in objects]
    assert table.area.tolist() == [area for _, area in objects]
    dims = {name: f.shape[1] for name, f in table.features.items()}
    blocks = segmenter.head_config.sd_blocks
    assert dims["z"] == 4 and dims["z window"] == 4 * probe.WINDOW ** 2 and dims["scene contents"] == 12
    for conditioning in probe.CONDITIONINGS:
        assert dims[f"all blocks, {conditioning}"] == sum(dims[f"block {b}, {conditioning}"] for b in blocks)
        assert dims[f"z + all blocks, {conditioning}"] == 4 + dims[f"all blocks, {conditioning}"]
    assert all(f.shape[0] == len(objects) and np.isfinite(f).all() for f in table.features.values())
    # the caption reaches the features; the empty caption and the caption give the same z
    assert not np.allclose(table.features["all blocks, empty"], table.features["all blocks, caption"])
    np.testing.assert_array_equal(table.features["z + all blocks, empty"][:, :4], table.features["z"])


def test_chosen_blocks_are_the_ones_probed(segmenter):
    table = probe.object_table(segmenter, range(2), blocks=(1, 16))
    assert sorted(k for k in table.features if k.startswith("block ")) == [
        "block 1, caption", "block 1, empty", "block 16, caption", "block 16, empty"]
    assert table.features["block 16, empty"].shape[1] == 32  # the micro UNet's finest level: 32 channels


@pytest.mark.parametrize("text, expected", [("6,7,8", (6, 7, 8)), ("16", (16,))])
def test_block_list_parses(text, expected):
    assert probe.block_list(text) == expected


@pytest.mark.parametrize("text", ["", "6,x", "0,1", "-1"])
def test_block_list_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        probe.block_list(text)
