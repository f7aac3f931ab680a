"""Reading images (wrong types, corrupt files of every format) and the working frame of any shape:
its area stays about resolution^2, extreme shapes are letterboxed, and maps come back aligned at
the image's own size."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_models import random_image
from PIL import EpsImagePlugin, Image

from ldznet_ext.errors import ImageError, LdznetError
from ldznet_ext.images import (MAX_ASPECT, crop_to_box, image_box, load_image, resize_probability, to_model_input,
                               working_size)
from ldznet_ext.refine import RefineSettings
from ldznet_ext.segmenter import Segmenter, SegmenterSettings

pytestmark = pytest.mark.usefixtures("single_thread")

FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"]
PAD = float(torch.tensor(128.0) / 127.5 - 1.0)  # mid-grey in the model's [-1, 1], as float32 computes it


def _encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_image(12, 16, seed=1)).save(buffer, format=image_format)
    return buffer.getvalue()


def _mutations(data: bytes, seed: int):
    """Every byte of the header set to 0, 2 (a small type or count) and 255, then random 1-3 byte mutations."""
    for position in range(min(len(data), 96)):
        for value in (0, 2, 255):
            yield f"byte {position} = {value}", data[:position] + bytes([value]) + data[position + 1:]
    rng = np.random.default_rng(seed)
    for number in range(40):
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            mutated[int(rng.integers(len(data)))] = int(rng.integers(256))
        yield f"random mutation {number}", bytes(mutated)


def test_mutated_files_of_every_format_load_or_raise_image_error():
    wrong = []
    for seed, image_format in enumerate(FORMATS):
        wrong += _wrong_outcomes(image_format, _mutations(_encoded(image_format), seed))
    assert wrong == []


def _wrong_outcomes(image_format: str, mutations) -> list[str]:
    wrong = []
    for mutation, data in mutations:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow warns about some corrupt TIFF tags
                image = load_image(data, max_pixels=100_000)
        except ImageError:
            continue
        except Exception as error:  # noqa: BLE001 (what the test looks for)
            wrong.append(f"{image_format} {mutation}: {type(error).__name__}: {error}")
            continue
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            wrong.append(f"{image_format} {mutation}: {image.dtype} array of shape {image.shape}")
    return wrong


@pytest.mark.parametrize("tag_type, raised", [(2, "TypeError"), (5, "TypeError")])
def test_tiff_with_a_corrupt_tag_type_is_an_image_error(tag_type, raised):
    data = bytearray(_encoded("TIFF"))
    assert data[70:73] == b"\x11\x01\x04"  # StripOffsets (0x0111), of type LONG (4)
    data[72] = tag_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageError, match=rf"^image: cannot decode the image \({raised}: .*truncated or corrupt$"):
            load_image(bytes(data))


def test_out_of_memory_while_decoding_is_an_image_error(monkeypatch, tmp_path):
    def out_of_memory(image, *args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("ldznet_ext.images._to_rgb", out_of_memory)
    path = tmp_path / "big.png"
    path.write_bytes(_encoded("PNG"))
    with pytest.raises(ImageError, match="^big.png: too large to decode in the memory available; downscale it$"):
        load_image(path)


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def test_float_images_read_as_float_arrays_do():
    """A 32-bit float TIFF (mode F) in [0, 1], as numpy and image tools write them, is read as a float
    array is, not as 0..255 (all but black); one in 0..255 (Pillow's convert("F")) stays as it was."""
    unit = np.random.default_rng(3).random((12, 16)).astype(np.float32)
    assert Image.open(io.BytesIO(_tiff(unit))).mode == "F"
    assert np.array_equal(load_image(_tiff(unit)), load_image(unit))
    edges = np.array([[0.0, 0.5, 1.0]], np.float32)  # 1.0 itself is in [0, 1]: white, not 0..255's near-black
    assert load_image(_tiff(edges)).tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]
    grey = random_image(12, 16, seed=4, channels=1)[..., 0]
    assert np.array_equal(load_image(_tiff(grey.astype(np.float32))), np.dstack([grey] * 3))
    # a resampling filter's ringing past 0 and 1, which a float array may carry too: it was read as 0..255
    rings = unit.copy()
    rings[0, :2] = (1.0000001, -0.001)
    assert np.array_equal(load_image(Image.fromarray(rings)), load_image(rings))
    assert load_image(rings).max() == 255


