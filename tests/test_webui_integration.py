"""Opt-in: the extension inside a real WebUI. LDZNET_WEBUI_DIR: an AUTOMATIC1111 v1.10.1 folder;
LDZNET_FORGE_DIR: a Forge folder. Each needs its Python environment (``venv/``, or
LDZNET_WEBUI_PYTHON / LDZNET_FORGE_PYTHON) and its ``repositories/``.

A1111: the test installs a tiny SD model and head with ``ldznet webui install-model``, copies this
repository's working tree into ``extensions/ldznet``, starts the WebUI offline in API mode on a free port of
127.0.0.1, and checks the script, the API and the infotext; the send-to-inpaint button is clicked in
headless Chromium (needs the ``playwright`` package and a Chromium: LDZNET_CHROMIUM, or ``chromium``
on PATH; Playwright's own browser download is not used). About a minute on a CPU.
Forge: its loader knows only the real model sizes, so the test writes a random full-size SD v1 and
head into its ``models/`` (once) and checks the routes, the ``mask:`` line, the infotext and that a
mask leaves the next generation unchanged. About four minutes on a CPU.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WEBUI = os.environ.get("LDZNET_WEBUI_DIR")
FORGE = os.environ.get("LDZNET_FORGE_DIR")
REPO = Path(__file__).resolve().parents[1]
# A1111 on the CPU in fp32, without downloading CLIP (install-model writes what it reads instead), and
# LDZNET_WEBUI_FLAGS (e.g. "--medvram" or "--lowvram": the same tests under the host's offloading).
A1111_FLAGS = ("--no-half", "--disable-opt-split-attention", "--use-cpu", "all", "--do-not-download-clip",
               *shlex.split(os.environ.get("LDZNET_WEBUI_FLAGS", "")))
# The random SD's name changes with how ``full_size_sd`` builds it: the test writes the file once.
FORGE_SD, FORGE_HEAD = "ldznet-test-sd-v1-random-2.safetensors", "ldznet-test-sd-v1-random-head.safetensors"
OBSOLETE_FORGE_SDS = ("ldznet-test-sd-v1-random.safetensors",)  # this test's earlier files, removed


def _call(base: str, path: str, payload=None, auth: str | None = None):
    """(status, JSON body); ``auth`` "user:password" is sent as HTTP Basic credentials."""
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(base + path, data=data, headers=headers)
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


COPY_MARK = ".ldznet-test-copy"


def _install_copy(target: Path) -> None:
    """Copy the working tree's files (tracked and untracked, not ignored) to ``target``, as an install
    from URL leaves them. Not a symlink: the host names a linked extension's callbacks "base/...", so
    the callback order of our metadata.ini would not apply. Replaces only a link or an earlier copy."""
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        if not (target / COPY_MARK).exists():
            pytest.fail(f"{target} was not made by these tests; move it away to run them")
        shutil.rmtree(target)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.split(b"\0")):
        source = REPO / os.fsdecode(name)
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            (target / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / os.fsdecode(name))
    (target / COPY_MARK).write_text("a copy of the ldznet working tree made by tests/test_webui_integration.py\n")


@contextmanager
def _serve(webui: Path, work: Path, flags: list[str], options: dict, python_variable: str,
           auth: str | None = None) -> Iterator[str]:
    """Install this repository into ``webui/extensions``, start the WebUI offline on a free port of
    127.0.0.1 with ``flags``, wait for our routes, set ``options`` (with the ``--api-auth``
    credentials ``auth``); yields the base URL."""
    _install_copy(webui / "extensions" / "ldznet")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    python = os.environ.get(python_variable, str(webui / "venv" / "bin" / "python"))
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}  # its log lines as they come: the start is read from them
    command = [python, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check",
               "--api", "--no-download-sd-model", "--no-hashing", "--server-name", "127.0.0.1", "--port", str(port),
               *flags]
    log = open(work / "server.log", "w")
    process = subprocess.Popen(command, cwd=webui, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            # Not before the host says its start is over: with the UI, the server answers before create_api()
            # adds the API's middleware, and a request in between makes that raise (starlette 0.26), ending
            # the WebUI. Both hosts print this line after the app_started callbacks (which add our routes).
            if "Startup time:" in (work / "server.log").read_text(errors="replace"):
                try:
                    if _call(base, "/ldznet/v1/version", auth=auth)[0] == 200:
                        break
                except OSError:
                    pass
            if process.poll() is not None:
                break
            time.sleep(2)
        else:
            pytest.fail("the WebUI did not answer within 600 s")
        if process.poll() is not None:
            pytest.fail(f"the WebUI exited: {(work / 'server.log').read_text()[-3000:]}")
        assert _call(base, "/sdapi/v1/options", options, auth)[0] == 200
        yield base
    finally:
        with suppress(ProcessLookupError):  # a WebUI that exited by itself left no group to signal
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
        print((work / "server.log").read_text()[-2000:], file=sys.stderr)


@contextmanager
def a1111(tmp_path_factory, extra_flags: tuple[str, ...] = (), auth: str | None = None) -> Iterator[str]:
    """A1111 v1.10.1 on the CPU with the tiny test model and head; yields the base URL."""
    if not WEBUI:
        pytest.skip("set LDZNET_WEBUI_DIR to an A1111 v1.10.1 folder to run")
    from fake_webui.models import tiny_head, tiny_sd

    from ldznet_ext.heads import save_head
    from ldznet_ext.sd.checkpoint import save_stable_diffusion
    from ldznet_ext.webui.install_model import install_model

    webui, work = Path(WEBUI), tmp_path_factory.mktemp("webui")
    save_stable_diffusion(tiny_sd(), work / "ldznet-test-sd.safetensors")
    _write_kitty(webui, work / "ldznet-test-sd.safetensors")
    install_model(work / "ldznet-test-sd.safetensors", webui, hf_home=work / "hf")
    (webui / "models" / "ldznet").mkdir(parents=True, exist_ok=True)
    save_head(*tiny_head(), webui / "models" / "ldznet" / "ldznet-test-head.safetensors")
    flags = [*A1111_FLAGS, "--ckpt", str(webui / "models" / "Stable-diffusion" / "ldznet-test-sd.safetensors"),
             *extra_flags]
    with _serve(webui, work, flags, {"ldznet_head": "ldznet-test-head.safetensors", "return_mask": True},
                "LDZNET_WEBUI_PYTHON", auth) as base:
        yield base


KITTY = "ldznetkitty"  # the test's textual-inversion embedding in the hosts' embeddings/


def _write_kitty(webui: Path, checkpoint: Path) -> None:
    """A textual-inversion embedding of one vector in ``webui``'s embeddings/: the token embedding of "cat" of
    the SD 1.x ``checkpoint`` the host loads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ldznet_ext.sd.tokenizer import tokenize

    with safe_open(str(checkpoint), "pt") as f:
        table = f.get_slice(next(k for k in f.keys() if k.endswith("token_embedding.weight")))
        vector = table[int(tokenize(["cat"])[0, 1])].float()
    (webui / "embeddings").mkdir(exist_ok=True)
    save_file({"emb_params": vector.reshape(1, -1).contiguous()}, str(webui / "embeddings" / f"{KITTY}.safetensors"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with a1111(tmp_path_factory) as base:
        yield base


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    """Forge on the CPU with a random full-size SD v1 and head (written into its models/ once,
    2.1 + 1.9 GB in fp16, about two minutes), features at 128 px to keep masks fast."""
    if not FORGE:
        pytest.skip("set LDZNET_FORGE_DIR to a Forge folder to run")
    import torch
    from fake_webui.models import full_size_head, full_size_sd

    from ldznet_ext.heads import save_head
    from ldznet_ext.sd.checkpoint import save_stable_diffusion

    forge_dir, work = Path(FORGE), tmp_path_factory.mktemp("forge")
    checkpoint = forge_dir / "models" / "Stable-diffusion" / FORGE_SD
    head = forge_dir / "models" / "ldznet" / FORGE_HEAD
    for name in OBSOLETE_FORGE_SDS:
        (checkpoint.parent / name).unlink(missing_ok=True)
    if not checkpoint.exists():
        save_stable_diffusion(full_size_sd(), checkpoint, dtype=torch.float16)
    if not head.exists():
        head.parent.mkdir(parents=True, exist_ok=True)
        save_head(*full_size_head(), head, dtype=torch.float16)
    _write_kitty(forge_dir, checkpoint)
    flags = ["--skip-install", "--always-cpu", "--ckpt", str(checkpoint)]
    options = {"ldznet_head": FORGE_HEAD, "ldznet_resolution": 128, "return_mask": True}
    with _serve(forge_dir, work, flags, options, "LDZNET_FORGE_PYTHON") as base:
        yield base


IMAGE = Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8))


