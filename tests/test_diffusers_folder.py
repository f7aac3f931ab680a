"""Diffusers-format folders (SD 1.x, SD 2.x, SDXL), built here from our tiny single files with diffusers' own
ldm -> diffusers conversion: our reader gives back the single file's tensors exactly, and masks from a
folder equal, bit for bit, those of its single file; folders we cannot read are refused by name."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from fixtures_models import TINY_VAE8, image_file, random_image  # noqa: F401  (pytest fixture)
from ldznet_ext.checkpoint_io import read_metadata, read_state_dict, write_safetensors
from ldznet_ext.errors import CheckpointError
from ldznet_ext.sd.diffusers_folder import read_diffusers_folder
from ldznet_ext.sd.unet import UNetConfig, unet_config
from ldznet_ext.sd.vae import VAEConfig
from test_sd2_model import TINY_SD2_UNET, tiny_sd2_state, write_sd2
from test_sdxl_model import METADATA as SDXL_METADATA, tiny_sdxl_state
from test_sdxl_unet import TIME_DIM, diffusers_config

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

pytestmark = pytest.mark.usefixtures("single_thread")

BIGG_PREFIX = "conditioner.embedders.1.model."
SD2_PREFIX = "cond_stage_model.model."
# tensors the diffusers layout has no place for: the schedule (the scheduler's config) and CLIP's temperature
NOT_IN_DIFFUSERS = ("alphas_cumprod", BIGG_PREFIX + "logit_scale")


def _save(folder: Path, part: str, state: dict[str, torch.Tensor], config: dict, name: str) -> None:
    (folder / part).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / part / name))
    (folder / part / "config.json").write_text(json.dumps(config))


def write_folder(folder: Path, ldm: dict[str, torch.Tensor], unet: UNetConfig, vae: VAEConfig, text_heads: int,
                 sdxl: bool = False, scale: float = 0.18215, sd2_layers: int = 0) -> Path:
    """A diffusers folder of the single file ``ldm``, each part converted by diffusers' own functions;
    ``sd2_layers``: the layers of the file's SD 2.x text tower, of which the folder gets all but the last (as
    diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE leaves out ViT-H's 24th)."""
    blocks = len(vae.ch_mult)
    (folder / "model_index.json").parent.mkdir(parents=True, exist_ok=True)
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    unet_fields = diffusers_config(unet, TIME_DIM)
    _save(folder, "unet", single_file.convert_ldm_unet_checkpoint(ldm, unet_fields), unet_fields,
          "diffusion_pytorch_model.safetensors")
    vae_fields = {"down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
                  "scaling_factor": scale}
    _save(folder, "vae", single_file.convert_ldm_vae_checkpoint(ldm, vae_fields), vae_fields,
          "diffusion_pytorch_model.safetensors")
    if sd2_layers:
        last = f"{SD2_PREFIX}transformer.resblocks.{sd2_layers - 1}."
        text = single_file.convert_open_clip_checkpoint(None, {k: v for k, v in ldm.items() if not k.startswith(last)})
        text_fields = {"num_hidden_layers": sd2_layers - 1, "hidden_act": "gelu", "intermediate_size": 256,
                       "layer_norm_eps": 1e-5, "vocab_size": 49408, "max_position_embeddings": 77}
    else:
        text, text_fields = single_file.convert_ldm_clip_checkpoint(ldm), {}
    _save(folder, "text_encoder", text, {"num_attention_heads": text_heads, "hidden_size": 64, **text_fields},
          "model.safetensors")
    if sdxl:
        bigg = single_file.convert_open_clip_checkpoint(None, ldm, prefix=BIGG_PREFIX)
        _save(folder, "text_encoder_2", bigg, {"num_attention_heads": 1}, "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def sd1_pair(tiny_model_files, tmp_path_factory) -> tuple[Path, Path]:
    sd_file = tiny_model_files[0]
    folder = write_folder(tmp_path_factory.mktemp("sd1") / "tiny-sd1", read_state_dict(sd_file), unet_config("tiny"),
                          TINY_VAE8, text_heads=2)
    return sd_file, folder


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sdxl")
    state = tiny_sdxl_state()
    write_safetensors(base / "tiny-sdxl.safetensors", state, SDXL_METADATA)
    folder = write_folder(base / "tiny-sdxl", state, unet_config("tiny-sdxl"), VAEConfig(ch=32, ch_mult=(1, 2),
                          num_res_blocks=1), text_heads=2, sdxl=True, scale=0.13025)
    return base / "tiny-sdxl.safetensors", folder


@pytest.fixture(scope="module")
def sd2_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(an SD 2.x single file with SD's noise schedule, its diffusers folder)."""
    base = tmp_path_factory.mktemp("sd2")
    state = {k: v for k, v in tiny_sd2_state().items() if k != "alphas_cumprod"}
    write_sd2(base / "tiny-sd2.safetensors", state)
    folder = write_folder(base / "tiny-sd2", state, TINY_SD2_UNET, TINY_VAE8, text_heads=1, sd2_layers=3)
    return base / "tiny-sd2.safetensors", folder


def _same_tensors(folder: Path, single: Path, not_in_diffusers: tuple[str, ...] = NOT_IN_DIFFUSERS) -> None:
    got = read_diffusers_folder(folder).state
    expected = {k: v for k, v in read_state_dict(single).items() if not k.startswith(not_in_diffusers)}
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_sd1_folder_converts_back_exactly(sd1_pair) -> None:
    _same_tensors(sd1_pair[1], sd1_pair[0])
    assert read_diffusers_folder(sd1_pair[1]).metadata == {"unet": unet_config("tiny").to_dict(),
                                                           "text": {"num_attention_heads": 2}}


def test_sdxl_folder_converts_back_exactly(sdxl_pair) -> None:
    _same_tensors(sdxl_pair[1], sdxl_pair[0])
    read = read_diffusers_folder(sdxl_pair[1])
    assert read.metadata["unet"] == unet_config("tiny-sdxl").to_dict() and read.scale_factor == 0.13025


def test_sd2_folder_converts_back_exactly_but_for_the_towers_unread_parts(sd2_pair) -> None:
    """The folder lacks the text tower's last layer and projection (and CLIP's temperature), which SD 2.x's
    context does not read; it says the tower ldm builds is one layer deeper than its text encoder."""
    unread = ("transformer.resblocks.2.", "text_projection", "logit_scale")
    _same_tensors(sd2_pair[1], sd2_pair[0], tuple(SD2_PREFIX + k for k in unread))
    metadata = read_diffusers_folder(sd2_pair[1]).metadata
    assert metadata["text"] == {"num_hidden_layers": 3}
    unet, levels = UNetConfig(**metadata["unet"]), range(len(TINY_SD2_UNET.channel_mult))
    # the same heads and depths (the folder's config spells them otherwise: num_heads unused, depths given)
    width = TINY_SD2_UNET.model_channels
    assert [unet.heads_at(width * m) for m in unet.channel_mult] == [TINY_SD2_UNET.heads_at(width * m)
                                                                          for m in TINY_SD2_UNET.channel_mult]
    assert [unet.depth_at(level) for level in levels] == [TINY_SD2_UNET.depth_at(level) for level in levels]
    assert dataclasses.replace(unet, num_heads=0, level_depths=None) == dataclasses.replace(
        TINY_SD2_UNET, num_heads=0, level_depths=None)


def _masks(ldznet, image, model, tmp_path, name, *mode) -> list[np.ndarray]:
    code, _, err = ldznet("mask", image, "cat OR sky", "-o", tmp_path / f"{name}.png", "--probability",
                          tmp_path / f"{name}-p.png", "--model", model, "--device", "cpu", "--no-presence", *mode)
    assert (code, err) == (0, "")
    return [np.asarray(Image.open(tmp_path / f"{name}{suffix}.png")) for suffix in ("", "-p")]


@pytest.mark.parametrize("mode", ["head", "zero-shot"])
def test_sd1_folder_masks_equal_the_single_files(ldznet, sd1_pair, tiny_model_files, image_file, tmp_path,
                                                 mode) -> None:
    args = ("--head", tiny_model_files[1]) if mode == "head" else ("--zero-shot", "--resolution", 64, "--draws", 1)
    from_folder = _masks(ldznet, image_file, sd1_pair[1], tmp_path, "folder", *args)
    from_file = _masks(ldznet, image_file, sd1_pair[0], tmp_path, "file", *args)
    assert all(np.array_equal(a, b) for a, b in zip(from_folder, from_file)) and from_file[1].std() > 0


def test_a_hub_cache_snapshot_of_symlinks_reads_as_its_folder(ldznet, sd1_pair, tiny_model_files, image_file,
                                                              tmp_path) -> None:
    """The Hugging Face cache's layout: snapshots/REV/<part>/<file> are links to blobs/<hash> (no suffix)."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    for path in sorted(p for p in sd1_pair[1].rglob("*") if p.is_file()):
        blob = blobs / f"blob{len(list(blobs.iterdir()))}"
        blob.write_bytes(path.read_bytes())
        link = snapshot / path.relative_to(sd1_pair[1])
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    args = ("--head", tiny_model_files[1])
    from_snapshot = _masks(ldznet, image_file, snapshot, tmp_path, "snapshot", *args)
    from_folder = _masks(ldznet, image_file, sd1_pair[1], tmp_path, "folder", *args)
    assert all(np.array_equal(a, b) for a, b in zip(from_snapshot, from_folder)) and from_folder[1].std() > 0


def test_sdxl_folder_zero_shot_masks_equal_the_single_files(ldznet, sdxl_pair, image_file, tmp_path) -> None:
    args = ("--zero-shot", "--resolution", 64, "--draws", 1)
    from_folder = _masks(ldznet, image_file, sdxl_pair[1], tmp_path, "folder", *args)
    from_file = _masks(ldznet, image_file, sdxl_pair[0], tmp_path, "file", *args)
    assert all(np.array_equal(a, b) for a, b in zip(from_folder, from_file)) and from_file[1].std() > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sd2_folder_zero_shot_masks_equal_the_single_files(ldznet, sd2_pair, image_file, tmp_path,
                                                          prediction) -> None:
    folder = _with_scheduler(sd2_pair[1], tmp_path, "folder", {"prediction_type": prediction})
    single = sd2_pair[0]
    if prediction == "v_prediction":
        single = tmp_path / "v.safetensors"
        write_safetensors(single, {**read_state_dict(sd2_pair[0]), "v_pred": torch.zeros(())},
                          read_metadata(sd2_pair[0]))
    args = ("--zero-shot", "--resolution", 64, "--draws", 1)
    from_folder = _masks(ldznet, image_file, folder, tmp_path, "folder", *args)
    from_file = _masks(ldznet, image_file, single, tmp_path, "file", *args)
    assert all(np.array_equal(a, b) for a, b in zip(from_folder, from_file)) and from_file[1].std() > 0


def test_an_sd2_text_encoder_of_missing_or_odd_weights_is_refused(ldznet, sd2_pair, image_file, tmp_path) -> None:
    """These failed inside the conversion, with a traceback."""
    import shutil
    for name, change, problem in [
        ("no-k", lambda state: state.pop("text_model.encoder.layers.0.self_attn.k_proj.weight"),
         "text_encoder: not a CLIP text model's weights ('text_model.encoder.layers.0.self_attn.k_proj.weight' is "
         "missing)"),
        ("flat", lambda state: state.update({"text_model.embeddings.token_embedding.weight": torch.zeros(64)}),
         "text_encoder/config.json: not the weights of a CLIP text model (not enough values to unpack (expected 2, "
         "got 1))"),
    ]:
        folder = shutil.copytree(sd2_pair[1], tmp_path / name)
        weights = folder / "text_encoder" / "model.safetensors"
        state = read_state_dict(weights)
        change(state)
        save_file(state, str(weights))
        code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", folder, "--zero-shot")
        assert (code, err) == (2, f"ldznet mask: error: {name}: {problem}\n")


@pytest.mark.parametrize(("config", "problem"), [
    ({"in_channels": 7}, "takes 7 input channels, not 4 (an inpainting, depth, upscaler or edit model); use the base "
                         "model it was made from"),
    ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": 2048},
     "is conditioned on more than text (class or image embeddings: unCLIP and the like); LD-ZNet reads SD 1.x, SD "
     "2.x and SDXL-family UNets"),
])
def test_a_folder_of_a_unet_conditioned_on_more_than_text_is_refused_before_its_weights_are_read(
        ldznet, sd2_pair, image_file, tmp_path, monkeypatch, config, problem) -> None:
    """SD 2.x's x4 upscaler and unCLIP: unCLIP was refused as weights that do not fit, after all were read."""
    import shutil

    from ldznet_ext.sd import diffusers_folder
    folder = shutil.copytree(sd2_pair[1], tmp_path / "variant")
    config_file = folder / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config}))
    monkeypatch.setattr(diffusers_folder, "read_state_dict", lambda path: pytest.fail(f"{path} was read"))
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", folder, "--zero-shot")
    assert (code, err) == (2, f"ldznet mask: error: variant: unet/config.json: the UNet {problem}\n")


