"""Opt-in, like test_webui_integration.py (LDZNET_WEBUI_DIR): the extension in A1111 v1.10.1 while an
SDXL-architecture checkpoint is loaded. ``ldznet webui install-model`` installs a tiny random SDXL file
(sgm's key layout, an 8x VAE, open_clip ViT-S-32-alt's text tower; its sgm YAML beside it) and the
embedded micro SD v1; A1111 loads the SDXL file. Zero-shot masks come from the host's own SDXL model;
head mode runs the micro LD-ZNet head on the separate SD 1.x mask model, in /ldznet/v1/mask and in an
img2img ``mask:`` line alike.

A module of its own so that its WebUI starts after the other modules' have stopped.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_webui_integration import (A1111_FLAGS, WEBUI, _b64, _call, _png, _serve,
                                    check_masks_ignore_the_last_generations_lora, write_test_lora)

SDXL_NAME = "ldznet-test-sdxl"
SCENE_SEED, SIZE = 33, 256  # a green triangle on the left, an orange circle on the right (micro world)
ZERO_SHOT = {"expression": "cat", "mode": "zero-shot", "presence": False}  # a random model: the map is the point


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A1111 on the CPU with the tiny SDXL file loaded, the micro SD v1 among its checkpoints and the
    micro head selected. Live previews are off: with an SDXL model loaded, A1111's default "Approx NN"
    preview downloads vaeapprox-sdxl.pt (none is shipped) before every generation. The settings are
    restored afterwards (A1111 keeps them in config.json)."""
    if not WEBUI:
        pytest.skip("set LDZNET_WEBUI_DIR to an A1111 v1.10.1 folder to run")
    from fake_webui.sdxl_file import write_tiny_a1111_sdxl

    from ldznet_ext.defaults import default_model_paths
    from ldznet_ext.webui.install_model import install_model

    webui, work = Path(WEBUI), tmp_path_factory.mktemp("webui")
    write_tiny_a1111_sdxl(work / f"{SDXL_NAME}.safetensors")
    checkpoint = install_model(work / f"{SDXL_NAME}.safetensors", webui, hf_home=work / "hf")
    sd, head = default_model_paths()
    install_model(sd, webui, hf_home=work / "hf")
    (webui / "models" / "ldznet").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(head, webui / "models" / "ldznet" / head.name)
    options = {"ldznet_head": head.name, "return_mask": True, "ldznet_mask_model": "automatic",
               "live_previews_enable": False}
    with _serve(webui, work, [*A1111_FLAGS, "--ckpt", str(checkpoint)], options, "LDZNET_WEBUI_PYTHON") as base:
        try:
            yield base
        finally:
            _call(base, "/sdapi/v1/options", {"ldznet_mask_model": "automatic", "live_previews_enable": True})


def _title(server: str, stem: str) -> str:
    status, models = _call(server, "/sdapi/v1/sd-models")
    assert status == 200
    return next(m["title"] for m in models if Path(m["filename"]).stem == stem)


def _scene() -> Image.Image:
    from ldznet_ext.world.scenes import make_scene

    return Image.fromarray(make_scene(SCENE_SEED, size=SIZE).image)


def check_loaded_and_generating(server: str, title: str) -> None:
    """The WebUI has loaded the checkpoint ``title`` and generates a 128 x 96 image with it."""
    status, options = _call(server, "/sdapi/v1/options")
    assert status == 200 and options["sd_model_checkpoint"] == title
    status, result = _call(server, "/sdapi/v1/txt2img", {"prompt": "a photo", "steps": 1, "width": 128, "height": 96,
                                                         "seed": 1, "sampler_name": "Euler"})
    assert status == 200, result
    assert _png(result["images"][0]).shape == (96, 128, 3)


def test_the_sdxl_file_is_loaded_and_generates(server):
    check_loaded_and_generating(server, _title(server, SDXL_NAME))