def test_script_is_listed(server):
    status, scripts = _call(server, "/sdapi/v1/scripts")
    assert status == 200 and "ld-znet mask" in scripts["img2img"] and "ld-znet mask" in scripts["txt2img"]


def test_mask_line_masks_img2img(server):
    # The tiny random head's maps are weak, so presence would drop "cat": this test is about the mask line.
    status, direct = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": "cat", "threshold": 0.5,
                                                       "presence": False})
    assert status == 200 and 0 < direct["coverage"] < 1
    payload = {"init_images": [_b64(IMAGE)], "prompt": "a photo\nmask: cat", "steps": 2, "width": 128, "height": 96,
               "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.5, "mask_blur": 0, "inpaint_full_res": False,
               "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", 0.5, *[None] * 9, False]}}}
    status, result = _call(server, "/sdapi/v1/img2img", payload)
    assert status == 200, result
    info = json.loads(result["info"])
    assert "LD-ZNet mask: cat" in info["infotexts"][0]
    assert info["infotexts"][0].startswith("a photo\n")  # the sampler's prompt lost the mask line
    used = _png(result["images"][1])  # opts.return_mask: the mask the WebUI inpainted with
    assert np.array_equal(used[..., 0] if used.ndim == 3 else used, _png(direct["mask"]))


SOFT_INPAINTING = {"args": [True, 1, 0.5, 4, 0, 0.5, 2]}  # A1111's built-in Soft Inpainting, on, its defaults


XYZ_AXES = ["[LD-ZNet] mask", "[LD-ZNet] mode", "[LD-ZNet] threshold", "[LD-ZNet] grow", "[LD-ZNet] feather"]


def _soft_inpainting_sees_the_mask(base: str, image: Image.Image, threshold: float) -> None:
    """img2img with a ``mask:`` line, no brush, and the built-in Soft Inpainting on: it enables itself
    only for a p that has a mask when its process() runs."""
    payload = {"init_images": [_b64(image)], "prompt": "a photo\nmask: cat", "steps": 1, "width": 128,
               "height": 96, "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.5,
               "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", threshold, *[None] * 9, False]},
                                    "Soft Inpainting": SOFT_INPAINTING}}
    status, result = _call(base, "/sdapi/v1/img2img", payload)
    assert status == 200, result
    assert "Soft inpainting enabled: True" in json.loads(result["info"])["infotexts"][0]


def _xyz_axis_labels(base: str, is_img2img: bool) -> list[str]:
    """The X type choices of the host's X/Y/Z plot script (its index is what script_args sends)."""
    status, infos = _call(base, "/sdapi/v1/script-info")
    assert status == 200
    grid = next(info for info in infos if info["name"] == "x/y/z plot" and info["is_img2img"] == is_img2img)
    return next(arg for arg in grid["args"] if arg["label"] == "X type")["choices"]


def test_scripts_that_read_the_mask_in_process_see_ours(server):
    """Built-in scripts run first; metadata.ini orders our process() before those that read
    p.image_mask in theirs. Without a brush mask Soft Inpainting saw none and stayed off (no 'Soft
    inpainting enabled' in the infotext, a rounded mask)."""
    _soft_inpainting_sees_the_mask(server, IMAGE, 0.5)