def test_a_bin_part_is_read_by_the_safe_reader(sd1_pair, tmp_path) -> None:
    import shutil
    folder = shutil.copytree(sd1_pair[1], tmp_path / "bin-folder")
    state = read_state_dict(folder / "text_encoder" / "model.safetensors")
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(state, folder / "text_encoder" / "pytorch_model.bin")
    _same_tensors(folder, sd1_pair[0])


def test_folders_we_cannot_read_are_named(ldznet, sd1_pair, tiny_model_files, image_file, tmp_path,
                                          monkeypatch) -> None:
    import shutil
    folder = shutil.copytree(sd1_pair[1], tmp_path / "no-unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"^no-unet: no weights in unet/ \(found config.json\); expected one of "):
        read_diffusers_folder(folder)
    monkeypatch.chdir(folder / "unet")  # '..' and '.' are named by the folder they stand for
    with pytest.raises(CheckpointError, match=r"^no-unet: no weights in unet/ \(found config.json\); expected one of "):
        read_diffusers_folder("..")
    monkeypatch.chdir(sd1_pair[1])
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", ".")
    assert code == 2 and err.startswith("ldznet mask: error: tiny-sd1: a model of your own needs a segmentation head")
    sd2 = shutil.copytree(sd1_pair[1], tmp_path / "sd2")
    (sd2 / "text_encoder" / "config.json").write_text(json.dumps({"num_attention_heads": 16, "hidden_size": 1024}))
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", sd2, "--zero-shot")
    assert (code, err) == (2, "ldznet mask: error: sd2: text_encoder/config.json: field 'hidden_size' is 1024; "
                              "expected 64, the width of its weights\n")
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", tmp_path, "--zero-shot")
    assert code == 2 and f"model file {tmp_path} is a folder without model_index.json" in err
    flux = shutil.copytree(sd1_pair[1], tmp_path / "flux")
    (flux / "unet").rename(flux / "transformer")
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", flux, "--zero-shot")
    assert (code, err) == (2, "ldznet mask: error: flux: a diffusers folder of FluxPipeline with transformer/, not "
                              "unet/ (Flux, SD 3 and other transformer models are not supported); only UNet models "
                              "(SD 1.x, SD 2.x, SDXL) are read\n")


def test_incomplete_sdxl_folders_are_named(ldznet, sdxl_pair, image_file, tmp_path) -> None:
    import shutil
    no_bigg = shutil.copytree(sdxl_pair[1], tmp_path / "no-te2")
    shutil.rmtree(no_bigg / "text_encoder_2")
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", no_bigg, "--zero-shot")
    assert (code, err) == (2, "ldznet mask: error: no-te2: an SDXL UNet (text_time conditioning) without "
                              "text_encoder_2/; the folder is incomplete\n")
    refiner = shutil.copytree(sdxl_pair[1], tmp_path / "refiner")
    shutil.rmtree(refiner / "text_encoder")
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", refiner, "--zero-shot")
    assert (code, err) == (2, "ldznet mask: error: refiner: text_encoder_2/ without text_encoder/ (an SDXL refiner?); "
                              "refiners are not supported: use the SDXL base model or a fine-tune of it\n")


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_head_mode_on_an_sdxl_or_sd2_folder_is_refused_before_reading_it(ldznet, request, tiny_model_files,
                                                                         image_file, tmp_path, monkeypatch,
                                                                         family) -> None:
    from ldznet_ext.sd import diffusers_folder
    folder = request.getfixturevalue(f"{family}_pair")[1]
    monkeypatch.setattr(diffusers_folder, "read_state_dict", lambda path: pytest.fail(f"{path} was read"))
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", folder,
                          "--head", tiny_model_files[1])
    assert code == 2 and f"tiny-{family}: {family}: an LD-ZNet head reads SD 1.x UNet features" in err


