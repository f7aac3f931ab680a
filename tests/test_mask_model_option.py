"""`--mask-model SD1.safetensors` or an SD 1.x diffusers folder (and load_segmenter's ``mask_model``): head masks
beside a --model that cannot serve a head (SDXL family, SD 2.x) come from the SD 1.x mask model, bit for bit
as with that file as --model, loaded only as far as the head reads it; refusals before any work name the
family and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_models import TINY_VAE8, image_file, random_image  # noqa: F401  (pytest fixture)
from ldznet_ext.checkpoint_io import read_metadata, read_state_dict, write_safetensors
from ldznet_ext.errors import CheckpointError
from ldznet_ext.loading import load_segmenter
from ldznet_ext.sd import checkpoint, diffusers_folder
from ldznet_ext.sd.parts import SkippedPart
from ldznet_ext.sd.unet import unet_config
from test_sdxl_model import METADATA, tiny_sdxl_state

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    write_safetensors(path, tiny_sdxl_state(), METADATA)
    return path


@pytest.mark.parametrize("mask_model", ["file", "sd1_folder"])
def test_head_mask_beside_an_sdxl_model_is_the_sd1_models_mask(ldznet, sdxl_file, tiny_model_files, image_file,
                                                               tmp_path, request, mask_model) -> None:
    """--mask-model, an SD 1.x file or diffusers folder, gives the mask --model of that SD 1.x file gives."""
    sd1, head = tiny_model_files
    served_by = sd1 if mask_model == "file" else request.getfixturevalue(mask_model)
    common = ("mask", image_file, "cat OR sky", "--head", head, "--device", "cpu", "--no-presence")
    code, out, err = ldznet(*common, "-o", tmp_path / "a.png", "--probability", tmp_path / "pa.png",
                            "--model", sdxl_file, "--mask-model", served_by)
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
    assert err.endswith("(SDXL checkpoints serve zero-shot masks only)\n")  # not "are not supported": they are


def test_a_mask_model_without_its_vae_is_sent_to_the_way_that_works(ldznet, sdxl_file, tiny_model_files, image_file,
                                                                    tmp_path) -> None:
    """The family's own advice (--vae) is refused beside --mask-model; the same head mask comes from the
    file as --model with --vae."""
    state = read_state_dict(tiny_model_files[0])
    no_vae = tmp_path / "no-vae.safetensors"
    write_safetensors(no_vae, {k: v for k, v in state.items() if not k.startswith("first_stage_model.")},
                      read_metadata(tiny_model_files[0]))
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file,
                          "--mask-model", no_vae, "--head", tiny_model_files[1])
    assert (code, err) == (2, "ldznet mask: error: no-vae.safetensors: an SD 1.x file without its VAE, which a mask "
                              "model must carry (a VAE file replaces the VAE of --model only); run the head on it as "
                              "the model instead: --model no-vae.safetensors --vae VAE.safetensors --head HEAD\n")


def test_the_model_beside_a_mask_model_must_be_a_model(ldznet, sdxl_file, tiny_model_files, image_file,
                                                      tmp_path) -> None:
    """It is never loaded, but a missing path or a LoRA is a mistake the CLI and the library both name."""
    lora = tmp_path / "style-lora.safetensors"
    write_safetensors(lora, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, {})
    with pytest.raises(CheckpointError, match=r"^model file not found: .*absent.safetensors$"):
        load_segmenter(tmp_path / "absent.safetensors", tiny_model_files[1], mask_model=tiny_model_files[0])
    with pytest.raises(CheckpointError, match=r"^style-lora.safetensors: this is a LoRA \(weights added to an SD "
                                              r"model\), not an SD model; pass the model itself"):
        load_segmenter(lora, tiny_model_files[1], mask_model=tiny_model_files[0])
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", lora,
                          "--mask-model", tiny_model_files[0], "--head", tiny_model_files[1])
    assert code == 2 and err.startswith("ldznet mask: error: style-lora.safetensors: this is a LoRA")


def test_a_missing_mask_model_is_named(ldznet, sdxl_file, tiny_model_files, image_file, tmp_path) -> None:
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file,
                          "--mask-model", tmp_path / "nope.safetensors", "--head", tiny_model_files[1])
    assert code == 2 and "nope.safetensors" in err and "mask model file" in err


@pytest.fixture(scope="module")
def sd1_folder(tiny_model_files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x file as a diffusers folder (diffusers' own conversion)."""
    write_folder = pytest.importorskip("test_diffusers_folder").write_folder
    return write_folder(tmp_path_factory.mktemp("sd1-folder") / "tiny-sd1", read_state_dict(tiny_model_files[0]),
                        unet_config("tiny"), TINY_VAE8, text_heads=2)


def test_a_mask_model_is_loaded_only_as_far_as_the_head_reads(sdxl_file, sd1_folder, tiny_model_files) -> None:
    sd1, head = tiny_model_files
    for mask_model in (sd1, sd1_folder):
        backbone = load_segmenter(sdxl_file, head, mask_model=mask_model, device="cpu").backbone
        assert isinstance(backbone.unet.output_blocks[6], SkippedPart) and isinstance(backbone.vae.decoder, SkippedPart)
    assert not isinstance(load_segmenter(sd1, head, device="cpu").backbone.vae.decoder, SkippedPart)


def test_a_mask_model_folder_that_is_not_sd1_is_refused_by_family(ldznet, sdxl_file, sd1_folder, tiny_model_files,
                                                                  image_file, tmp_path, monkeypatch) -> None:
    import json
    import shutil
    sdxl_folder = shutil.copytree(sd1_folder, tmp_path / "tiny-sdxl")
    (sdxl_folder / "text_encoder_2").mkdir()
    sd2_folder = shutil.copytree(sd1_folder, tmp_path / "tiny-sd2")
    (sd2_folder / "text_encoder" / "config.json").write_text(json.dumps({"num_attention_heads": 16,
                                                                         "hidden_size": 1024}))
    monkeypatch.setattr(diffusers_folder, "read_state_dict", lambda path: pytest.fail(f"{path} was read"))
    for folder, family in ((sdxl_folder, "SDXL"), (sd2_folder, "SD 2.x")):
        code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file,
                              "--mask-model", folder, "--head", tiny_model_files[1])
        assert (code, err) == (2, f"ldznet mask: error: {folder.name}: the mask model must be an SD 1.x checkpoint, "
                                  f"since the head reads SD 1.x UNet features; this folder is {family}\n")
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sdxl_file,
                          "--mask-model", tmp_path, "--head", tiny_model_files[1])
    assert (code, err) == (2, f"ldznet mask: error: mask model file {tmp_path} is a folder; expected an SD 1.x "
                              "checkpoint, a single-file .safetensors or .ckpt, or an SD 1.x diffusers folder "
                              "(with model_index.json)\n")