def test_a_textual_inversion_term_is_read_where_the_host_puts_its_vector(server):
    """The embedding (one vector: the model's own token embedding of "cat") makes the zero-shot map of
    "cat": A1111's text wrapper puts it at one position, where the cross-attention is read; SD's tokenizer
    splits its name into pieces and would read the end tokens after it too."""
    maps = []
    for term in ("cat", KITTY):
        status, body = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": term, "mode": "zero-shot",
                                                         "presence": False})
        assert status == 200, body
        maps.append(_png(body["probability"]))
    assert maps[0].std() > 0 and np.array_equal(maps[0], maps[1])


def test_a_soft_brush_meets_the_text_mask_rounded_as_the_host_reads_it(server):
    """An uploaded alpha mask intersected with ours (the random head's map cut at its median): the
    host rounds an alpha mask unless Soft Inpainting is on, which it is not here (its switch is read
    from its args; the fake host's tests cover it on). The returned mask is the inpaint mask doubled
    and clipped (processing.py, mask_for_overlay)."""
    status, first = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": "cat", "presence": False})
    assert status == 200, first
    threshold = round(float(np.median(_png(first["probability"]) / 65535)), 4)
    status, direct = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": "cat",
                                                       "threshold": threshold, "presence": False})
    assert status == 200 and 0.3 < direct["coverage"] < 0.7
    alpha = np.zeros((96, 128), np.uint8)
    alpha[:, :40], alpha[:, 40:80] = 200, 100
    brush = Image.fromarray(np.dstack([np.full((96, 128), 255, np.uint8)] * 3 + [alpha]), "RGBA")
    args = ["", "LD-ZNet head", threshold, *[None] * 3, "intersect", *[None] * 5, False]
    payload = {"init_images": [_b64(IMAGE)], "mask": _b64(brush), "prompt": "a photo\nmask: cat", "steps": 1,
               "width": 128, "height": 96, "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.5,
               "mask_blur": 0, "inpaint_full_res": False,
               "alwayson_scripts": {"LD-ZNet mask": {"args": args}, "Soft Inpainting": {"args": [False]}}}
    status, result = _call(server, "/sdapi/v1/img2img", payload)
    assert status == 200, result
    used = _png(result["images"][-1])
    used = used[..., 0] if used.ndim == 3 else used
    assert np.array_equal(used, np.minimum(_png(direct["mask"]), np.where(alpha > 128, 255, 0)))


def test_a_head_chosen_in_override_settings_is_the_one_checked_and_used(server):
    """override_settings sets the head for the request's job only; the pre-generation check judges
    that head (not the stored "None"), and the generation masks with it."""
    assert _call(server, "/sdapi/v1/options", {"ldznet_head": "None"})[0] == 200
    try:
        payload = {"init_images": [_b64(IMAGE)], "prompt": "a photo\nmask: cat", "steps": 1, "width": 128,
                   "height": 96, "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.5,
                   "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", 0.0, *[None] * 9, False]}}}
        status, body = _call(server, "/sdapi/v1/img2img", payload)
        assert status in (409, 422) and "no LD-ZNet head is selected" in body["detail"]
        payload["override_settings"] = {"ldznet_head": "ldznet-test-head.safetensors"}
        status, result = _call(server, "/sdapi/v1/img2img", payload)
        assert status == 200, result
        infotext = json.loads(result["info"])["infotexts"][0]
        assert "LD-ZNet mask: cat" in infotext and "LD-ZNet error" not in infotext
        payload["override_settings"] = {"ldznet_timestep": "abc"}
        status, body = _call(server, "/sdapi/v1/img2img", payload)
        assert status == 422 and body["detail"].startswith("override_settings: Settings > LD-ZNet: ldznet_timestep")
    finally:
        assert _call(server, "/sdapi/v1/options", {"ldznet_head": "ldznet-test-head.safetensors"})[0] == 200


def test_xyz_plot_axes_set_each_cell_s_mask(server):
    """The host's X/Y/Z plot with "[LD-ZNet] threshold: 0.1, 0.3": one generation per value, each
    masked with its own threshold (its infotext says which), the prompt's mask line for the rest (a
    value whose mask is empty generates nothing, as without the grid)."""
    labels = _xyz_axis_labels(server, is_img2img=True)
    assert [label for label in labels if label.startswith("[LD-ZNet]")] == XYZ_AXES
    payload = {"init_images": [_b64(IMAGE)], "prompt": "a photo\nmask: cat", "steps": 1, "width": 128,
               "height": 96, "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.5,
               "script_name": "x/y/z plot",
               "script_args": [labels.index("[LD-ZNet] threshold"), "0.1, 0.3", [], 0, "", [], 0, "", [],
                               True, False, False, False, False, False, False, 0, False],
               "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", 0.5, *[None] * 9, False]}}}
    status, result = _call(server, "/sdapi/v1/img2img", payload)
    assert status == 200, result
    infotexts = [text for text in json.loads(result["info"])["infotexts"] if text]  # the grid's is None
    for threshold in ("0.1", "0.3"):
        assert any(f"LD-ZNet threshold: {threshold}," in text and "LD-ZNet mask: cat" in text for text in infotexts)
    status, body = _call(server, "/sdapi/v1/img2img", {**payload, "script_args": [
        labels.index("[LD-ZNet] threshold"), "0.1, 1.5", *payload["script_args"][2:]]})
    # checked by the axis before the grid generates; the host answers any error of a script's run (its
    # own axes' too) with 500 and the message
    assert (status, body["errors"]) == (500, "threshold must be a number in [0, 1), got 1.5")