@pytest.mark.parametrize("layers", [2, 1])
def test_an_sd2_folders_context_is_its_text_encoders_last_hidden_state(sd2_pair, tmp_path, layers) -> None:
    """As transformers runs the folder's text encoder: the layers its config says (the folder holds 2; run 1,
    the second is left unread, as diffusers leaves ViT-H's 24th)."""
    import shutil

    from ldznet_ext.sd.diffusers_folder import load_diffusers_folder
    from ldznet_ext.sd.openclip import openclip_ids
    from ldznet_ext.sd.tokenizer import tokenize
    folder = shutil.copytree(sd2_pair[1], tmp_path / "folder")
    config_file = folder / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_hidden_layers": layers}))
    prompts = ["a red cat on a mat", "sky", ""]
    reference = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(input_ids=openclip_ids(tokenize(prompts))).last_hidden_state
        context = load_diffusers_folder(folder, zero_shot=True).text_encoder.encode(prompts)
    assert float((context - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize(("fields", "problem"), [
    ({"hidden_act": "quick_gelu"}, "field 'hidden_act' is \"quick_gelu\"; expected \"gelu\", as SD 2.x's OpenCLIP "
                                   "text encoder has"),
    ({"hidden_act": None}, "field 'hidden_act' is \"quick_gelu\"; expected \"gelu\", as SD 2.x's OpenCLIP text "
                           "encoder has"),  # transformers' default
    ({"hidden_size": 1024}, "field 'hidden_size' is 1024; expected 64, the width of its weights"),
    ({"num_attention_heads": 2}, "field 'num_attention_heads' is 2; expected 1, heads 64 channels wide, as "
                                 "open_clip's towers have"),
    ({"layer_norm_eps": 1e-6}, "field 'layer_norm_eps' is 1e-06; expected 1e-05, open_clip's"),
    ({"intermediate_size": None}, "field 'intermediate_size' is 2048; expected 256, its weights' MLP width"),
    ({"num_hidden_layers": 3}, "field 'num_hidden_layers' is 3; expected 2, the layers its weights hold (or 1, "
                               "leaving the last unread)"),
    ({"num_hidden_layers": "2"}, "field 'num_hidden_layers' is \"2\"; expected 2, the layers its weights hold (or "
                                 "1, leaving the last unread)"),
])
def test_an_sd2_text_encoder_config_that_misdescribes_its_tower_is_refused(ldznet, sd2_pair, image_file, tmp_path,
                                                                            fields, problem) -> None:
    """Read as configured, the tower would run otherwise than its weights were trained: every context silently
    off (the head count and depth were taken from the weights, the activation and epsilon were ignored)."""
    import shutil
    folder = shutil.copytree(sd2_pair[1], tmp_path / "odd")
    config_file = folder / "text_encoder" / "config.json"
    config = {**json.loads(config_file.read_text()), **fields}
    config_file.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", folder, "--zero-shot")
    assert (code, err) == (2, f"ldznet mask: error: odd: text_encoder/config.json: {problem}\n")


@pytest.mark.parametrize("variant", ["", ".fp16"])  # diffusers' name for a variant's index
def test_sharded_weights_are_read_through_their_index(sd1_pair, tmp_path, variant) -> None:
    import shutil
    folder = shutil.copytree(sd1_pair[1], tmp_path / "sharded")
    whole = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = read_state_dict(whole)
    whole.unlink()
    keys = sorted(state)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, str(folder / "unet" / name))
    weight_map = {k: name for name, names in shards.items() for k in names}
    index = folder / "unet" / f"diffusion_pytorch_model.safetensors.index{variant}.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _same_tensors(folder, sd1_pair[0])
    index.write_text(json.dumps({"weight_map": {keys[0]: "../vae/diffusion_pytorch_model.safetensors"}}))
    with pytest.raises(CheckpointError, match=rf"^sharded: unet/diffusion_pytorch_model.safetensors.index{variant}"
                                              r".json must map weights to files in unet/$"):
        read_diffusers_folder(folder)


def test_the_full_precision_weights_come_before_a_sharded_fp16_variant(sd1_pair, tmp_path) -> None:
    """A folder with both (as a download of every variant has): the fp32 file is read, as the fp16 shards'
    index name says they are a variant."""
    import shutil
    folder = shutil.copytree(sd1_pair[1], tmp_path / "both")
    state = read_state_dict(folder / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in state.items()}, str(folder / "unet" / "fp16-1-of-1.safetensors"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(
        json.dumps({"weight_map": {k: "fp16-1-of-1.safetensors" for k in state}}))
    _same_tensors(folder, sd1_pair[0])


def _with_scheduler(folder: Path, tmp_path: Path, name: str, config: dict) -> Path:
    """A copy of ``folder`` named ``name`` whose scheduler/scheduler_config.json is ``config``."""
    import shutil
    copy = shutil.copytree(folder, tmp_path / name)
    (copy / "scheduler").mkdir(exist_ok=True)
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return copy


def test_sd1_v_prediction_is_refused_from_a_folder_and_a_file(ldznet, sd1_pair, image_file, tmp_path) -> None:
    """An SD 1.x v-prediction model read as eps would give wrong masks with no error: refused instead."""
    folder = _with_scheduler(sd1_pair[1], tmp_path, "v-folder", {"prediction_type": "v_prediction"})
    single = tmp_path / "v-file.safetensors"
    write_safetensors(single, {**read_state_dict(sd1_pair[0]), "v_pred": torch.zeros(())},
                      read_metadata(sd1_pair[0]))
    for model in (folder, single):
        code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", model, "--zero-shot")
        assert err.startswith(f"ldznet mask: error: {model.name}: sd-v1-v-prediction: an SD 1.x v-prediction model; "
                              "LD-ZNet heads and the zero-shot score read an eps-prediction SD 1.x model: use the eps "
                              "model it was fine-tuned from. Supported: ") and code == 2


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "rescale_betas_zero_snr": True},
])
def test_the_scheduler_config_gives_the_noise_schedule_diffusers_gives(sdxl_pair, tmp_path, config) -> None:
    from diffusers import DDPMScheduler

    from ldznet_ext.sd.diffusers_folder import load_diffusers_folder
    from ldznet_ext.sd.schedule import ZERO_TERMINAL_ALPHA

    folder = _with_scheduler(sdxl_pair[1], tmp_path, "scheduled", {"_class_name": "EulerDiscreteScheduler",
                                                                   "num_train_timesteps": 1000, **config})
    ours = load_diffusers_folder(folder, zero_shot=True).schedule.alphas_cumprod
    # diffusers computes in fp32, so its last entries of a rescaled table carry 4e-5 of rounding
    expected = DDPMScheduler(**config).alphas_cumprod.double()
    zero_terminal_snr = config.get("rescale_betas_zero_snr", False)
    torch.testing.assert_close(ours[:-1], expected[:-1], rtol=1e-4 if zero_terminal_snr else 1e-5, atol=0)
    if zero_terminal_snr:
        assert (ours[-1], expected[-1]) == (ZERO_TERMINAL_ALPHA, 0)
    else:
        torch.testing.assert_close(ours[-1], expected[-1], rtol=1e-5, atol=0)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("beta_schedule", "squaredcos_cap_v2", '"scaled_linear" or "linear" (SD\'s schedules)'),
    ("num_train_timesteps", 500, "1000, as every SD model has"),
    ("beta_end", 1.5, "a number in (0, 1)"),
    ("rescale_betas_zero_snr", "yes", "true or false"),
    ("trained_betas", [0.5] * 3, "null or 1000 numbers in (0, 1)"),
])
def test_a_scheduler_config_we_cannot_follow_is_refused(ldznet, sd1_pair, image_file, tmp_path, field, value,
                                                        expected) -> None:
    folder = _with_scheduler(sd1_pair[1], tmp_path, "odd", {field: value})
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", folder, "--zero-shot")
    assert (code, err) == (2, f"ldznet mask: error: odd: scheduler/scheduler_config.json: field '{field}' is "
                              f"{json.dumps(value)[:40]}; expected {expected}\n")