def check_zero_shot_on_the_loaded_model(server: str, stem: str) -> np.ndarray:
    """Zero-shot on the loaded (not SD 1.x) model, checkpoint ``stem``: a non-flat map [SIZE, SIZE] whose
    mid-range threshold splits the image; with the mask-model setting naming that file, head mode is
    refused and zero-shot still answers, the same map and mask for the same request (the noise seed is a
    setting). Returns the probability map."""
    image = _b64(_scene())
    status, first = _call(server, "/ldznet/v1/mask", {"image": image, **ZERO_SHOT})
    assert status == 200, first
    probability = _png(first["probability"]) / 65535
    assert probability.shape == (SIZE, SIZE) and probability.max() > probability.min()
    threshold = round(float(probability.min() + probability.max()) / 2, 4)
    status, split = _call(server, "/ldznet/v1/mask", {"image": image, **ZERO_SHOT, "threshold": threshold})
    assert status == 200 and 0 < split["coverage"] < 1 and _png(split["mask"]).shape == (SIZE, SIZE)
    assert np.array_equal(_png(split["probability"]), _png(first["probability"]))
    loaded = _title(server, stem)
    assert _call(server, "/sdapi/v1/options", {"ldznet_mask_model": loaded})[0] == 200
    try:
        status, refused = _call(server, "/ldznet/v1/mask", {"image": image, "expression": "green triangle"})
        assert status == 409 and refused["detail"].startswith(
            f"Settings > LD-ZNet > 'SD 1.x model for masks when the loaded model is not SD 1.x' is {loaded!r}, "
            "which is not among the WebUI's SD 1.x checkpoints (")
        status, again = _call(server, "/ldznet/v1/mask", {"image": image, **ZERO_SHOT, "threshold": threshold})
        assert status == 200 and np.array_equal(_png(again["probability"]), _png(split["probability"]))
        assert np.array_equal(_png(again["mask"]), _png(split["mask"])) and again["coverage"] == split["coverage"]
    finally:
        assert _call(server, "/sdapi/v1/options", {"ldznet_mask_model": "automatic"})[0] == 200
    return probability


def test_zero_shot_masks_come_from_the_host_sdxl_model(server):
    """Zero-shot on the loaded SDXL model, with no SD 1.x model needed (check_zero_shot_on_the_loaded_model)."""
    check_zero_shot_on_the_loaded_model(server, SDXL_NAME)


def test_head_mode_mask_line_inpaints_with_the_routes_mask(server):
    """LD-ZNet head mode with the SDXL file loaded: the micro head on the micro SD v1 (the setting names
    it) finds the triangle, and img2img's ``mask:`` line inpaints with exactly the route's mask."""
    check_head_mode_on_the_micro_sd_v1(server)


def check_head_mode_on_the_micro_sd_v1(server: str, model_stem: str | None = None) -> None:
    """The mask-model setting names the micro SD v1; the micro head finds the triangle through the route, and
    an img2img ``mask:`` line inpaints with exactly the route's mask (the WebUI returns the mask it used);
    with ``model_stem``, the infotext names that loaded model as the one that generated."""
    micro = _title(server, "micro-sd-v1")
    assert _call(server, "/sdapi/v1/options", {"ldznet_mask_model": micro})[0] == 200
    image = _scene()
    status, direct = _call(server, "/ldznet/v1/mask", {"image": _b64(image), "expression": "green triangle"})
    assert status == 200, direct
    assert 0 < direct["coverage"] < 0.5 and direct["terms"]["green triangle"]["found"]
    payload = {"init_images": [_b64(image)], "prompt": "a photo\nmask: green triangle", "steps": 2, "width": SIZE,
               "height": SIZE, "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.5, "mask_blur": 0,
               "inpaint_full_res": False,
               "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", 0.5]}}}
    status, result = _call(server, "/sdapi/v1/img2img", payload)
    assert status == 200, result
    infotext = json.loads(result["info"])["infotexts"][0]
    assert infotext.startswith("a photo\n") and "LD-ZNet mask: green triangle" in infotext
    if model_stem is not None:
        assert "Model: " + model_stem in infotext  # generated by the loaded model, not the mask model
    used = _png(result["images"][-1])  # opts.return_mask: the mask the WebUI inpainted with
    assert np.array_equal(used[..., 0] if used.ndim == 3 else used, _png(direct["mask"]))


def test_zero_shot_masks_ignore_the_last_generations_lora(server):
    """Zero-shot on the host's own SDXL model: a LoRA a generation left applied does not reach the masks."""
    write_test_lora(Path(WEBUI) / "models" / "Stable-diffusion" / f"{SDXL_NAME}.safetensors", Path(WEBUI), 0.09)
    check_masks_ignore_the_last_generations_lora(server, _scene(), 128, 96, mode="zero-shot")