def test_bad_args_are_4xx(server):
    payload = {"init_images": [_b64(IMAGE)], "prompt": "x", "steps": 1,
               "alwayson_scripts": {"ld-znet mask": {"args": ["cat", "LD-ZNet head", 1.5]}}}
    status, body = _call(server, "/sdapi/v1/img2img", payload)
    assert status == 422 and "threshold must be a number in [0, 1), got 1.5" in body["detail"]
    status, body = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": "cat AND"})
    assert status == 422 and "position 7" in body["detail"]
    status, body = _call(server, "/sdapi/v1/txt2img", {"prompt": "x", "negative_prompt": "blurry\nmask: cat",
                                                       "steps": 1, "width": 64, "height": 64})
    assert status == 422 and body["detail"].startswith("negative_prompt: the negative prompt has a 'mask:' line")
    status, body = _call(server, "/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "steps": 1, "width": 64,
                                                       "height": 64, "hr_negative_prompt": "mask: cat"})
    assert status == 422 and body["detail"].startswith("hr_negative_prompt: the negative prompt has a 'mask:' line")
    status, body = _call(server, "/sdapi/v1/img2img", {"prompt": "mask: cat", "init_images": [_b64(IMAGE)] * 2,
                                                       "steps": 1})
    assert status == 422 and body["detail"].startswith("init_images: img2img got 2 init images")


def test_bad_settings_are_422_and_not_stored(server):
    """The host stores whatever /sdapi/v1/options is sent (an unknown key is its KeyError, a 500)."""
    for body, detail in (({"ldznet_timestep": "abc", "ldznet_threshold": 0.3},
                          "Settings > LD-ZNet: ldznet_timestep must be an integer in [-1, 999], got 'abc'"),
                         ({"ldznet_treshold": 0.3}, "Settings > LD-ZNet has no setting 'ldznet_treshold'")):
        status, answer = _call(server, "/sdapi/v1/options", body)
        assert status == 422 and answer["detail"].startswith(detail)
    status, options = _call(server, "/sdapi/v1/options")
    assert status == 200 and options["ldznet_timestep"] == -1 and options["ldznet_threshold"] != 0.3


def test_infotext_round_trip_through_png_info(server):
    status, result = _call(server, "/sdapi/v1/img2img", {
        "init_images": [_b64(IMAGE)], "prompt": "mask: cat{+2} OR dog", "steps": 1, "width": 128, "height": 96,
        "alwayson_scripts": {"ld-znet mask": {"args": ["", "zero-shot", 0.4, 3, 1, True, "replace"]}}})
    assert status == 200
    status, parsed = _call(server, "/sdapi/v1/png-info", {"image": result["images"][0]})
    assert status == 200
    from ldznet_ext.job import MaskJob
    from ldznet_ext.webui.request import from_infotext

    assert from_infotext(parsed["parameters"]) == MaskJob("cat{+2} OR dog", "zero-shot", 0.4, 3, 1, True)
    assert parsed["parameters"]["Prompt"] == ""


def test_an_api_request_infotext_sets_the_args_as_png_info_does(server):
    """An API request's ``infotext`` reaches our args through the fields PNG Info pastes with: each value
    checked ("false" is False, where the host's own conversion ticks a checkbox: bool("false"))."""
    infotext = ("a photo\nSteps: 1, Size: 128x96, LD-ZNet mask: cat, LD-ZNet mode: zero-shot, LD-ZNet threshold: 0.4, "
                "LD-ZNet grow: 3, LD-ZNet invert: false, LD-ZNet refine: False")
    status, result = _call(server, "/sdapi/v1/img2img", {"init_images": [_b64(IMAGE)], "infotext": infotext})
    assert status == 200, result
    status, parsed = _call(server, "/sdapi/v1/png-info", {"image": result["images"][0]})
    assert status == 200
    from ldznet_ext.job import MaskJob
    from ldznet_ext.webui.request import from_infotext

    assert from_infotext(parsed["parameters"]) == MaskJob("cat", "zero-shot", 0.4, 3, refine=False)


MASK_ARGS = ["", "LD-ZNet head", 0.5, 0, 0, False, "replace", True, 0, 0, 1.0, 0, True]


def _txt2img(server: str, detail: list) -> dict:
    payload = {"prompt": "a photo", "steps": 2, "width": 128, "height": 96, "seed": 3, "sampler_name": "Euler",
               "alwayson_scripts": {"LD-ZNet mask": {"args": [*MASK_ARGS, *detail]}}}
    status, result = _call(server, "/sdapi/v1/txt2img", payload)
    assert status == 200, result
    return result


def test_detail_pass_that_finds_nothing_says_so(server):
    """txt2img with a detail pass whose expression selects nothing: the image is as generated without
    the pass, and the infotext says why."""
    result = _txt2img(server, ["cat[9]", "", 0.6, 2, 8])
    info = json.loads(result["info"])
    assert "LD-ZNet detail warning" in info["infotexts"][0]
    assert np.array_equal(_png(result["images"][0]), _png(_txt2img(server, [])["images"][0]))


TEST_LORA = "ldznet-test-lora"


