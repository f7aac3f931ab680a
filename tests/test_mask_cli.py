"""`ldznet mask`: the three output files, the options, the default model rule, and a clear message
with exit status 2 (never a traceback) for every kind of bad input."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldznet_ext import loading
from ldznet_ext.cli import mask as mask_cli
from ldznet_ext.heads import save_head
from ldznet_ext.job import with_grow
from ldznet_ext.loading import load_segmenter
from ldznet_ext.masks.expression import parse
from ldznet_ext.masks.ops import MaskOptions
from ldznet_ext.modeling.build import build_head, head_config
from ldznet_ext.outputs import outline_width, render_overlay
from ldznet_ext.sd.unet import unet_config

from fixtures_models import random_image
from oracle import OracleSegmenter

pytestmark = pytest.mark.usefixtures("single_thread", "every_term_found")


@pytest.fixture
def image_path(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(random_image(64, 64, seed=20)).save(path)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (and whose pixel data is empty)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_mask_writes_mask_probability_and_overlay(ldznet, tmp_path, tiny_model_files):
    sd, head = tiny_model_files
    image = random_image(77, 101, seed=21)  # odd sizes: 101 wide, 77 high
    Image.fromarray(image).save(tmp_path / "odd.png")
    reference = load_segmenter(sd, head)
    reference.set_image(image)
    threshold = round(float(reference.predict("cat OR dog").probability.median()), 4)
    expected = reference.predict("cat OR dog", MaskOptions(threshold=threshold))

    out = tmp_path / "new" / "folder"  # created on demand
    code, stdout, err = ldznet("mask", tmp_path / "odd.png", "cat OR dog", "-o", out / "mask.png",
                               "--overlay", out / "overlay.png", "--probability", out / "prob.png",
                               "--threshold", threshold, "--model", sd, "--head", head)
    assert (code, err) == (0, "")
    assert "mask.png: 101x77" in stdout and "selected by cat OR dog" in stdout
    mask, prob, overlay = (Image.open(out / name) for name in ("mask.png", "prob.png", "overlay.png"))
    assert (mask.mode, overlay.mode) == ("L", "RGB")
    assert (out / "prob.png").read_bytes()[24:26] == bytes([16, 0])  # 16-bit grey (Pillow < 10 opens it as "I")
    assert mask.size == prob.size == overlay.size == (101, 77)
    assert set(np.unique(np.asarray(mask))) == {0, 255}
    assert np.array_equal(np.asarray(mask), expected.mask_image())
    assert np.array_equal(np.asarray(prob), expected.probability_image())
    assert np.array_equal(np.asarray(overlay), render_overlay(image, expected.mask_image()))
    assert sorted(p.name for p in out.iterdir()) == ["mask.png", "overlay.png", "prob.png"]  # no temporaries


def test_a_full_disk_leaves_no_output_and_is_a_system_error(ldznet, image_path, tmp_path, tiny_model_files,
                                                             monkeypatch):
    """The overlay (the last PNG) failed on a full disk after the mask and probability were written, and
    the command exited 2 (bad input); every output is written together now, and the status is 1."""
    sd, head = tiny_model_files
    real_save = Image.Image.save

    def full_disk_at_the_third(image, stream, *args, **kwargs):
        full_disk_at_the_third.calls += 1
        if full_disk_at_the_third.calls == 3:
            raise OSError(28, "No space left on device")
        return real_save(image, stream, *args, **kwargs)

    full_disk_at_the_third.calls = 0
    monkeypatch.setattr(Image.Image, "save", full_disk_at_the_third)
    out = tmp_path / "out"
    code, stdout, err = ldznet("mask", image_path, "cat", "-o", out / "m.png", "--probability", out / "p.png",
                               "--overlay", out / "o.png", "--model", sd, "--head", head)
    assert (code, stdout) == (1, "")
    assert err == f"ldznet mask: error: cannot write {out}/m.png, {out}/p.png, {out}/o.png: No space left on device\n"
    assert not out.exists()  # the folder it created, empty, is removed too


def test_the_summary_says_an_inverted_mask_is_inverted(ldznet, image_path, tmp_path, tiny_model_files):
    sd, head = tiny_model_files
    common = (image_path, "cat", "--model", sd, "--head", head, "--no-presence")
    plain = ldznet("mask", *common, "-o", tmp_path / "a.png")[1]
    inverted = ldznet("mask", *common, "-o", tmp_path / "b.png", "--invert")[1]
    share = float(plain.split(", ")[1].split("%")[0])
    assert inverted == f"{tmp_path}/b.png: 64x64, {100 - share:.1f}% selected by cat, inverted\n"


@pytest.mark.parametrize("option", ["--refine-strength", "--refine-radius"])
def test_refinement_settings_beside_no_refine_are_refused(ldznet, image_path, tmp_path, option):
    """They were dropped without a word."""
    assert ldznet("mask", image_path, "cat", "-o", tmp_path / "m.png", "--no-refine", option, "1") == (
        2, "", f"ldznet mask: error: {option} sets the edge refinement that --no-refine turns off; drop one of them\n")


def test_mask_options_reach_the_mask(ldznet, image_path, tmp_path, tiny_model_files):
    sd, head = tiny_model_files
    reference = load_segmenter(sd, head)
    reference.set_image(image_path)
    expression = with_grow(parse("cat{*1.2}"), -2)
    threshold = round(float(reference.predict(expression).probability.quantile(0.4)), 4)
    options = MaskOptions(threshold=threshold, invert=True, keep_largest=1, min_area=5, feather=1.5)
    expected = reference.predict(expression, options).mask_image()
    code, _, err = ldznet("mask", image_path, "cat{*1.2}", "-o", tmp_path / "m.png", "--threshold", threshold,
                          "--invert", "--keep-largest", 1, "--min-area", 5, "--feather", 1.5, "--grow", -2,
                          "--model", sd, "--head", head)
    assert (code, err) == (0, "")
    written = np.asarray(Image.open(tmp_path / "m.png"))
    assert np.array_equal(written, expected)
    assert (written == 0).any() and (written == 255).any()
    assert ((written > 0) & (written < 255)).any()  # feathered: soft edges


def test_zero_shot_and_dtypes(ldznet, image_path, tmp_path, tiny_model_files):
    sd, _ = tiny_model_files
    reference = load_segmenter(sd, None, resolution=64, draws=1)
    reference.set_image(image_path)
    expected = reference.predict("cat").probability_image()
    common = ("--model", sd, "--zero-shot", "--resolution", 64, "--draws", 1, "--device", "cpu")
    code, _, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "m.png", "--probability", tmp_path / "p.png",
                          *common)
    assert (code, err) == (0, "")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), expected)
    code, _, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "h.png", "--probability",
                          tmp_path / "hp.png", "--dtype", "fp16", *common)
    assert (code, err) == (0, "ldznet mask: warning: fp16 is not supported on the CPU; computing in fp32 "
                              "(use bf16 for lower memory)\n")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "hp.png")), expected)
    # bf16 runs on the CPU; on this random model its rounding swamps the text's tiny effect, so
    # only the run and the dtype are checked.
    code, _, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "b.png", "--dtype", "bf16", *common)
    assert (code, err) == (0, "")
    assert Image.open(tmp_path / "b.png").size == (64, 64)
    assert load_segmenter(sd, None, dtype="bf16", device="cpu").backbone.dtype == torch.bfloat16


def test_default_model_is_used_only_with_its_own_head(ldznet, image_path, tmp_path, tiny_model_files, monkeypatch):
    sd, head = tiny_model_files
    code, _, _ = ldznet("mask", image_path, "cat", "-o", tmp_path / "explicit.png", "--model", sd, "--head", head)
    assert code == 0
    monkeypatch.setattr(loading, "default_model_paths", lambda: (sd, head))
    code, _, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "default.png")
    assert (code, err) == (0, "")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "default.png")),
                          np.asarray(Image.open(tmp_path / "explicit.png")))
    code, _, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "x.png", "--model", sd)
    assert code == 2 and "needs a segmentation head: pass --head HEAD.safetensors" in err

    monkeypatch.setattr(loading, "default_model_paths", lambda: (sd, tmp_path / "absent-head.safetensors"))
    code, _, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "x.png")
    assert code == 2 and "micro model's head is not installed" in err and "--zero-shot" in err
    monkeypatch.setattr(loading, "default_model_paths",
                        lambda: (tmp_path / "absent.safetensors", tmp_path / "absent-head.safetensors"))
    code, _, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "x.png")
    assert code == 2 and "the embedded micro model is not installed" in err and "pass --model" in err
    assert not (tmp_path / "x.png").exists()


def test_overlay_blends_the_mask_and_outlines_it():
    image = np.full((20, 20, 3), (10, 200, 40), np.uint8)
    mask = np.zeros((20, 20), np.uint8)
    mask[5:14, 5:14] = 255  # a 9x9 square inside the image
    mask[15:, 0:3] = 255  # a block touching the left and bottom borders
    overlay = render_overlay(image, mask)
    ring = np.zeros((20, 20), bool)
    ring[5:14, 5:14] = True
    ring[6:13, 6:13] = False
    assert (overlay[ring] == (255, 0, 0)).all()  # 1 px outline inside the square
    assert (overlay[6:13, 6:13] == (133, 100, 20)).all()  # 50 % red: (10+255)/2, 200/2, 40/2, rounded
    assert (overlay[mask == 0] == (10, 200, 40)).all()  # unselected pixels untouched
    assert (overlay[16:, 0:2] == (133, 100, 20)).all()  # the image border is not an outline
    assert (overlay[15:, 2] == (255, 0, 0)).all() and (overlay[15, 0:3] == (255, 0, 0)).all()


def test_overlay_outlines_a_soft_mask_from_half_strength():
    """The outline follows mask >= 128: a region at exactly 128 is outlined, one at 127 only blended."""
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), np.uint8)
    mask[2:9, 2:9] = 128
    mask[11:18, 11:18] = 127
    overlay = render_overlay(image, mask)
    assert (overlay[2, 2:9] == (255, 0, 0)).all() and (overlay[5, 5] == (64, 0, 0)).all()  # 255 * 0.5 * 128/255
    assert (overlay[11:18, 11:18] == (64, 0, 0)).all()  # 255 * 0.5 * 127/255 = 63.5, rounded


@pytest.mark.parametrize("side, width", [(1024, 1), (1535, 1), (1536, 2), (2048, 2), (3072, 3), (4096, 4)])
def test_outline_width_grows_by_one_pixel_per_1024_rounded(side, width):
    assert outline_width(side, 10) == width and outline_width(10, side) == width


def _sd_like(tmp_path: Path, name: str, in_channels: int, context: int) -> Path:
    """The first keys of an SD-family UNet, enough for the family check."""
    path = tmp_path / name
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, in_channels, 3, 3),
               "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight":
                   torch.zeros(64, context)}, str(path))
    return path


def _truncated(tmp_path: Path, source: Path, name: str) -> Path:
    data = source.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    return tmp_path / name


def _mismatched_head(tmp_path: Path) -> Path:
    config = head_config("ldznet", "tiny", latent_size=8, unet=unet_config("tiny", out_channels=1, model_channels=64))
    save_head(build_head(config), config, tmp_path / "wide-head.safetensors")
    return tmp_path / "wide-head.safetensors"


# Each case: how to build the arguments (tmp_path, image, sd, head) and what the message must say.
BAD_INPUTS = {
    "missing image": (lambda t, i, s, h: [t / "absent.png", "cat", "--model", s, "--head", h],
                      "absent.png: file not found"),
    "truncated png": (lambda t, i, s, h: [_truncated(t, i, "cut.png"), "cat", "--model", s, "--head", h],
                      "cut.png: cannot decode the image"),
    "text file": (lambda t, i, s, h: [_write(t / "notes.png", b"just some notes\n"), "cat", "--model", s, "--head", h],
                  "notes.png: not an image"),
    "over the limit": (lambda t, i, s, h: [_write(t / "big.png", png_header(12000, 10000)), "cat"],
                       "big.png: 12000x10000 = 120,000,000 pixels is over the limit of 100,000,000"),
    "bomb header": (lambda t, i, s, h: [_write(t / "bomb.png", png_header(100000, 100000)), "cat"],
                    "bomb.png: too large, refused by Pillow"),
    "--max-pixels": (lambda t, i, s, h: [i, "cat", "--max-pixels", 1000],
                     "64x64 = 4,096 pixels is over the limit of 1,000"),
    "empty expression": (lambda t, i, s, h: [i, ""], "expected a mask expression such as 'cat OR dog', got empty text"),
    "blank expression": (lambda t, i, s, h: [i, "   "], "got empty text"),
    "dangling operator": (lambda t, i, s, h: [i, "cat OR"],
                          "expected a term or '(' after 'OR', found the end of the text at position 6"),
    "unclosed parenthesis": (lambda t, i, s, h: [i, "(cat OR dog"], "'(' is never closed: expected ')' at position 0"),
    "unmatched parenthesis": (lambda t, i, s, h: [i, "cat)"], "unmatched ')': no '(' is open at position 3"),
    # SD 2.x serves zero-shot masks (test_sd2_model.py), not a head
    "SD 2 model": (lambda t, i, s, h: [i, "cat", "--model", _sd_like(t, "sd2.safetensors", 4, 1024), "--head", h],
                   "sd2.safetensors: sd2: an LD-ZNet head reads SD 1.x UNet features, which an SD 2.x model does "
                   "not have; make masks with this model zero-shot (--zero-shot), or keep it and run the head on an "
                   "SD 1.x checkpoint (--mask-model SD1.safetensors)"),
    "inpainting model": (lambda t, i, s, h: [i, "cat", "--model", _sd_like(t, "inp.safetensors", 9, 768), "--zero-shot"],
                         "inpainting UNets (9 input channels) are not supported"),
    "head as model": (lambda t, i, s, h: [i, "cat", "--model", h, "--zero-shot"],
                      "this is a segmentation head, not an SD model"),
    "model as head": (lambda t, i, s, h: [i, "cat", "--model", s, "--head", s], "not an ldznet head"),
    "mismatched head": (lambda t, i, s, h: [i, "cat", "--model", s, "--head", _mismatched_head(t)],
                        "wide-head.safetensors: this ldznet head was made for a different SD model "
                        "(head vs model: model_channels 64 vs 32)"),
    "truncated model": (lambda t, i, s, h: [i, "cat", "--model", _truncated(t, s, "cut.safetensors"), "--zero-shot"],
                        "cut.safetensors: tensor "),
    "truncated head": (lambda t, i, s, h: [i, "cat", "--model", s, "--head", _truncated(t, h, "cut-head.safetensors")],
                       "cut-head.safetensors: cannot read the file"),
    "missing model": (lambda t, i, s, h: [i, "cat", "--model", t / "absent.safetensors", "--zero-shot"],
                      "model file not found"),
    "not a png output": (lambda t, i, s, h: [i, "cat", "--overlay", t / "o.jpg"], "o.jpg: outputs are PNG files"),
    "output over input": (lambda t, i, s, h: [i, "cat", "--probability", i], "the same file as the input image"),
    "unwritable output": (lambda t, i, s, h: [_write(t / "out", b"") and i, "cat", "--model", s, "--head", h],
                          "/out is a file, not a folder"),
    "unknown device": (lambda t, i, s, h: [i, "cat", "--model", s, "--zero-shot", "--device", "tpu"],
                       "unknown device 'tpu': expected auto, cpu, cuda, cuda:N or mps"),
    "threshold out of range": (lambda t, i, s, h: [i, "cat", "--threshold", 1],
                               "argument --threshold: expected a number in [0, 1), got 1"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_and_status_2(case, ldznet, image_path, tmp_path, tiny_model_files):
    build, message = BAD_INPUTS[case]
    output = tmp_path / "out" / "mask.png"
    code, stdout, err = ldznet("mask", *build(tmp_path, image_path, *tiny_model_files), "-o", output)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and stdout == ""
    assert not output.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(ldznet, image_path, tmp_path, tiny_model_files):
    sd, head = tiny_model_files
    code, _, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "m.png", "--model", sd, "--head", head,
                          "--device", "cuda")
    assert code == 2 and "device 'cuda' was asked for but CUDA is not available; use the CPU (--device cpu, device='cpu')" in err


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_no_output_is_a_link_to_the_input_image(link, ldznet, image_path, tmp_path, tiny_model_files, monkeypatch):
    monkeypatch.setattr(mask_cli, "segmenter_from_args", lambda *args: pytest.fail("the models loaded"))
    alias = tmp_path / "alias.png"
    alias.symlink_to(image_path) if link == "symlink" else alias.hardlink_to(image_path)
    before = image_path.read_bytes()
    code, stdout, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "mask.png", "--probability", alias,
                               "--model", tiny_model_files[0], "--head", tiny_model_files[1])
    assert (code, stdout) == (2, "")
    assert err == f"ldznet mask: error: {alias}: the same file as the input image; give each output its own name\n"
    assert image_path.read_bytes() == before and not (tmp_path / "mask.png").exists()


@pytest.mark.parametrize("which", ["model", "head"])
def test_no_output_is_a_link_to_a_model_file(which, ldznet, image_path, tmp_path, tiny_model_files, monkeypatch):
    """README says so of every command; mask compared its outputs with the image alone."""
    monkeypatch.setattr(mask_cli, "segmenter_from_args", lambda *args: pytest.fail("the models loaded"))
    target = tiny_model_files[0] if which == "model" else tiny_model_files[1]
    alias = tmp_path / "alias.png"
    alias.hardlink_to(target)
    code, _, err = ldznet("mask", image_path, "cat", "-o", alias, "--model", tiny_model_files[0],
                          "--head", tiny_model_files[1])
    assert (code, err) == (2, f"ldznet mask: error: {alias}: the same file as the {which}; give each output its own "
                              "name\n")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_an_output_where_nothing_can_be_written_stops_before_the_models_load(ldznet, image_path, tmp_path,
                                                                             tiny_model_files, monkeypatch):
    monkeypatch.setattr(mask_cli, "segmenter_from_args", lambda *args: pytest.fail("the models loaded"))
    code, stdout, err = ldznet("mask", image_path, "cat", "-o", tmp_path / "mask.png", "--overlay", "/proc/o.png",
                               "--model", tiny_model_files[0], "--head", tiny_model_files[1])
    assert (code, stdout) == (2, "") and err.startswith("ldznet mask: error: cannot write /proc/o.png: ")


class _TwoStars(OracleSegmenter):
    """Two star objects on the 64 x 64 image: an oracle, set_image reads nothing."""

    def __init__(self):
        star = torch.zeros(64, 64)
        star[5:15, 5:15] = 0.9
        star[30:40, 40:50] = 0.9
        super().__init__({"star": star})

    def set_image(self, image, max_pixels: int = 0) -> None:
        pass


@pytest.mark.parametrize("clash, message", [
    ("overlay", "{second}: --overlay names the file of instance mask 2 of -o; give it another name"),
    ("probability", "{second}: --probability names the file of instance mask 2 of -o; give it another name"),
    ("image", "{second}: the same file as the input image; give each output its own name"),  # the input is m-2.png
])
def test_instance_masks_never_overwrite_another_file_of_the_run(clash, message, ldznet, tmp_path, monkeypatch):
    """Instances are counted only after the prediction, so their names are checked then, against the
    input and every other output, before any file is written."""
    monkeypatch.setattr(mask_cli, "segmenter_from_args", lambda *args: (_TwoStars(), {}))
    second = tmp_path / "m-2.png"
    image = second if clash == "image" else tmp_path / "photo.png"
    Image.fromarray(random_image(64, 64, seed=20)).save(image)
    before = image.read_bytes()
    extra = [] if clash == "image" else [f"--{clash}", second]
    code, stdout, err = ldznet("mask", image, "star", "-o", tmp_path / "m.png", "--instances", *extra)
    assert (code, stdout) == (2, "")
    assert err == f"ldznet mask: error: {message.format(second=second)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [image.name]  # nothing written
    assert image.read_bytes() == before


def test_the_instance_report_is_never_the_input(ldznet, tmp_path, monkeypatch):
    monkeypatch.setattr(mask_cli, "segmenter_from_args", lambda *args: pytest.fail("the models loaded"))
    image = tmp_path / "m-instances.json"  # a PNG, whatever its name
    Image.fromarray(random_image(64, 64, seed=20)).save(image, format="PNG")
    before = image.read_bytes()
    code, _, err = ldznet("mask", image, "star", "-o", tmp_path / "m.png", "--instances")
    assert code == 2 and err == (f"ldznet mask: error: {image}: the same file as the input image; give each "
                                 "output its own name\n")
    assert image.read_bytes() == before


def test_instance_masks_are_written_with_their_report(ldznet, tmp_path, monkeypatch):
    monkeypatch.setattr(mask_cli, "segmenter_from_args", lambda *args: (_TwoStars(), {}))
    Image.fromarray(random_image(64, 64, seed=20)).save(tmp_path / "photo.png")
    code, stdout, _ = ldznet("mask", tmp_path / "photo.png", "star", "-o", tmp_path / "m.png", "--instances",
                             "--overlay", tmp_path / "o.png")
    assert code == 0 and stdout.rstrip().endswith(", 2 instances")
    report = json.loads((tmp_path / "m-instances.json").read_text())
    assert [(e["order"], e["file"], e["box"]) for e in report["instances"]] == [
        (1, "m-1.png", [5, 5, 15, 15]), (2, "m-2.png", [40, 30, 50, 40])]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m-1.png", "m-2.png", "m-instances.json", "m.png", "o.png", "photo.png"]
