"""Image-guided refinement (ldznet_ext/refine.py) on hand-built images, and its place in the Segmenter."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_models import random_image
from PIL import Image

from ldznet_ext import cli, refine
from ldznet_ext.batch import MANIFEST_NAME, read_manifest
from ldznet_ext.errors import LdznetError
from ldznet_ext.images import resize_probability
from ldznet_ext.loading import load_segmenter
from ldznet_ext.refine import RefineSettings, refine_probability, upsample_rows
from ldznet_ext.segmenter import Segmenter, SegmenterSettings
from ldznet_ext.webui import api
from ldznet_ext.webui.engine import EngineOptions, MaskEngine


def bilinear(p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(p[None].float(), size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)


def edge_image(height: int, width: int, edge: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Dark (40) left of column ``edge``, bright (200, reddish) from it on, plus Gaussian noise."""
    image = np.empty((height, width, 3), np.float64)
    image[:, :edge] = (40, 50, 60)
    image[:, edge:] = (210, 190, 170)
    image += np.random.default_rng(seed).normal(0, noise, image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def blurred_step(height: int, width: int, crossing: float, softness: float) -> torch.Tensor:
    """[1, height, width] coarse probability: a logistic ramp across the columns, 0.5 at ``crossing``
    (in coarse pixel units from the left border)."""
    x = torch.arange(width, dtype=torch.float64) + 0.5
    row = torch.sigmoid((x - crossing) / softness)
    return row.expand(height, width)[None].float()


def crossings(p: torch.Tensor) -> torch.Tensor:
    """Per row, the first column where p > 0.5."""
    return (p > 0.5).float().argmax(dim=-1)


@pytest.mark.parametrize("noise", [0.0, 6.0])
def test_sharp_edge_lands_within_one_pixel(noise):
    """The coarse map is 8x coarser, blurred over several coarse pixels and crosses 0.5 five output
    pixels right of the true edge; bilinear keeps that error, refinement lands on the edge."""
    height, width, edge = 96, 256, 133
    image = edge_image(height, width, edge, noise)
    coarse = blurred_step(12, 32, crossing=(edge + 5) / 8, softness=1.5)
    plain = refine_probability(coarse, image, RefineSettings(enabled=False))[0]
    refined = refine_probability(coarse, image)[0]
    assert refined.shape == (height, width)
    assert (crossings(plain) - edge).abs().min() >= 4
    assert int((crossings(refined) - edge).abs().max()) <= 1
    # The refined map jumps at the edge, within one pixel; bilinear climbs less than 0.05 there.
    assert float((refined[:, edge] - refined[:, edge - 1]).min()) > 0.3
    assert float((plain[:, edge] - plain[:, edge - 1]).max()) < 0.05


def test_constant_image_leaves_the_probability_unchanged():
    image = np.full((70, 90, 3), 123, np.uint8)
    coarse = torch.rand(2, 9, 12, generator=torch.Generator().manual_seed(0))
    refined = refine_probability(coarse, image, RefineSettings(radius=12))
    assert (refined - bilinear(coarse, (70, 90))).abs().max() < 2e-5  # float rounding of two lerp orders


@pytest.mark.parametrize("size", [(37, 91), (1, 5), (64, 33), (8, 8)])
def test_odd_sizes_keep_the_output_size(size):
    image = random_image(*size, seed=1)
    coarse = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(2))
    refined = refine_probability(coarse, image)
    assert refined.shape == (3, *size) and refined.dtype == torch.float32
    assert float(refined.min()) >= 0 and float(refined.max()) <= 1
    off = refine_probability(coarse, image, RefineSettings(enabled=False))
    assert (off - bilinear(coarse, size)).abs().max() < 1e-6


def test_upsample_rows_equals_a_slice_of_interpolate():
    x = torch.rand(2, 3, 11, 7, generator=torch.Generator().manual_seed(3))
    full = F.interpolate(x, size=(53, 29), mode="bilinear", align_corners=False)
    for rows in [(0, 53), (0, 1), (5, 17), (52, 53)]:
        assert (upsample_rows(x, (53, 29), rows) - full[..., rows[0]:rows[1], :]).abs().max() < 1e-6


def test_bands_give_the_same_result_as_one_pass(monkeypatch):
    image = edge_image(90, 120, 61, noise=8.0)
    coarse = blurred_step(9, 12, crossing=6.4, softness=1.0).expand(2, 9, 12)
    whole = refine_probability(coarse, image)
    monkeypatch.setattr(refine, "BAND_PIXELS", 120 * 7)  # bands of 7 rows, the last one shorter
    assert (refine_probability(coarse, image) - whole).abs().max() < 1e-6