def write_test_lora(model: Path, webui: Path, scale: float) -> None:
    """A kohya-format LoRA ``TEST_LORA`` (rank 4, random deltas of about ``scale``) on every linear layer
    of ``model``'s UNet transformers and text encoder, in ``webui/models/Lora``. The UNet keys take the
    compvis form both WebUIs read (``lora_unet_input_blocks_...``), so any UNet layout works."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefixes = {"model.diffusion_model.": "lora_unet_", "cond_stage_model.transformer.text_model.": "lora_te_text_model_"}
    g, weights = torch.Generator().manual_seed(11), {}
    with safe_open(str(model), "pt") as checkpoint:
        for key in checkpoint.keys():
            shape = checkpoint.get_slice(key).get_shape()
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None or len(shape) != 2 or not key.endswith(".weight") or "embedding" in key \
                    or ("transformer_blocks" not in key and "encoder.layers" not in key):
                continue
            name = prefixes[prefix] + key[len(prefix):-len(".weight")].replace(".", "_")
            weights[f"{name}.lora_down.weight"] = torch.randn(4, shape[1], generator=g) * scale ** 0.5
            weights[f"{name}.lora_up.weight"] = torch.randn(shape[0], 4, generator=g) * scale ** 0.5 / 2
            weights[f"{name}.alpha"] = torch.tensor(4.0)
    (webui / "models" / "Lora").mkdir(parents=True, exist_ok=True)
    save_file(weights, str(webui / "models" / "Lora" / f"{TEST_LORA}.safetensors"))


def check_masks_ignore_the_last_generations_lora(base: str, image: Image.Image, width: int, height: int,
                                                 mode: str = "LD-ZNet head") -> None:
    """A mask (in ``mode``) taken after a generation with ``TEST_LORA`` equals one taken before, while the
    LoRA changes generations; the next generation with the LoRA is the one it was before the mask."""
    request = {"image": _b64(image), "expression": "cat", "presence": False, "mode": mode}

    def generate(prompt: str) -> np.ndarray:
        status, result = _call(base, "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": width,
                                                           "height": height, "seed": 3, "sampler_name": "Euler"})
        assert status == 200, result
        assert "Networks with errors" not in json.loads(result["info"])["infotexts"][0]
        return _png(result["images"][0])

    status, before = _call(base, "/ldznet/v1/mask", request)
    assert status == 200, before
    plain = generate("a photo")
    styled = generate(f"a photo <lora:{TEST_LORA}:1>")
    assert not np.array_equal(plain, styled)  # the LoRA is applied to generations
    status, after = _call(base, "/ldznet/v1/mask", request)
    assert status == 200 and after["probability"] == before["probability"] and after["mask"] == before["mask"]
    assert np.array_equal(generate(f"a photo <lora:{TEST_LORA}:1>"), styled)
    assert np.array_equal(generate("a photo"), plain)


def test_masks_ignore_the_last_generations_lora(server):
    """A1111 applies a prompt's <lora:...> after the scripts ran and leaves it applied after the generation;
    masks come from the checkpoint alone."""
    write_test_lora(Path(WEBUI) / "models" / "Stable-diffusion" / "ldznet-test-sd.safetensors", Path(WEBUI), 0.09)
    check_masks_ignore_the_last_generations_lora(server, IMAGE, 128, 96)


def test_extra_network_tags_on_the_mask_line_stay_with_the_prompt(server):
    """``mask: cat <lora:...>``: the tag is the generation's, so the image equals the one whose tag stands in
    the prompt line, and the mask is the one of ``cat``."""
    write_test_lora(Path(WEBUI) / "models" / "Stable-diffusion" / "ldznet-test-sd.safetensors", Path(WEBUI), 0.09)
    images = []
    # A1111 samples an img2img's init latent from the global torch RNG, which only the previous generation
    # seeded: the first img2img after the WebUI starts differs from later identical ones, so it only warms up.
    for prompt in (f"a photo <lora:{TEST_LORA}:1>\nmask: cat", f"a photo\nmask: cat <lora:{TEST_LORA}:1>",
                   f"a photo <lora:{TEST_LORA}:1>\nmask: cat"):
        status, result = _call(server, "/sdapi/v1/img2img", {
            "init_images": [_b64(IMAGE)], "prompt": prompt, "steps": 2, "width": 128, "height": 96, "seed": 1,
            "sampler_name": "Euler", "denoising_strength": 0.5, "mask_blur": 0, "inpaint_full_res": False,
            "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", 0.5, *[None] * 9, False]}}})
        assert status == 200, result
        infotext = json.loads(result["info"])["infotexts"][0]
        prompt_part, parameters = infotext.split("\nSteps: ")
        assert f"<lora:{TEST_LORA}:1>" in prompt_part and "mask" not in prompt_part and "LD-ZNet mask: cat," in parameters
        images.append([_png(image) for image in result["images"]])
    assert len(images[1]) == 2 and all(np.array_equal(a, b) for a, b in zip(images[1], images[2]))


CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READ_IMAGES = """async (selector) => Promise.all(Array.from(gradioApp().querySelectorAll(selector)).map(async img => {
    const blob = await (await fetch(img.src)).blob();
    return await new Promise(done => {
        const reader = new FileReader();
        reader.onload = () => done(reader.result);
        reader.readAsDataURL(blob);
    });
}))"""
"""The pixels of every <img> that ``selector`` matches, as data URLs (data:, file= and blob: sources alike)."""


@contextmanager
def _browser_page(base: str) -> Iterator:
    """A headless Chromium page on the WebUI at ``base``, the WebUI loaded; ``page.errors``: page errors
    raised by this extension's code (the host's own page errors are left out)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = os.environ.get("LDZNET_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        pytest.skip("no Chromium: set LDZNET_CHROMIUM")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.errors = []
            page.on("pageerror", lambda error: "ldznet" in (error.stack or "") and page.errors.append(error.stack))
            page.goto(base)
            page.wait_for_selector("#txt2img_send_to_ldznet_inpaint", state="attached", timeout=180_000)
            yield page
        finally:
            browser.close()


@pytest.fixture
def page(server):
    """A browser page on the A1111 server (:func:`_browser_page`)."""
    with _browser_page(server) as page:
        yield page


@pytest.fixture
def forge_page(forge):
    """A browser page on the Forge server (:func:`_browser_page`)."""
    with _browser_page(forge) as page:
        yield page


def _read(page, selector: str) -> list[np.ndarray]:
    return [_png(url.split(",", 1)[1]) for url in page.evaluate(READ_IMAGES, selector)]


def _generate_and_ask_for_cat(page) -> np.ndarray:
    """txt2img of "a photo" at 128 x 96 in one step; then the accordion opened, its expression "cat" and
    presence off (a random head's maps are weak). Returns the generated image."""
    page.locator("#txt2img_prompt textarea").fill("a photo")
    for name, value in (("steps", "1"), ("width", "128"), ("height", "96")):
        page.locator(f"#txt2img_{name} input[type=number]").fill(value)
    page.locator("#txt2img_generate").click()
    page.wait_for_selector("#txt2img_gallery img", timeout=300_000)
    generated = _read(page, "#txt2img_gallery img")[0]
    page.locator("#script_txt2img_ldznet_mask_accordion .label-wrap").first.click()  # not the nested Detail pass
    page.locator("#script_txt2img_ldznet_mask_expression textarea").fill("cat")
    page.locator("#script_txt2img_ldznet_mask_presence input").uncheck()
    return generated


def _send_to_inpaint(page) -> tuple[np.ndarray, np.ndarray]:
    """Click the txt2img results row's 🎭 button: img2img > Inpaint upload opens; returns its image and
    mask once both are there, and the accordion says the mask of cat was sent."""
    page.locator("#txt2img_send_to_ldznet_inpaint").click()
    page.wait_for_function("get_tab_index('tabs') == 1 && get_tab_index('mode_img2img') == 4 && "
                           "!!gradioApp().querySelector('#img_inpaint_mask img')", timeout=300_000)
    base, mask = _read(page, "#img_inpaint_base img")[0], _read(page, "#img_inpaint_mask img")[0]
    status = page.evaluate("gradioApp().querySelector('#script_txt2img_ldznet_mask_status').innerText")
    assert "sent to Inpaint upload with the mask of cat" in status
    return base, mask


def test_send_to_inpaint_button_in_the_browser(server, page):
    """txt2img -> the accordion's expression -> the results-row button: img2img > Inpaint upload
    opens with the generated image, its mask and its size, and an img2img generation inpaints with that mask."""
    generated = _generate_and_ask_for_cat(page)
    base, mask = _send_to_inpaint(page)
    size = [page.locator(f"#img2img_{name} input[type=number]").input_value() for name in ("width", "height")]
    assert size == ["128", "96"]  # opts.send_size, as with the host's own send buttons
    assert generated.shape == base.shape == (96, 128, 3) and np.array_equal(base, generated)
    code, direct = _call(server, "/ldznet/v1/mask", {"image": _b64(Image.fromarray(base)), "expression": "cat",
                                                     "presence": False})
    assert code == 200 and mask.shape == (96, 128) and np.array_equal(mask, _png(direct["mask"])) and mask.any()

    # Generate from the filled tab: the mask the WebUI inpainted with (opts.return_mask) is ours.
    page.locator("#img2img_steps input[type=number]").fill("1")
    page.locator("#img2img_mask_blur input[type=number]").fill("0")
    page.locator("#img2img_generate").click()
    page.wait_for_function("gradioApp().querySelectorAll('#img2img_gallery .thumbnail-item').length >= 2",
                           timeout=300_000)
    outputs = _read(page, "#img2img_gallery .thumbnail-item img")
    assert any(o.shape == (96, 128, 3) and np.array_equal(o[..., 0], mask) for o in outputs)
    assert page.errors == []


def _accordion_values(page, tab: str) -> dict:
    """Some controls of ``tab``'s accordion as the page shows them."""
    control = f"#script_{tab}_ldznet_mask_"
    return {"expression": page.locator(f"{control}expression textarea").input_value(),
            **{name: page.locator(f"{control}{name} input[type=number]").input_value()
               for name in ("threshold", "grow", "min_area")},
            **{name: page.locator(f"{control}{name} input").is_checked() for name in ("invert", "presence")}}


def test_png_info_paste_in_the_browser(server, page):
    """The prompt's paste button (↙️) on an edited infotext: each value is checked as the job checks
    it ("false" unticks, "nan" leaves the slider and is named), a grow beyond the slider's range kept."""
    page.locator("#script_txt2img_ldznet_mask_accordion .label-wrap").first.click()
    page.locator("#script_txt2img_ldznet_mask_invert input").check()
    page.locator("#txt2img_prompt textarea").fill(
        "a photo\nSteps: 1, LD-ZNet mask: cat, LD-ZNet threshold: nan, LD-ZNet grow: 100, LD-ZNet invert: false, "
        "LD-ZNet min area: 40, LD-ZNet presence: False")
    page.locator("#txt2img_tools #paste").click()
    page.wait_for_function("gradioApp().querySelector('#script_txt2img_ldznet_mask_status').innerText.includes('PNG')",
                           timeout=60_000)
    assert _accordion_values(page, "txt2img") == {"expression": "cat", "threshold": "0.5", "grow": "100",
                                                  "min_area": "40", "invert": False, "presence": False}
    status = page.evaluate("gradioApp().querySelector('#script_txt2img_ldznet_mask_status').innerText")
    assert status == "PNG Info: not restored: LD-ZNet threshold: threshold must be a number in [0, 1), got 'nan'"
    assert page.errors == []


def test_send_to_img2img_carries_the_accordion_in_the_browser(server, page):
    """txt2img's "Send to img2img" copies every control of the accordion, as the host copies its own."""
    _generate_and_ask_for_cat(page)
    page.locator("#script_txt2img_ldznet_mask_grow input[type=number]").fill("5")
    page.locator("#script_txt2img_ldznet_mask_min_area input[type=number]").fill("40")
    page.locator("#script_txt2img_ldznet_mask_invert input").check()
    page.locator("#txt2img_send_to_img2img").click()
    page.wait_for_function("get_tab_index('tabs') == 1", timeout=60_000)
    page.wait_for_function("gradioApp().querySelector('#script_img2img_ldznet_mask_expression textarea').value == 'cat'",
                           timeout=60_000)
    assert _accordion_values(page, "img2img") == {"expression": "cat", "threshold": "0.5", "grow": "5",
                                                  "min_area": "40", "invert": True, "presence": False}
    assert page.errors == []


def test_detail_pass_accordion_in_the_browser(server, page, tmp_path):
    """The detail pass's controls in the txt2img accordion; a screenshot goes to LDZNET_SCREENSHOT_DIR
    (docs/webui-detail-pass.png) when that is set."""
    page.locator("#script_txt2img_ldznet_mask_accordion .label-wrap").first.click()
    page.locator("#script_txt2img_ldznet_mask_detail .label-wrap").first.click()
    page.locator("#script_txt2img_ldznet_mask_detail_expression textarea").fill("face[1,2]")
    page.locator("#script_txt2img_ldznet_mask_detail_prompts textarea").fill(
        "a smiling face, detailed skin [SEP] an old man's face")
    accordion = page.locator("#script_txt2img_ldznet_mask_accordion")
    for name in ("denoising", "steps", "padding"):
        assert page.locator(f"#script_txt2img_ldznet_mask_detail_{name} input[type=number]").count() == 1
    folder = Path(os.environ.get("LDZNET_SCREENSHOT_DIR") or tmp_path)
    accordion.screenshot(path=str(folder / "webui-detail-pass.png"))
    assert page.errors == []


def test_tab_masks_a_folder_in_the_browser(server, page, tmp_path):
    """The LD-ZNet tab on the real host (its shared.state, queue lock and gradio): masks and
    previews for a folder, then a rerun that skips them."""
    images = [IMAGE, IMAGE.transpose(Image.FLIP_LEFT_RIGHT)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"img{i}.png")
    page.evaluate("() => { for (const b of gradioApp().querySelectorAll('#tabs > .tab-nav button')) "
                  "if (b.innerText.trim() == 'LD-ZNet') b.click(); }")
    page.locator("#ldznet_tab_input textarea").fill(str(tmp_path))
    page.locator("#ldznet_tab_output textarea").fill(str(tmp_path / "masks"))
    page.locator("#ldznet_tab_expression textarea").fill("cat")
    status = "gradioApp().querySelector('#tab_ldznet .ldznet-status, #tab_ldznet .ldznet-error')?.innerText || ''"
    for expected in (r"2 masked( \(\d of them empty\))?, 0 skipped, 0 failed", "0 masked, 2 skipped, 0 failed"):
        page.evaluate("() => { const s = gradioApp().querySelector('#tab_ldznet .ldznet-status'); if (s) s.remove(); }")
        page.locator("#ldznet_tab_run").click()
        page.wait_for_function(f"({status}).includes('masked')", timeout=300_000)
        assert re.search(expected, page.evaluate(status))
        if expected.startswith("2 masked"):
            assert len(_read(page, "#ldznet_tab_gallery .thumbnail-item img")) == 2
    for i, image in enumerate(images):
        code, direct = _call(server, "/ldznet/v1/mask", {"image": _b64(image), "expression": "cat"})
        assert code == 200 and np.array_equal(np.asarray(Image.open(tmp_path / "masks" / f"img{i}.png")),
                                              _png(direct["mask"]))
    assert page.errors == []


def _forge_image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((96, 128, 3)) * 255).astype(np.uint8))


