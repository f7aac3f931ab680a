"""Opt-in, like test_webui_integration.py (LDZNET_WEBUI_DIR): the extension in A1111 v1.10.1 while an
SD 2.x-architecture checkpoint is loaded. ``ldznet webui install-model`` installs two tiny random SD 2.x
files (ldm's key layout, linear projections, open_clip ViT-S-32-alt's text tower; ldm's v2-inference.yaml
shape beside each), one eps and one that A1111's probe reads as v-prediction (v2-inference-v.yaml), and the
embedded micro SD v1; A1111 loads the eps file. Zero-shot masks come from the host's own SD 2.x model
and agree with `ldznet mask --model THAT_FILE --zero-shot` (the same weights, run by A1111's ldm code on
one side and ours on the other); head mode runs the micro LD-ZNet head on the separate SD 1.x mask model,
in /ldznet/v1/mask and in an img2img ``mask:`` line alike.

A module of its own so that its WebUI starts after the other modules' have stopped.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_webui_integration import A1111_FLAGS, WEBUI, _b64, _call, _png, _serve
from test_webui_integration_sdxl import (ZERO_SHOT, _scene, _title, check_head_mode_on_the_micro_sd_v1,
                                        check_loaded_and_generating)

EPS_NAME, V_NAME, CONVERTED_NAME = "ldznet-test-sd2", "ldznet-test-sd2-v", "ldznet-test-sd2-converted"
# What diffusers' conversion script leaves out of an SD 2.x file: the tower's last layer (ViT-S-32-alt's 10th
# here) and projection, which the context does not read, and CLIP's temperature.
UNREAD = ("cond_stage_model.model.transformer.resblocks.9.", "cond_stage_model.model.text_projection",
          "cond_stage_model.model.logit_scale")
# Largest difference between the host's zero-shot map and `ldznet mask`'s on the same file: ldm's
# attention, VAE and OpenCLIP code against ours, in fp32 (a few steps of the 16-bit PNG).
CLI_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A1111 on the CPU with the tiny eps SD 2.x file loaded, the v one and the micro SD v1 among its
    checkpoints and the micro head selected; the work folder keeps the original files."""
    if not WEBUI:
        pytest.skip("set LDZNET_WEBUI_DIR to an A1111 v1.10.1 folder to run")
    from fake_webui.sd2_file import METADATA, tiny_a1111_sd2_state, write_tiny_a1111_sd2

    from ldznet_ext.checkpoint_io import write_safetensors
    from ldznet_ext.defaults import default_model_paths
    from ldznet_ext.webui.install_model import install_model

    webui, work = Path(WEBUI), tmp_path_factory.mktemp("webui")
    write_tiny_a1111_sd2(work / f"{EPS_NAME}.safetensors")
    write_tiny_a1111_sd2(work / f"{V_NAME}.safetensors", seed=1, v_by_probe=True)  # another model
    checkpoint = install_model(work / f"{EPS_NAME}.safetensors", webui, hf_home=work / "hf")
    install_model(work / f"{V_NAME}.safetensors", webui, hf_home=work / "hf")
    write_safetensors(work / f"{CONVERTED_NAME}.safetensors", {k: v.half() for k, v in tiny_a1111_sd2_state().items()
                                                               if not k.startswith(UNREAD)}, METADATA)
    install_model(work / f"{CONVERTED_NAME}.safetensors", webui, hf_home=work / "hf")
    sd, head = default_model_paths()
    install_model(sd, webui, hf_home=work / "hf")
    (webui / "models" / "ldznet").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(head, webui / "models" / "ldznet" / head.name)
    options = {"ldznet_head": head.name, "return_mask": True, "ldznet_mask_model": "automatic"}
    with _serve(webui, work, [*A1111_FLAGS, "--ckpt", str(checkpoint)], options, "LDZNET_WEBUI_PYTHON") as base:
        yield base, work


def _cli_probability(work: Path, name: str, image: Image.Image) -> np.ndarray:
    """`ldznet mask --model FILE --zero-shot` on ``image`` with the route's settings (presence off)."""
    from ldznet_ext.cli import main

    image.save(work / "scene.png")
    out = work / f"{name}-prob.png"
    assert main(["mask", str(work / "scene.png"), ZERO_SHOT["expression"], "-o", str(work / f"{name}-mask.png"),
                 "--probability", str(out), "--model", str(work / f"{name}.safetensors"), "--zero-shot",
                 "--no-presence"]) == 0
    return np.asarray(Image.open(out)) / 65535


def _zero_shot(base: str, image: Image.Image) -> np.ndarray:
    status, result = _call(base, "/ldznet/v1/mask", {"image": _b64(image), **ZERO_SHOT})
    assert status == 200, result
    return _png(result["probability"]) / 65535


def test_the_sd2_file_is_loaded_and_generates(server):
    base, _ = server
    check_loaded_and_generating(base, _title(base, EPS_NAME))


def test_zero_shot_masks_come_from_the_host_sd2_model(server):
    """Zero-shot on the loaded SD 2.x model, the eps file and then the v one (A1111 builds it from the
    v2-inference-v.yaml shape install-model wrote): a non-flat map, the same for the same request, equal
    within CLI_TOLERANCE to `ldznet mask` on the same file, and another map for the other model. The eps file
    as diffusers' conversion writes it (A1111 loads it into the whole tower) gives the eps file's map."""
    base, work = server
    models = {Path(m["filename"]).stem: m for m in _call(base, "/sdapi/v1/sd-models")[1]}
    maps = {}
    try:
        for name, prediction in ((EPS_NAME, "eps"), (V_NAME, "v"), (CONVERTED_NAME, "eps")):
            config = yaml.safe_load(Path(models[name]["config"]).read_text())  # the YAML A1111 builds from
            assert config["model"]["params"]["parameterization"] == prediction
            assert _call(base, "/sdapi/v1/options", {"sd_model_checkpoint": models[name]["title"]})[0] == 200
            status, result = _call(base, "/sdapi/v1/txt2img", {"prompt": "a photo", "steps": 1, "width": 64,
                                                               "height": 64, "seed": 1, "sampler_name": "Euler"})
            assert status == 200, result
            image = _scene()
            maps[name] = _zero_shot(base, image)
            assert maps[name].shape == image.size[::-1] and maps[name].max() > maps[name].min()
            assert np.array_equal(_zero_shot(base, image), maps[name])
            difference = np.abs(_cli_probability(work, name, image) - maps[name]).max()
            assert difference < CLI_TOLERANCE, difference
    finally:
        assert _call(base, "/sdapi/v1/options", {"sd_model_checkpoint": models[EPS_NAME]["title"]})[0] == 200
    assert np.abs(maps[EPS_NAME] - maps[V_NAME]).max() > 0.1
    assert np.array_equal(maps[CONVERTED_NAME], maps[EPS_NAME])


def test_head_mode_on_the_micro_sd_v1_inpaints_with_the_routes_mask(server):
    """Head mode with the SD 2.x file loaded: the micro head on the micro SD v1 (the setting names it)
    finds the triangle, and img2img's ``mask:`` line inpaints with exactly the route's mask."""
    base, _ = server
    try:
        check_head_mode_on_the_micro_sd_v1(base)
    finally:
        assert _call(base, "/sdapi/v1/options", {"ldznet_mask_model": "automatic"})[0] == 200
