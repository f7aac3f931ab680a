"""`--mask-model SD1.safetensors` (and load_segmenter's ``mask_model``): head masks beside a --model that
cannot serve a head (SDXL family, SD 2.x) come from the SD 1.x mask model, bit for bit as with that file
as --model; refusals before any work name the family and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_models import image_file, random_image  # noqa: F401  (pytest fixture)
from ldznet_ext.checkpoint_io import write_safetensors
from ldznet_ext.loading import load_segmenter
from ldznet_ext.sd import checkpoint
from test_sdxl_model import METADATA, tiny_sdxl_state

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    write_safetensors(path, tiny_sdxl_state(), METADATA)
    return path


def test_head_mask_beside_an_sdxl_model_is_the_sd1_files_mask(ldznet, sdxl_file, tiny_model_files, image_file,
                                                              tmp_path) -> None:
    sd1, head = tiny_model_files
    common = ("mask", image_file, "cat OR sky", "--head", head, "--device", "cpu", "--no-presence")
    code, out, err = ldznet(*common, "-o", tmp_path / "a.png", "--probability", tmp_path / "pa.png",
                            "--model", sdxl_file, "--mask-model", sd1)
    assert (code, err) == (0, "")
    assert ldznet(*common, "-o", tmp_path / "b.png", "--probability", tmp_path / "pb.png", "--model", sd1)[0] == 0
    for a, b in (("a.png", "b.png"), ("pa.png", "pb.png")):
        assert np.array_equal(np.asarray(Image.open(tmp_path / a)), np.asarray(Image.open(tmp_path / b)))
    assert np.asarray(Image.open(tmp_path / "pa.png")).std() > 0


def test_load_segmenter_runs_the_head_on_the_mask_model(sdxl_file, tiny_model_files) -> None:
    sd1, head = tiny_model_files
    segmenter = load_segmenter(sdxl_file, head, mask_model=sd1, device="cpu")
    reference = load_segmenter(sd1, head, device="cpu")
    image = random_image(64, 64, seed=5)
    got = segmenter.predict_images([image], "cat")[0].terms["cat"]
    assert torch.equal(got, reference.predict_images([image], "cat")[0].terms["cat"])


def test_a_head_on_an_sdxl_model_is_refused_before_its_tensors_are_read(ldznet, sdxl_file, tiny_model_files,
                                                                        image_file, tmp_path, monkeypatch) -> None:
    def never(path):
        raise AssertionError(f"{path} was read")
    monkeypatch.setattr(checkpoint, "read_state_dict", never)
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file,
                          "--head", tiny_model_files[1])
    assert code == 2
    assert err.startswith("ldznet mask: error: tiny-sdxl.safetensors: sdxl: an LD-ZNet head reads SD 1.x UNet "
                          "features, which an SDXL-family model does not have; make masks with this model zero-shot "
                          "(--zero-shot), or keep it and run the head on an SD 1.x checkpoint "
                          "(--mask-model SD1.safetensors). Supported: ")


@pytest.mark.parametrize(("extra", "message"), [
    (("--zero-shot",), "sd.safetensors: a mask model serves a head, and zero-shot masks come from the model itself; "
                       "pass --head HEAD.safetensors with --mask-model, or drop --mask-model"),
    ((), "sd.safetensors: a mask model serves a head, and zero-shot masks come from the model itself; "
         "pass --head HEAD.safetensors with --mask-model, or drop --mask-model"),
])
def test_a_mask_model_without_a_head_is_refused(ldznet, sdxl_file, tiny_model_files, image_file, tmp_path,
                                                extra, message) -> None:
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file,
                          "--mask-model", tiny_model_files[0], *extra)
    assert (code, err) == (2, f"ldznet mask: error: {message}\n")


def test_a_mask_model_that_is_not_sd1_is_refused_by_family(ldznet, sdxl_file, tiny_model_files, image_file,
                                                           tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "read_state_dict", lambda path: pytest.fail(f"{path} was read"))
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file,
                          "--mask-model", sdxl_file, "--head", tiny_model_files[1])
    assert code == 2
    assert err.startswith("ldznet mask: error: tiny-sdxl.safetensors: the mask model must be an SD 1.x checkpoint, "
                          "since the head reads SD 1.x UNet features; this file is SDXL (")


def test_a_missing_mask_model_is_named(ldznet, sdxl_file, tiny_model_files, image_file, tmp_path) -> None:
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file,
                          "--mask-model", tmp_path / "nope.safetensors", "--head", tiny_model_files[1])
    assert code == 2 and "nope.safetensors" in err and "mask model file" in err