def test_an_edm_folder_is_refused(ldznet, sdxl_pair, image_file, tmp_path, monkeypatch) -> None:
    """Playground v2.5's layout (an EDM scheduler, per-channel latent statistics) was read as an eps SDXL;
    it is refused from its configs, before any weight is read."""
    import shutil

    from ldznet_ext.sd import diffusers_folder
    monkeypatch.setattr(diffusers_folder, "read_state_dict", lambda path: pytest.fail(f"{path} was read"))
    folder = _with_scheduler(sdxl_pair[1], tmp_path, "edm", {"_class_name": "EDMDPMSolverMultistepScheduler",
                                                             "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002})
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", folder, "--zero-shot")
    assert (code, err) == (2, "ldznet mask: error: edm: scheduler/scheduler_config.json: EDMDPMSolverMultistepScheduler, "
                              "the EDM noise schedule (Playground v2.5 and the like), not SD's; models trained with it "
                              "are not supported\n")
    latents = shutil.copytree(sdxl_pair[1], tmp_path / "latents")
    config = json.loads((latents / "vae" / "config.json").read_text())
    (latents / "vae" / "config.json").write_text(json.dumps({**config, "latents_mean": [0.0] * 4,
                                                             "latents_std": [1.0] * 4}))
    code, _, err = ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", latents, "--zero-shot")
    assert (code, err) == (2, "ldznet mask: error: latents: vae/config.json: latents_mean / latents_std, per-channel "
                              "latent statistics (Playground v2.5 and the like) that SD models do not have; such "
                              "models are not supported\n")


@pytest.mark.parametrize("weight_map", [["a.safetensors"], {"w": 5}, {"w": ".."}, {"w": ""}, "a.safetensors"],
                         ids=["a list", "a number", "the parent folder", "empty", "a string"])
def test_an_index_whose_weight_map_names_no_files_is_refused(weight_map, sd1_pair, image_file, tmp_path, ldznet):
    import shutil
    folder = shutil.copytree(sd1_pair[1], tmp_path / "odd-index")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # else read first, the index unused
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = "odd-index: unet/diffusion_pytorch_model.safetensors.index.json must map weights to files in unet/"
    with pytest.raises(CheckpointError) as error:
        read_diffusers_folder(folder)
    assert str(error.value) == message
    assert ldznet("mask", image_file, "cat", "-o", tmp_path / "m.png", "--model", folder, "--zero-shot") == (
        2, "", f"ldznet mask: error: {message}\n")


def test_train_takes_a_folder_as_mask_and_batch_do(sd1_pair, tmp_path) -> None:
    """`ldznet train --model FOLDER` was refused ("a folder; expected a single-file") while mask, batch and eval
    took it: one step from the folder and from its single file train the same head."""
    from ldznet_ext.cli import main
    from ldznet_ext.train.trainer import HEAD

    heads = []
    for i, model in enumerate(sd1_pair):
        run = tmp_path / f"run{i}"
        assert main(["train", "--arch", "znet", "--model", str(model), "--data", "world:train:2", "--resolution", "64",
                     "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "-o", str(run)]) == 0
        heads.append(read_state_dict(run / HEAD))
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
