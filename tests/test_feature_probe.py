"""tools/feature_probe.py: mask pooling, the linear probe, and the object table of a few real scenes."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldznet_ext.errors import LdznetError
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


PLUS = [(3, c) for c in range(1, 6)] + [(r, 3) for r in (1, 2, 4, 5)]
CROSS = [(d, d) for d in range(1, 6)] + [(1, 5), (2, 4), (4, 2), (5, 1)]  # an x: the plus's 9 cells of mass


def _plus_or_cross(count: int, seed: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Windows [count, channels, 8, 8] of a plus (label 0) or an x (label 1) of equal mass, each moved by
    -1..1 cells either way, plus noise: a spatial pattern whose mean over the window says nothing."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    windows = rng.normal(scale=0.3, size=(count, channels, 8, 8))
    for window, label, (dr, dc) in zip(windows, labels, rng.integers(-1, 2, size=(count, 2))):
        for r, c in (PLUS, CROSS)[label]:
            window[:, r + dr, c + dc] += 1.0
    return windows.astype(np.float32), labels


def test_cnn_probe_reads_a_spatial_pattern_that_a_pooled_linear_probe_cannot():
    train, val, test = _plus_or_cross(400, 0), _plus_or_cross(200, 1), _plus_or_cross(400, 2)
    fitted = probe.fit_cnn(train, val, 2)
    assert (fitted.predict(test[0]) == test[1]).mean() == 1.0
    assert 1 <= fitted.epochs <= probe.CNN_EPOCHS
    pooled = [(x.mean(axis=(2, 3)), y) for x, y in (train, val, test)]
    _, linear = probe.select_probe(pooled[0], pooled[1], 2)
    assert abs((linear.predict(pooled[2][0]) == test[1]).mean() - 0.5) < 0.1  # 4 standard deviations


def test_cnn_probe_is_at_chance_on_shuffled_labels_and_repeats_itself():
    rng = np.random.default_rng(3)
    (x, y), (xv, yv), (xt, yt) = _plus_or_cross(400, 0), _plus_or_cross(200, 1), _plus_or_cross(600, 2)
    shuffled = [(x, rng.permutation(y)), (xv, rng.permutation(yv))]
    fitted = probe.fit_cnn(*shuffled, 2)
    predicted = fitted.predict(xt)
    assert abs((predicted == rng.permutation(yt)).mean() - 0.5) < 0.1  # 600 objects: 5 standard deviations
    np.testing.assert_array_equal(probe.fit_cnn(*shuffled, 2).predict(xt), predicted)


def test_cnn_reads_rgb_pixels_at_full_resolution_down_to_the_window_grid():
    model = probe.window_cnn(3 * 64, 6, cell=8)
    assert isinstance(model[0], torch.nn.PixelShuffle) and model[1].in_channels == 3
    assert [m.out_channels for m in model if isinstance(m, torch.nn.Conv2d)] == [16, 32, 64, 64, 64]
    assert model(torch.zeros(2, 3 * 64, 8, 8)).shape == (2, 6)
    assert [type(m) for m in probe.window_cnn(4, 6)][:2] == [torch.nn.Conv2d, torch.nn.ReLU]


def _window_table(count: int, seed: int) -> probe.ObjectTable:
    """The CNN sources' windows: "z" holds a plus (shape 0) or an x (shape 1), the others noise ("RGB":
    2 x 2 pixels per cell)."""
    z, shape = _plus_or_cross(count, seed, channels=4)
    rng = np.random.default_rng(seed + 100)
    features = {"z": z, "RGB": rng.normal(size=(count, 3 * 4, 8, 8)), "RGB decoded": rng.normal(size=(count, 3 * 4, 8, 8)),
                "finest blocks, empty": rng.normal(size=(count, 5, 8, 8)),
                "finest blocks, caption": rng.normal(size=(count, 5, 8, 8))}
    return probe.ObjectTable({k: v.astype(np.float32) for k, v in features.items()}, shape, shape,
                             np.resize([50, 200, 800, 3000], count))


def test_cnn_report_names_the_shape_from_the_sources_holding_it():
    report = probe.cnn_report({"train": _window_table(240, 0), "val": _window_table(100, 1),
                               "test": _window_table(200, 2)})
    results = report["targets"]["shape"]
    assert list(report["targets"]) == ["shape"]
    assert list(results) == ["chance (majority class)", *probe.CNN_SOURCES]
    assert results["chance (majority class)"]["accuracy"] == 0.5
    assert [results[s]["dims"] for s in probe.CNN_SOURCES] == [12, 12, 4, 5, 5, 9, 9]
    for source in ("z", "z + finest blocks, empty", "z + finest blocks, caption"):
        assert results[source]["accuracy"] == 1.0 and set(results[source]["bins"].values()) == {1.0}
    for source in ("RGB (every pixel)", "RGB decoded from z", "finest blocks, empty", "finest blocks, caption"):
        assert abs(results[source]["accuracy"] - 0.5) < 0.12, source  # 200 objects: 3.4 standard deviations
    report["probe"] = "cnn"
    lines = probe.markdown(report).splitlines()
    assert lines[0] == ("| source | channels, epochs | shape | shape < 100 px (n 50) | shape 100-400 px (n 50) | "
                        "shape 400-1600 px (n 50) | shape >= 1600 px (n 50) |")
    assert lines[5].startswith(f"| z | 4, {results['z']['epochs']} | 100.0 | 100.0 |")


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


def test_windows_hold_every_pixel_z_and_the_finest_blocks_around_each_object(segmenter):
    from ldznet_ext.images import to_model_input
    from ldznet_ext.zeroshot import blocks_at
    finest = blocks_at(segmenter.backbone.layout, (1,))
    assert finest == (1, 2, 14, 15, 16)  # the micro UNet's blocks at 16 x 16
    seeds = range(3)
    windows = probe.object_table(segmenter, seeds, blocks=finest, windows=True)
    vectors = probe.object_table(segmenter, seeds, blocks=finest)
    count = len(vectors.area)
    assert {k: v.shape for k, v in windows.features.items()} == {
        "RGB": (count, 3 * 64, 8, 8), "RGB decoded": (count, 3 * 64, 8, 8), "z": (count, 4, 8, 8),
        "finest blocks, empty": (count, 5 * 32, 8, 8),
        "finest blocks, caption": (count, 5 * 32, 8, 8)}
    np.testing.assert_array_equal(windows.shape, vectors.shape)
    np.testing.assert_array_equal(windows.features["z"].reshape(count, -1), vectors.features["z window"])
    # the RGB window, its channels put back as pixels, is the image's 64 x 64 px around the object's cell
    # and the decoded window is the VAE's decoding of z around it
    image = to_model_input(make_scene(0).image, (probe.SIZE, probe.SIZE))
    with torch.no_grad():
        decoded = segmenter.backbone.decode_latent(segmenter.backbone.encode_image(image)).float().clamp(-1, 1)
    sources = {"RGB": torch.nn.functional.pad(image[0], (64,) * 4),
               "RGB decoded": torch.nn.functional.pad(decoded[0], (64,) * 4)}
    row = 0
    for k, _ in enumerate(make_scene(0).spec.objects):
        rows, cols = np.nonzero(make_scene(0).labels == OBJECT_LABEL0 + k)
        if len(rows):
            top, left = (8 * int(round(v.mean() / 8 - 4)) + 64 for v in (rows, cols))
            for source, pixels in sources.items():
                window = torch.nn.functional.pixel_shuffle(torch.from_numpy(windows.features[source][row])[None], 8)[0]
                torch.testing.assert_close(window, pixels[:, top:top + 64, left:left + 64], rtol=0, atol=1e-5)
            row += 1
    assert row >= 1  # scene 0 has objects, so the windows were compared
    assert not np.allclose(windows.features["RGB"], windows.features["RGB decoded"], atol=0.05)
    assert not np.allclose(windows.features["finest blocks, empty"], windows.features["finest blocks, caption"])


def test_a_larger_render_keeps_the_windows_share_of_the_image(segmenter):
    assert [probe.window_cells(size) for size in (64, 128, 256, 384)] == [4, 8, 16, 24]
    vectors = probe.object_table(segmenter, range(2), size=256)
    windows = probe.object_table(segmenter, range(2), blocks=(1, 16), windows=True, size=256)
    scenes = [make_scene(seed, 256) for seed in range(2)]
    areas = [int((scene.labels == OBJECT_LABEL0 + k).sum()) for scene in scenes
             for k, _ in enumerate(scene.spec.objects)]
    assert vectors.size == windows.size == 256 and vectors.area.tolist() == [a for a in areas if a]
    count = len(vectors.area)
    assert vectors.features["z window"].shape == (count, 4 * 16 * 16)
    assert {k: v.shape for k, v in windows.features.items()} == {
        "RGB": (count, 3 * 64, 16, 16), "RGB decoded": (count, 3 * 64, 16, 16), "z": (count, 4, 16, 16),
        "finest blocks, empty": (count, 2 * 32, 16, 16),
        "finest blocks, caption": (count, 2 * 32, 16, 16)}
    np.testing.assert_array_equal(windows.features["z"].reshape(count, -1), vectors.features["z window"])
    bins, _ = probe._test_bins({"test": vectors})  # areas at 256 px are binned as at 128 px
    assert bins.tolist() == [probe.size_bin(VOCABULARY.shapes[0], a / 4, 128) for a in vectors.area.tolist()]


def test_windows_refuse_blocks_off_z_grid(segmenter):
    with pytest.raises(LdznetError, match="z's \\(16, 16\\) grid"):
        probe.object_table(segmenter, range(1), blocks=(6,), windows=True)