def test_a_band_holds_a_bounded_number_of_pixels_whatever_the_number_of_maps(monkeypatch):
    """16 terms on an 8192 x 8192 image: the band's temporaries are per map, so the rows per band
    shrink with the maps (without that the full-size pass held about 1 GB more per band)."""
    image = edge_image(90, 120, 61, noise=8.0)
    coarse = blurred_step(9, 12, crossing=6.4, softness=1.0).expand(8, 9, 12)
    bands = []
    upsample = refine.upsample_rows
    monkeypatch.setattr(refine, "upsample_rows", lambda x, size, rows: bands.append(rows) or upsample(x, size, rows))
    monkeypatch.setattr(refine, "BAND_PIXELS", 120 * 8 * 5)  # 5 rows of 8 maps
    refine_probability(coarse, image)
    assert {stop - start for start, stop in bands} == {5}


def test_never_reaches_an_object_beyond_the_radius():
    """Two identical squares; the coarse map holds only the left one. The right one, further away
    than the radius, stays exactly as bilinear left it (0)."""
    image = np.full((64, 160, 3), 30, np.uint8)
    image[20:44, 20:44] = image[20:44, 116:140] = (220, 60, 60)
    coarse = torch.zeros(1, 16, 40)
    coarse[0, 5:11, 5:11] = 1.0
    refined = refine_probability(coarse, image, RefineSettings(radius=16))[0]
    assert float(refined[:, 90:].max()) == 0.0
    assert float(refined[24:40, 24:40].min()) > 0.9


def test_terms_are_refined_together_as_alone():
    image = edge_image(40, 72, 30, noise=5.0)
    coarse = torch.rand(3, 5, 9, generator=torch.Generator().manual_seed(4))
    together = refine_probability(coarse, image)
    for i in range(3):
        assert (refine_probability(coarse[i:i + 1], image) - together[i:i + 1]).abs().max() < 1e-5


def test_strength_blends_between_bilinear_and_guided():
    image = edge_image(48, 64, 29, noise=4.0)
    coarse = blurred_step(6, 8, crossing=4.4, softness=1.5)
    full = refine_probability(coarse, image)
    none = refine_probability(coarse, image, RefineSettings(strength=0.0))
    half = refine_probability(coarse, image, RefineSettings(strength=0.5))
    assert (none - bilinear(coarse, (48, 64))).abs().max() < 1e-6
    assert (half - (none + full) / 2).abs().max() < 1e-5
    assert (full - none).abs().max() > 0.1


@pytest.mark.parametrize("map_size, decided_at, settings, radius", [
    ((10, 20), None, RefineSettings(), 20.0),  # 10x the rows, 5x the columns: the larger scale, 2 coarse pixels
    ((10, 20), (5, 5), RefineSettings(), 40.0),  # decided on a coarser grid than the maps' own
    ((64, 64), None, RefineSettings(), 4.0),  # 1.6x: 3.2 px, raised to MIN_RADIUS
    ((10, 20), None, RefineSettings(radius=7.5), 7.5),  # given: used as it is
])
def test_automatic_radius_is_two_coarse_pixels_at_the_larger_scale(map_size, decided_at, settings, radius,
                                                                   monkeypatch):
    radii = []
    grid_shape = refine._grid_shape
    monkeypatch.setattr(refine, "_grid_shape", lambda size, r: radii.append(r) or grid_shape(size, r))
    refine_probability(torch.full((1, *map_size), 0.5), edge_image(100, 100, 50), settings, decided_at)
    assert radii == [radius]


def test_the_filter_grid_is_never_finer_than_the_image():
    """A radius below GRID_RADIUS filters at the image's own size; above it the grid coarsens by radius / 4."""
    assert refine._grid_shape((48, 64), 2.0) == ((48, 64), 2)
    assert refine._grid_shape((48, 64), 8.0) == ((24, 32), 4)


def test_a_probability_range_of_half_gets_the_full_weight():
    """FULL_RANGE: near a step of 0.5 or more the weight is the image's structure alone; a step of 0.25
    gets half of it."""
    guide = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(5))
    step = torch.zeros(1, 1, 12, 16)
    step[..., 8:] = 1.0
    weight = {v: refine._weight(step * v, guide, 2, 1e-3, 1.0) for v in (0.25, 0.5, 1.0)}
    assert torch.equal(weight[0.5], weight[1.0])
    assert torch.equal(weight[0.25], weight[0.5] * 0.5)
    assert float(weight[1.0][..., 6:10].min()) > 0 and float(weight[1.0][..., :5].max()) == 0.0


@pytest.mark.parametrize("settings", [RefineSettings(enabled=False), RefineSettings()])
def test_maps_outside_0_1_come_back_clamped(settings):
    """As images.resize_probability: the result is in [0, 1] whatever the maps hold."""
    coarse = torch.tensor([[[-0.5, 1.5], [1.5, -0.5]]])
    refined = refine_probability(coarse, np.full((8, 8, 3), 90, np.uint8), settings)
    assert float(refined.min()) == 0.0 and float(refined.max()) == 1.0
    assert (refined - resize_probability(coarse, (8, 8))).abs().max() < 1e-6


