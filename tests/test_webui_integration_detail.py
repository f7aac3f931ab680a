"""Opt-in, like test_webui_integration.py (LDZNET_WEBUI_DIR): the detail pass inside A1111 with the
embedded micro model and its LD-ZNet head, on a micro-world scene where the head finds both objects.
About 15 s on a CPU (the micro model starts in seconds).

A module of its own so that its WebUI starts after the other modules' have stopped (pytest tears a
module's fixtures down before the next module), never two at once.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_webui_integration import WEBUI, _b64, _call, _png, _serve

SCENE_SEED, SIZE = 33, 256  # a green triangle on the left, an orange circle on the right
DETAIL = ["green triangle OR orange circle", "a green triangle [SEP] an orange circle", 0.6, 4, 8]
MASK_JOB = {"mode": "LD-ZNet head", "threshold": 0.5, "grow": 0, "feather": 2, "invert": False, "combine": "replace",
            "refine": True, "keep_largest": None, "min_area": 0, "refine_strength": 1.0, "refine_radius": None,
            "presence": True}
MASK_ARGS = ["", *[0 if value is None else value for value in MASK_JOB.values()]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A1111 v1.10.1 on the CPU with the micro SD v1 and its LD-ZNet head."""
    if not WEBUI:
        pytest.skip("set LDZNET_WEBUI_DIR to an A1111 v1.10.1 folder to run")
    from ldznet_ext.defaults import default_model_paths
    from ldznet_ext.webui.install_model import install_model

    webui, work = Path(WEBUI), tmp_path_factory.mktemp("webui")
    sd, head = default_model_paths()
    checkpoint = install_model(sd, webui, hf_home=work / "hf")
    (webui / "models" / "ldznet").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(head, webui / "models" / "ldznet" / head.name)
    flags = ["--no-half", "--disable-opt-split-attention", "--use-cpu", "all", "--do-not-download-clip",
             "--ckpt", str(checkpoint)]
    with _serve(webui, work, flags, {"ldznet_head": head.name}, "LDZNET_WEBUI_PYTHON") as base:
        # A1111 encodes an img2img's init image with a draw from the global torch RNG, which each
        # generation leaves seeded by its own seed: after this one, every request below starts alike.
        _img2img(base, [])
        yield base


def _img2img(server: str, detail: list) -> tuple[np.ndarray, dict]:
    from ldznet_ext.world.scenes import make_scene

    scene = make_scene(SCENE_SEED, size=SIZE)
    payload = {"init_images": [_b64(Image.fromarray(scene.image))], "prompt": scene.caption, "steps": 4,
               "width": SIZE, "height": SIZE, "seed": 11, "sampler_name": "Euler", "denoising_strength": 0.3,
               "alwayson_scripts": {"LD-ZNet mask": {"args": [*MASK_ARGS, *detail]}}}
    status, result = _call(server, "/sdapi/v1/img2img", payload)
    assert status == 200, result
    return _png(result["images"][0]), result


def test_detail_pass_inpaints_each_instance_and_nothing_else(server):
    """The pass repaints inside each instance's padded crop (the boxes of the plan, from the instance
    masks of /ldznet/v1/mask on the image as generated) and nowhere else; same seed, same image."""
    from ldznet_ext.detail import crop_box
    from ldznet_ext.webui.request import detail_from_infotext

    plain, _ = _img2img(server, [])
    status, masked = _call(server, "/ldznet/v1/mask", {"image": _b64(Image.fromarray(plain)), "expression": DETAIL[0],
                                                       "instances": True, **MASK_JOB})
    assert status == 200, masked
    boxes = [crop_box(_png(instance["mask"]), DETAIL[4]) for instance in masked["instances"]]
    assert len(boxes) == 2, masked["instances"]

    detailed, result = _img2img(server, DETAIL)
    changed = np.abs(detailed.astype(int) - plain.astype(int)).max(axis=2) > 0
    inside = np.zeros_like(changed)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
        assert changed[y0:y1, x0:x1].mean() > 0.2, (x0, y0, x1, y1)  # each instance was repainted
    assert not (changed & ~inside).any()

    infotext = json.loads(result["info"])["infotexts"][0]
    assert "LD-ZNet detail warning" not in infotext
    status, parsed = _call(server, "/sdapi/v1/png-info", {"image": result["images"][0]})
    assert status == 200
    recorded = detail_from_infotext(parsed["parameters"])
    assert (recorded.expression, recorded.prompts, recorded.denoising, recorded.steps, recorded.padding) == \
        tuple(DETAIL)
    assert np.array_equal(_img2img(server, DETAIL)[0], detailed)