def test_forge_routes_and_validation(forge):
    status, version = _call(forge, "/ldznet/v1/version")
    assert status == 200 and version["host"] == "forge" and version["head"] == FORGE_HEAD
    payload = {"init_images": [_b64(_forge_image())], "prompt": "x", "steps": 1,
               "alwayson_scripts": {"ld-znet mask": {"args": ["cat", "LD-ZNet head", 1.5]}}}
    status, body = _call(forge, "/sdapi/v1/img2img", payload)
    assert status == 422 and "threshold must be a number in [0, 1), got 1.5" in body["detail"]
    status, body = _call(forge, "/ldznet/v1/mask", {"image": _b64(_forge_image()), "expression": "cat AND"})
    assert status == 422 and "position 7" in body["detail"]
    status, body = _call(forge, "/sdapi/v1/txt2img", {"prompt": "x", "negative_prompt": "blurry\nmask: cat",
                                                      "steps": 1, "width": 64, "height": 64})
    assert status == 422 and body["detail"].startswith("negative_prompt: the negative prompt has a 'mask:' line")


def test_forge_scripts_that_read_the_mask_in_process_see_ours(forge):
    """As in A1111 (test_scripts_that_read_the_mask_in_process_see_ours), with Forge's built-in Soft
    Inpainting; its built-in ControlNet reads the mask at the same point and is ordered the same way."""
    _soft_inpainting_sees_the_mask(forge, _forge_image(), 0.0)


