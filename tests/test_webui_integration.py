"""Opt-in: the extension inside a real AUTOMATIC1111 v1.10.1 (set LDZNET_WEBUI_DIR to its folder).

The WebUI folder needs its Python environment (``venv/``, or LDZNET_WEBUI_PYTHON) and its
``repositories/``. The test installs a tiny SD model and head with ``ldznet webui install-model``,
links this repository into ``extensions/ldznet``, starts the WebUI offline in API mode on a free
port, and checks the script, the API and the infotext. Takes a minute or two on a CPU.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WEBUI = os.environ.get("LDZNET_WEBUI_DIR")
pytestmark = pytest.mark.skipif(not WEBUI, reason="set LDZNET_WEBUI_DIR to an A1111 v1.10.1 folder to run")
REPO = Path(__file__).resolve().parents[1]


def _call(base: str, path: str, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fake_webui.models import tiny_head, tiny_sd

    from ldznet_ext.heads import save_head
    from ldznet_ext.sd.checkpoint import save_stable_diffusion
    from ldznet_ext.webui.install_model import install_model

    webui, work = Path(WEBUI), tmp_path_factory.mktemp("webui")
    save_stable_diffusion(tiny_sd(), work / "ldznet-test-sd.safetensors")
    install_model(work / "ldznet-test-sd.safetensors", webui, hf_home=work / "hf")
    (webui / "models" / "ldznet").mkdir(parents=True, exist_ok=True)
    save_head(*tiny_head(), webui / "models" / "ldznet" / "ldznet-test-head.safetensors")
    link = webui / "extensions" / "ldznet"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    python = os.environ.get("LDZNET_WEBUI_PYTHON", str(webui / "venv" / "bin" / "python"))
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [python, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check",
               "--api", "--no-half", "--disable-opt-split-attention", "--use-cpu", "all", "--no-download-sd-model",
               "--do-not-download-clip", "--no-hashing", "--port", str(port),
               "--ckpt", str(webui / "models" / "Stable-diffusion" / "ldznet-test-sd.safetensors")]
    log = open(work / "server.log", "w")
    process = subprocess.Popen(command, cwd=webui, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if _call(base, "/ldznet/v1/version")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None:
                break
            time.sleep(2)
        else:
            pytest.fail("the WebUI did not answer within 300 s")
        if process.poll() is not None:
            pytest.fail(f"the WebUI exited: {(work / 'server.log').read_text()[-3000:]}")
        assert _call(base, "/sdapi/v1/options", {"ldznet_head": "ldznet-test-head.safetensors",
                                                 "return_mask": True})[0] == 200
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
        print((work / "server.log").read_text()[-2000:], file=sys.stderr)


IMAGE = Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8))


def test_script_is_listed(server):
    status, scripts = _call(server, "/sdapi/v1/scripts")
    assert status == 200 and "ld-znet mask" in scripts["img2img"] and "ld-znet mask" in scripts["txt2img"]


def test_mask_line_masks_img2img(server):
    status, direct = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": "cat", "threshold": 0.5})
    assert status == 200 and 0 < direct["coverage"] < 1
    payload = {"init_images": [_b64(IMAGE)], "prompt": "a photo\nmask: cat", "steps": 2, "width": 128, "height": 96,
               "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.5, "mask_blur": 0, "inpaint_full_res": False,
               "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", 0.5]}}}
    status, result = _call(server, "/sdapi/v1/img2img", payload)
    assert status == 200, result
    info = json.loads(result["info"])
    assert "LD-ZNet mask: cat" in info["infotexts"][0]
    assert info["infotexts"][0].startswith("a photo\n")  # the sampler's prompt lost the mask line
    used = _png(result["images"][1])  # opts.return_mask: the mask the WebUI inpainted with
    assert np.array_equal(used[..., 0] if used.ndim == 3 else used, _png(direct["mask"]))


def test_bad_args_are_4xx(server):
    payload = {"init_images": [_b64(IMAGE)], "prompt": "x", "steps": 1,
               "alwayson_scripts": {"ld-znet mask": {"args": ["cat", "LD-ZNet head", 1.5]}}}
    status, body = _call(server, "/sdapi/v1/img2img", payload)
    assert status == 422 and "threshold must be in [0, 1)" in body["detail"]
    status, body = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": "cat AND"})
    assert status == 422 and "position 7" in body["detail"]


def test_infotext_round_trip_through_png_info(server):
    status, result = _call(server, "/sdapi/v1/img2img", {
        "init_images": [_b64(IMAGE)], "prompt": "mask: cat{+2} OR dog", "steps": 1, "width": 128, "height": 96,
        "alwayson_scripts": {"ld-znet mask": {"args": ["", "zero-shot", 0.4, 3, 1, True, "replace"]}}})
    assert status == 200
    status, parsed = _call(server, "/sdapi/v1/png-info", {"image": result["images"][0]})
    assert status == 200
    from ldznet_ext.webui.request import MaskRequest

    assert MaskRequest.from_infotext(parsed["parameters"]) == MaskRequest("cat{+2} OR dog", "zero-shot", 0.4, 3, 1, True)
    assert parsed["parameters"]["Prompt"] == ""