@pytest.mark.parametrize("mode, values, shown", [("F", (-1.0, 1.0), "-1 to 1"), ("F", (0.0, 70000.0), "0 to 70000"),
                                                  ("I", (-5, 200), "-5 to 200")])
def test_float_and_32_bit_images_outside_every_pixel_range_are_refused(mode, values, shown):
    """[-1, 1] came out with its negative half black, clipped, as no float array is."""
    array = np.linspace(*values, 12 * 16, dtype=np.float32 if mode == "F" else np.int32).reshape(12, 16)
    image = Image.fromarray(array)
    assert image.mode == mode
    with pytest.raises(ImageError, match=f"^image: a {mode} image with values from {shown}; expected values in "
                                         r"\[0, 1\], 0..255 or 0..65535$"):
        load_image(image)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_float_images_with_nan_or_inf_are_refused(value, tmp_path):
    """As float arrays are: NaN would become 0 with a numpy warning, and the mask would be of nothing."""
    unit = np.full((12, 16), 0.5, np.float32)
    unit[3, 4] = value
    path = tmp_path / "depth.tif"
    path.write_bytes(_tiff(unit))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="^depth.tif: contains NaN or infinite values$"):
            load_image(path)


def test_postscript_is_never_handed_to_ghostscript(monkeypatch, tmp_path):
    """Pillow decodes EPS by running Ghostscript on the file: an upload to the API, or any image named
    .png, must not reach an interpreter of PostScript."""
    def run_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was run on the image")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", run_ghostscript)
    path = tmp_path / "photo.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 12\nshowpage\n")
    with pytest.raises(ImageError, match="^photo.png: not an image, or a format Pillow cannot read$"):
        load_image(path)