def test_forge_has_the_xyz_plot_axes(forge):
    """Forge's X/Y/Z plot lists our axes as A1111's does (test_xyz_plot_axes_set_each_cell_s_mask)."""
    for is_img2img in (False, True):
        assert [label for label in _xyz_axis_labels(forge, is_img2img) if label.startswith("[LD-ZNet]")] == XYZ_AXES


def test_forge_mask_line_masks_img2img(forge):
    """The head on Forge's UNet (the feature tap on its own modules): the route's mask is the one
    img2img inpaints with when the prompt says ``mask: cat``. The random head's maps are weak, so presence
    (on by default) would drop "cat": it is off here, as in the A1111 tests."""
    image = _forge_image()
    status, first = _call(forge, "/ldznet/v1/mask", {"image": _b64(image), "expression": "cat", "presence": False})
    assert status == 200, first
    probability = _png(first["probability"]) / 65535
    assert probability.shape == (96, 128) and probability.max() > probability.min()
    threshold = round(float(probability.min() + probability.max()) / 2, 4)  # a random head: both sides occupied
    status, direct = _call(forge, "/ldznet/v1/mask",
                           {"image": _b64(image), "expression": "cat", "threshold": threshold, "presence": False})
    assert status == 200 and 0 < direct["coverage"] < 1
    payload = {"init_images": [_b64(image)], "prompt": "a photo\nmask: cat", "steps": 2, "width": 128, "height": 96,
               "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.5, "mask_blur": 0, "inpaint_full_res": False,
               "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", threshold, *[None] * 9, False]}}}
    status, result = _call(forge, "/sdapi/v1/img2img", payload)
    assert status == 200, result
    infotext = json.loads(result["info"])["infotexts"][0]
    assert infotext.startswith("a photo\n") and "LD-ZNet mask: cat" in infotext
    used = _png(result["images"][-1])  # opts.return_mask
    assert np.array_equal(used[..., 0] if used.ndim == 3 else used, _png(direct["mask"]))
    status, parsed = _call(forge, "/sdapi/v1/png-info", {"image": result["images"][0]})
    from ldznet_ext.job import MaskJob
    from ldznet_ext.webui.request import from_infotext

    assert status == 200 and from_infotext(parsed["parameters"]) == MaskJob("cat", threshold=threshold, presence=False)