@pytest.mark.parametrize("changes", [{"strength": 1.5}, {"strength": -0.1}, {"radius": 0.5}, {"radius": float("nan")},
                                     {"eps": 0.0}, {"enabled": 1}])
def test_bad_settings_are_refused(changes):
    with pytest.raises(LdznetError):
        RefineSettings(**changes)


def test_the_image_must_be_uint8_rgb():
    with pytest.raises(LdznetError, match="uint8"):
        refine_probability(torch.rand(1, 4, 4), np.zeros((8, 8, 3), np.float32))


def test_segmenter_refines_term_maps_by_default(tiny_models64):
    """predict's terms are the cached model maps refined with the image; refinement off gives the
    bilinear maps of before; the final probability combines the (refined) term maps."""
    sd, head, config = tiny_models64
    image = random_image(70, 150, seed=5)
    segmenter = Segmenter(sd, head, config, SegmenterSettings(resolution=64))
    segmenter.set_image(image)
    prediction = segmenter.predict("cat OR dog")
    state = segmenter._image
    cached = torch.stack([state.cache["cat"], state.cache["dog"]])
    expected = refine_probability(cached, image, decided_at=tuple(state.z.shape[-2:]))
    assert (prediction.terms["cat"] - expected[0]).abs().max() < 1e-6
    assert (prediction.probability - torch.maximum(expected[0], expected[1])).abs().max() < 1e-6
    plain = segmenter.with_settings(refine=RefineSettings(enabled=False))
    plain.set_image(image)
    maps = plain.predict_terms(["cat"])
    assert (maps["cat"] - resize_probability(state.cache["cat"], (70, 150))).abs().max() < 1e-6
    assert (maps["cat"] - prediction.terms["cat"]).abs().max() > 1e-3


def test_cli_refinement_switches(tmp_path, tiny_model_files, capsys):
    """`ldznet mask` refines by default, --no-refine gives the bilinear map, strength and radius
    reach the segmenter; `ldznet batch` takes the same switches and records them in its manifest."""
    sd, head = tiny_model_files
    image = random_image(45, 83, seed=6)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    reference = load_segmenter(sd, head)
    cases = {(): RefineSettings(), ("--no-refine",): RefineSettings(enabled=False),
             ("--refine-strength", 0.5, "--refine-radius", 6): RefineSettings(strength=0.5, radius=6.0)}
    written = []
    for flags, settings in cases.items():
        engine = reference.with_settings(refine=settings)
        engine.set_image(image)
        expected = engine.predict("cat").probability_image()
        out = tmp_path / f"p{len(written)}.png"
        assert cli.main(["mask", str(tmp_path / "in" / "a.png"), "cat", "-o", str(tmp_path / "m.png"),
                         "--probability", str(out), "--model", str(sd), "--head", str(head),
                         *map(str, flags)]) == 0
        written.append(np.asarray(Image.open(out)))
        assert np.array_equal(written[-1], expected)
    assert not np.array_equal(written[0], written[1]) and not np.array_equal(written[0], written[2])
    assert cli.main(["batch", str(tmp_path / "in"), "cat", "-o", str(tmp_path / "out"), "--no-refine",
                     "--model", str(sd), "--head", str(head)]) == 0
    capsys.readouterr()
    entry = read_manifest(tmp_path / "out" / MANIFEST_NAME)[0]
    assert entry["status"] == "ok" and entry["settings"]["refine"] is False  # the job's field (MaskJob.refine)


def test_api_option_reaches_the_segmenter(tmp_path, tiny_sd):
    """POST /ldznet/v1/mask's "refine" goes through MaskJob and the engine into the segmenter;
    it is on when left out, and a value that is not a boolean is refused with 422."""
    image = random_image(40, 56, seed=7)
    encoded = base64.b64encode(_png(image)).decode()
    engine, options = MaskEngine(tmp_path), EngineOptions(resolution=64)

    def compute(picture, request, brush):
        return engine.predict(tiny_sd, picture, request, options, brush)

    def probability(payload: dict) -> np.ndarray:
        response = api.mask_response({"image": encoded, "expression": "cat", "mode": "zero-shot", **payload},
                                     compute, lambda request: None)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["probability"]))))

    for payload, refine_settings in (({}, RefineSettings()), ({"refine": False}, RefineSettings(enabled=False))):
        reference = Segmenter(tiny_sd, settings=SegmenterSettings(resolution=64, refine=refine_settings))
        reference.set_image(image)
        assert np.array_equal(probability(payload), reference.predict("cat").probability_image())
    assert not np.array_equal(probability({}), probability({"refine": False}))
    with pytest.raises(api.ApiError, match="refine must be true or false") as caught:
        probability({"refine": "maybe"})
    assert caught.value.status == 422


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