def test_the_tensor_recipe_works_on_what_a_pipeline_decodes():
    """The hint's recipe failed on a tensor that tracks gradients (numpy()), a bf16 one, a batch and the
    VAE's [-1, 1]: followed as it says, each is read as the image it holds."""
    image = torch.rand(3, 16, 24)
    decoded = (image * 2 - 1)[None].bfloat16().requires_grad_(True)  # [1, 3, H, W] in [-1, 1]
    x = (decoded[0] + 1) / 2
    converted = load_image(x.detach().float().permute(1, 2, 0).cpu().numpy())
    expected = load_image(image.bfloat16().float().permute(1, 2, 0).numpy())
    assert converted.shape == (16, 24, 3) and np.abs(converted.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("source, found", [
    (torch.zeros(3, 8, 8), "torch.Tensor; convert it to [H, W, 3] in [0, 1], e.g. a [3, H, W] one: "
                           "x.detach().float().permute(1, 2, 0).cpu().numpy() (a batch [N, 3, H, W]: x[0] first; "
                           "a VAE decode's [-1, 1]: (x + 1) / 2 first)"),
    (None, "None"),
    ([[0, 0, 0]], "list"),
    (io.BytesIO(b"png"), "_io.BytesIO"),
])
def test_unsupported_image_types_say_what_is_expected(source, found, with_head):
    message = re.escape(f"expected a path, bytes, PIL image or numpy array as the image, got {found}") + "$"
    with pytest.raises(ImageError, match=message):
        load_image(source)
    with pytest.raises(ImageError, match=message):
        with_head.set_image(source)
    with pytest.raises(ImageError, match=message):
        with_head.predict_images([source], "cat")


def test_bytearray_reads_as_bytes():
    data = _encoded("PNG")
    assert np.array_equal(load_image(bytearray(data)), load_image(data))


def test_an_image_of_exactly_the_pixel_limit_loads():
    image = random_image(10, 10, seed=5)
    assert np.array_equal(load_image(image, max_pixels=100), image)
    assert np.array_equal(load_image(_encoded("PNG"), max_pixels=12 * 16), random_image(12, 16, seed=1))
    with pytest.raises(ImageError, match=r"10x10 = 100 pixels is over the limit of 99; downscale it, or raise the "
                                         r"limit \(mask and batch: --max-pixels\)$"):
        load_image(image, max_pixels=99)


def test_16_bit_arrays_round_to_the_nearest_8_bit_level():
    levels = np.array([[0, 128, 129, 385, 386, 65406, 65407, 65535]], np.uint16)  # k levels: 257 * k +- 128.5
    assert load_image(levels)[0, :, 0].tolist() == [0, 0, 1, 1, 2, 254, 255, 255]


@pytest.mark.parametrize("width, height, resolution, expected", [
    (1, 100000, 256, (64, 704)),      # aspect 1:8: 90.5 -> 64, 724.1 -> 704 (was 64 x 80960)
    (100000, 1, 384, (1088, 128)),    # aspect 8:1: 1086.1 -> 1088, 135.8 -> 128
    (30000, 1, 512, (1472, 192)),     # 1448.2 -> 1472, 181.0 -> 192
])
def test_working_size_of_extreme_shapes_by_hand(width, height, resolution, expected):
    assert working_size(width, height, resolution) == expected


@pytest.mark.parametrize("resolution", [256, 384, 512, 768])
@pytest.mark.parametrize("width, height", [(1, 100000), (100000, 1), (1, 30000), (7000, 3)])
def test_working_area_stays_about_resolution_squared(width, height, resolution):
    w, h = working_size(width, height, resolution)
    assert w % 64 == 0 and h % 64 == 0
    assert w * h <= 1.25 * resolution ** 2


@pytest.mark.parametrize("width, height, size, expected", [
    (700, 24, (1088, 128), (0, 40, 1088, 80)),    # band 1088 * 24 / 700 = 37.3 -> 40 rows, from (128 - 40) // 2
    (24, 700, (128, 1088), (40, 0, 80, 1088)),
    (100000, 1, (1088, 128), (0, 56, 1088, 64)),  # at least one cell of 8
    (820, 100, (1088, 128), (0, 0, 1088, 128)),   # 8.2:1 fills more than the frame's 128 rows: clamped
    (640, 480, (448, 320), (0, 0, 448, 320)),     # within MAX_ASPECT: the whole frame, as always
    (8000, 1000, (1472, 192), (0, 0, 1472, 192)),  # exactly MAX_ASPECT: the whole frame (a band would be 184 rows)
    (1000, 8000, (192, 1472), (0, 0, 192, 1472)),
])
def test_image_box_by_hand(width, height, size, expected):
    assert image_box(width, height, size) == expected


def test_letterboxed_input_crops_back_to_the_image():
    image = np.full((24, 700, 3), 255, np.uint8)
    image[:, 200:300] = 0
    size = working_size(700, 24, 384)
    box = image_box(700, 24, size)
    assert max(700 / 24, 24 / 700) > MAX_ASPECT and (size, box) == ((1088, 128), (0, 40, 1088, 80))
    pixels = to_model_input(image, size, box)
    assert pixels.shape == (1, 3, 128, 1088)
    assert (pixels[..., :40, :] == PAD).all() and (pixels[..., 80:, :] == PAD).all()
    brightness = (pixels[0].mean(0) + 1.0) / 2.0
    latent_grid = F.avg_pool2d(brightness[None, None], 8)[0, 0]  # as maps at the latent's size
    for maps in (brightness, latent_grid):
        back = resize_probability(crop_to_box(maps, box, size), (24, 700))
        assert back.shape == (24, 700)
        assert back[:, :180].min() > 0.99 and back[:, 220:280].max() < 0.01 and back[:, 320:].min() > 0.99


def test_crop_of_maps_finer_than_the_frame():
    """A head's logits are 8x the latent: 4x the frame for a model with f = 2."""
    maps = torch.arange(4 * 64 * 4 * 16, dtype=torch.float32).reshape(4 * 16, 4 * 64)
    assert torch.equal(crop_to_box(maps, (0, 4, 64, 12), (64, 16)), maps[16:48, :])
    assert crop_to_box(maps, (0, 0, 64, 16), (64, 16)) is maps


def test_crop_off_the_maps_grid_is_refused():
    message = "box (0, 4, 64, 12) of frame (64, 16) is not on the grid of 8x2 maps"
    with pytest.raises(ValueError, match=re.escape(message)):
        crop_to_box(torch.zeros(2, 8), (0, 4, 64, 12), (64, 16))


@pytest.fixture
def with_head(tiny_sd, tiny_head) -> Segmenter:
    return Segmenter(tiny_sd, *tiny_head, SegmenterSettings(resolution=64))


@pytest.mark.parametrize("height, width, vae_input", [(1, 100000, (1, 3, 64, 192)), (100000, 1, (1, 3, 192, 64))])
def test_extreme_shapes_encode_a_bounded_frame_and_give_masks_of_their_size(height, width, vae_input, with_head,
                                                                             monkeypatch):
    inputs = []
    encode = with_head.backbone.encode_image
    monkeypatch.setattr(with_head.backbone, "encode_image", lambda pixels, **kw: inputs.append(pixels) or encode(
        pixels, **kw))
    with_head.set_image(random_image(height, width, seed=2))
    prediction = with_head.predict("cat OR dog")
    assert [tuple(pixels.shape) for pixels in inputs] == [vae_input]  # not 64 x 20224 at resolution 64
    assert prediction.probability.shape == prediction.mask.shape == prediction.terms["cat"].shape == (height, width)


def test_letterboxed_maps_are_aligned_with_the_image(with_head, monkeypatch):
    """A head that answers with the model input's brightness must give back the image itself."""
    image = np.full((700, 24, 3), 255, np.uint8)
    image[200:300] = 0
    segmenter = with_head.with_settings(refine=RefineSettings(enabled=False))
    inputs = []
    encode = segmenter.backbone.encode_image
    monkeypatch.setattr(segmenter.backbone, "encode_image", lambda pixels, **kw: inputs.append(pixels) or encode(
        pixels, **kw))
    monkeypatch.setattr(segmenter, "_head_probabilities", lambda z, pixels, context: (
        (inputs[-1].mean(1, keepdim=True) + 1.0) / 2.0).expand(-1, len(context), -1, -1))
    segmenter.set_image(image)
    assert inputs[0].shape == (1, 3, 192, 64) and (inputs[0][..., :24] == PAD).all()  # letterboxed
    brightness = segmenter.predict_terms(["cat"])["cat"]
    assert brightness.shape == (700, 24)
    assert brightness[:180].min() > 0.99 and brightness[220:280].max() < 0.01 and brightness[320:].min() > 0.99


def test_a_string_is_one_term(with_head):
    with_head.set_image(random_image(64, 64, seed=3))
    maps = with_head.predict_terms("sand")
    assert list(maps) == ["sand"]
    assert torch.equal(maps["sand"], with_head.predict_terms(["sand"])["sand"])


@pytest.mark.parametrize("images, found", [("photo.png", "str"), (random_image(8, 8), "numpy.ndarray")])
def test_predict_images_wants_a_list(images, found, with_head):
    with pytest.raises(LdznetError, match=re.escape(f"predict_images expects a list of images, got {found}; "
                                                   "for one image use set_image and predict")):
        with_head.predict_images(images, "cat")


def test_predict_images_of_two_sizes_names_them(with_head):
    with pytest.raises(LdznetError, match=re.escape("predict_images needs images of one size: image 2 is 8x4 "
                                                   "(width x height), image 1 is 8x8")):
        with_head.predict_images([random_image(8, 8), random_image(4, 8)], "cat")


def test_terms_must_be_strings(with_head):
    with_head.set_image(random_image(64, 64, seed=3))
    with pytest.raises(LdznetError, match=re.escape("terms must be one or more strings, got ['sand', None]")):
        with_head.predict_terms(["sand", None])


def test_predict_images_of_no_images_is_no_predictions(with_head):
    assert with_head.predict_images([], "cat") == []


def _png(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("hidden, options", [
    (np.zeros((4, 4, 3), np.uint8), {"transparency": (0, 0, 0)}),  # RGB with a transparent colour
    (np.zeros((4, 4), np.uint8), {"transparency": 0}),  # grey with a transparent value
    (np.zeros((4, 4), np.uint16), {"transparency": 0}),  # 16-bit grey with one
])
def test_a_pngs_transparent_colour_becomes_mid_grey(hidden, options):
    """tRNS on an RGB or grey PNG hides pixels as an alpha channel does: they must not leak their colour."""
    array = hidden.copy()
    array[:, 2:] = 200 * (257 if array.dtype == np.uint16 else 1)
    rgb = load_image(_png(array, **options))
    assert rgb[:, :2].tolist() == np.full((4, 2, 3), 128).tolist()
    assert rgb[:, 2:].tolist() == np.full((4, 2, 3), 200).tolist()


def test_a_premultiplied_grey_image_is_read():
    assert load_image(Image.new("La", (3, 2), (100, 255))).tolist() == np.full((2, 3, 3), 100).tolist()


def test_big_endian_arrays_read_as_native_ones():
    grey = random_image(6, 5, seed=2, channels=1)[..., 0].astype(np.uint16) * 257
    assert np.array_equal(load_image(grey.astype(">u2")), load_image(grey))
    unit = np.random.default_rng(5).random((6, 5)).astype(np.float32)
    assert np.array_equal(load_image(unit.astype(">f4")), load_image(unit))


@pytest.mark.parametrize("low, high", [(0.0, 255.0), (-1.0, 1.0), (-0.01, 0.5), (0.2, 1.01)])
def test_float_arrays_outside_0_1_are_refused_not_clipped(low, high):
    """0..255 data clipped would be white, [-1, 1] data half black: a wrong image, silently."""
    array = np.linspace(low, high, 12, dtype=np.float32).reshape(3, 4)
    with pytest.raises(ImageError) as error:
        load_image(array)
    assert str(error.value) == (f"image array of floats in [{float(np.float32(low)):g}, {float(np.float32(high)):g}]: "
                                "expected floats in [0, 1] (for 0..255 data divide by 255, for [-1, 1] data use "
                                "(x + 1) / 2)")


def test_a_resampling_overshoot_of_one_step_is_clipped():
    array = np.array([[-0.5 / 255, 0.5, 1 + 0.5 / 255]], np.float32)
    assert load_image(array)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("max_pixels", [float("nan"), 0, 10**12, "1000", None, 1.5])
def test_the_pixel_limit_is_checked(max_pixels):
    with pytest.raises(LdznetError, match=r"^max_pixels must be an integer in \[1, 1000000000\], got "):
        load_image(random_image(4, 4), max_pixels=max_pixels)


def test_paths_that_are_not_file_names(tmp_path):
    for path in ("", "a\0b.png"):
        with pytest.raises(ImageError) as error:
            load_image(path)
        assert str(error.value) == f"image path {path!r} is not a file name (empty, bytes or holding a NUL character)"
    afile = tmp_path / "file.png"
    afile.write_bytes(_encoded("PNG"))
    with pytest.raises(ImageError, match=r"^x.png: cannot read the file \(Not a directory\)$"):
        load_image(afile / "x.png")
    with pytest.raises(ImageError, match=r"^x+.png: cannot read the file \(File name too long\)$"):
        load_image(tmp_path / ("x" * 300 + ".png"))


@pytest.mark.parametrize("image_format", ["GIF", "TIFF", "PNG"])
def test_an_image_of_several_frames_says_which_is_masked(image_format, tmp_path):
    first, second = (Image.fromarray(random_image(12, 16, seed=s)) for s in (1, 2))
    path = tmp_path / f"anim.{image_format.lower()}"
    first.save(path, format=image_format, save_all=True, append_images=[second])
    with pytest.warns(UserWarning, match=r"^anim\.\w+ holds 2 frames; masking the first$"):
        frame = load_image(path)
    assert np.array_equal(frame, load_image(_png_of(Image.open(path))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(_png_of(first))  # one frame: no word


def _png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()