def test_forge_masks_ignore_the_last_generations_lora(forge):
    """Forge keeps the last generation's LoRA patchers in ``forge_objects``; masks run on the unpatched parts."""
    forge_dir = Path(FORGE)
    write_test_lora(forge_dir / "models" / "Stable-diffusion" / FORGE_SD, forge_dir, 0.01)
    check_masks_ignore_the_last_generations_lora(forge, _forge_image(), 64, 64)


def test_forge_detail_pass_inpaints_the_instance_and_nothing_else(forge):
    """The detail pass inside Forge (its own img2img processing for the inpaint): ``cat[1]`` on a txt2img
    result is repainted inside that instance's padded crop and nowhere else; same seed, same image. The
    random head's map is nearly flat, so it is thresholded at its 99th percentile (no refinement): the
    leftmost instance is a small part of the image. (That each instance is repainted in full is the
    A1111 detail test's, with a head that finds real objects.)"""
    from ldznet_ext.detail import crop_box

    generation = {"prompt": "a photo", "steps": 2, "width": 128, "height": 96, "seed": 5, "sampler_name": "Euler"}

    def txt2img(mask_args: list, detail: list) -> tuple[np.ndarray, dict]:
        status, result = _call(forge, "/sdapi/v1/txt2img", {
            **generation, "alwayson_scripts": {"LD-ZNet mask": {"args": [*mask_args, *detail]}}})
        assert status == 200, result
        return _png(result["images"][0]), result

    plain, _ = txt2img([], [])
    request = {"image": _b64(Image.fromarray(plain)), "expression": "cat", "presence": False, "refine": False}
    status, first = _call(forge, "/ldznet/v1/mask", request)
    assert status == 200, first
    threshold = round(float(np.quantile(_png(first["probability"]) / 65535, 0.99)), 4)
    status, masked = _call(forge, "/ldznet/v1/mask", {**request, "expression": "cat[1]", "threshold": threshold,
                                                      "instances": True})
    assert status == 200 and len(masked["instances"]) == 1, masked
    x0, y0, x1, y1 = box = crop_box(_png(masked["instances"][0]["mask"]), 8)
    assert (x1 - x0) * (y1 - y0) < 0.5 * 128 * 96, box  # a crop, not the whole image

    mask_args = ["", "LD-ZNet head", threshold, 0, 0, False, "replace", False, 0, 0, 1.0, 0, False]
    detail = ["cat[1]", "", 0.6, 2, 8]
    detailed, result = txt2img(mask_args, detail)
    infotext = json.loads(result["info"])["infotexts"][0]
    assert "LD-ZNet detail: cat[1]" in infotext and "LD-ZNet detail warning" not in infotext
    changed = np.abs(detailed.astype(int) - plain.astype(int)).max(axis=2) > 0
    assert changed[y0:y1, x0:x1].any()
    changed[y0:y1, x0:x1] = False
    assert not changed.any()
    assert np.array_equal(txt2img(mask_args, detail)[0], detailed)


def test_forge_send_to_inpaint_button_in_the_browser(forge, forge_page):
    """Forge's gradio 4 page: txt2img -> the accordion's expression and threshold -> the results-row button:
    img2img > Inpaint upload opens with the generated image and the mask /ldznet/v1/mask gives for it. The
    random head's map lies near 0.42, so the threshold is set there."""
    page = forge_page
    generated = _generate_and_ask_for_cat(page)
    threshold = page.locator("#script_txt2img_ldznet_mask_threshold input[type=number]")
    threshold.fill("0.42")
    threshold.press("Enter")
    base, mask = _send_to_inpaint(page)
    assert base.shape[:2] == (96, 128) and np.array_equal(base, generated)
    code, direct = _call(forge, "/ldznet/v1/mask", {"image": _b64(Image.fromarray(base)), "expression": "cat",
                                                    "presence": False, "threshold": 0.42})
    assert code == 200 and mask.shape == (96, 128) and np.array_equal(mask, _png(direct["mask"]))
    assert 0 < (mask > 127).mean() < 1
    assert page.errors == []


def test_forge_reads_a_textual_inversion_term_where_its_text_engine_puts_the_vector(forge):
    """As on A1111: the one-vector embedding of "cat" makes the zero-shot map of "cat"."""
    maps = []
    for term in ("cat", KITTY):
        status, body = _call(forge, "/ldznet/v1/mask", {"image": _b64(_forge_image(1)), "expression": term,
                                                        "mode": "zero-shot", "presence": False})
        assert status == 200, body
        maps.append(_png(body["probability"]))
    assert maps[0].std() > 0 and np.array_equal(maps[0], maps[1])


def test_forge_zero_shot_leaves_the_next_generation_unchanged(forge):
    generation = {"prompt": "a photo", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}
    status, before = _call(forge, "/sdapi/v1/txt2img", generation)
    assert status == 200, before
    status, mask = _call(forge, "/ldznet/v1/mask", {"image": _b64(_forge_image(1)), "expression": "cat OR dog",
                                                      "mode": "zero-shot"})
    assert status == 200 and np.ptp(_png(mask["probability"])) > 0
    status, after = _call(forge, "/sdapi/v1/txt2img", generation)
    assert status == 200 and np.array_equal(_png(after["images"][0]), _png(before["images"][0]))
