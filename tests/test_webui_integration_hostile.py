"""Opt-in, like test_webui_integration.py (LDZNET_WEBUI_DIR): seeded random hostile requests against the
real A1111 with the extension (``_hostile_forge.py``: the mask route in Forge). Every answer to our route and to generations carrying our script args is
200, or a 4xx whose ``detail`` is one line; never a 500. The host's own fields (init images, sizes) stay
valid: how the host answers those is its own. About a minute on a CPU.
"""
from __future__ import annotations

import base64
import io
import json
import random

from PIL import Image
from test_webui_integration import IMAGE, _b64, _call, server  # noqa: F401 (the fixture)

# Values of the wrong type, out of range, huge, empty, malformed expressions, non-ASCII.
ODD_VALUES = (None, True, False, 0, -1, 1e308, 1e-300, 2**70, -2**70, "", "x" * 4000, "cat OR", "cat[0]",
              "cat[99999999999999999999]", [1, 2], {"a": 1}, "\u2603" * 3, "nan", "inf", "1e400", -5, 10**6)
JOB_FIELDS = ("mode", "threshold", "grow", "feather", "invert", "combine", "refine", "keep_largest", "min_area",
              "refine_strength", "refine_radius", "presence", "instances", "mask")
GOOD_SCRIPT_ARGS = ["cat", "LD-ZNet head", 0.5, 0, 0, False, "replace", True, 0, 0, 1.0, 0, False,
                    "cat[1]", "a [SEP] b", 0.5, 1, 4]


def _odd_image(rng: random.Random):
    tiny = io.BytesIO()
    Image.new("RGB", (rng.randrange(1, 40), rng.randrange(1, 40))).save(tiny, "PNG")
    return rng.choice([_b64(IMAGE), base64.b64encode(tiny.getvalue()).decode(), "data:image/png;base64," + _b64(IMAGE),
                       "!!!", "", base64.b64encode(b"GIF89a" + bytes(30)).decode(),
                       base64.b64encode(tiny.getvalue()[:40]).decode(), 5])


def _check(status: int, body, request) -> None:
    assert status < 500, (request, status, body)
    if status != 200:
        detail = body.get("detail") if isinstance(body, dict) else None
        assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, (request, status, body)


def hostile_mask_requests(base: str) -> None:
    """300 seeded hostile requests to ``base``'s /ldznet/v1/mask."""
    rng = random.Random(7)
    statuses = set()
    for _ in range(300):
        payload = {"image": _odd_image(rng), "expression": rng.choice(["cat", "cat OR dog", "cat[1]", "", 3, None])}
        for field in rng.sample(JOB_FIELDS, rng.randrange(0, 5)):
            payload[field] = rng.choice(ODD_VALUES) if rng.random() < 0.7 else _odd_image(rng)
        if rng.random() < 0.1:
            payload = rng.choice([[], "x", 5, False])
        status, body = _call(base, "/ldznet/v1/mask", payload)
        _check(status, body, payload)
        statuses.add(status)
    assert statuses == {200, 422}  # both answers were reached


def test_hostile_mask_requests(server):
    hostile_mask_requests(server)


def test_hostile_script_args(server):
    rng = random.Random(12)
    statuses = set()
    for _ in range(250):
        args = list(GOOD_SCRIPT_ARGS)
        for _ in range(rng.randrange(1, 3)):
            args[rng.randrange(len(args))] = rng.choice(ODD_VALUES + ("zero-shot", "cat OR dog[2]", 0.99))
        route = rng.choice(["img2img", "txt2img"])
        payload = {"prompt": rng.choice(["a photo", "a photo\nmask: cat", "mask: ", "mask: cat\nmask: dog"]),
                   "steps": 1, "width": 64, "height": 64,
                   "alwayson_scripts": {"LD-ZNet mask": {"args": args[:rng.randrange(1, len(args) + 1)]}}}
        if route == "img2img":
            payload["init_images"] = [_b64(IMAGE)]
        status, body = _call(server, f"/sdapi/v1/{route}", payload)
        _check(status, body, payload)
        if status == 200:
            assert "Traceback" not in " ".join(json.loads(body["info"])["infotexts"]), payload
        statuses.add(status)
    assert statuses == {200, 422}


SETTINGS = ("ldznet_head", "ldznet_mask_model", "ldznet_timestep", "ldznet_resolution", "ldznet_threshold",
            "ldznet_keep_on_gpu", "ldznet_cuda_graphs", "ldznet_dtype", "ldznet_save_masks", "ldznet_unknown")


def test_hostile_override_settings(server):
    """A generation's override_settings sets LD-ZNet settings for its job: odd values of each, an unknown
    key, and a mask line in either negative prompt; good settings must still generate."""
    rng = random.Random(21)
    statuses = set()
    for _ in range(120):
        overrides = {key: rng.choice(ODD_VALUES + ("ldznet-test-head.safetensors", "fp16", 64, 400))
                     for key in rng.sample(SETTINGS, rng.randrange(0, 3))}
        payload = {"prompt": rng.choice(["a photo", "a photo\nmask: cat"]), "steps": 1, "width": 64, "height": 64,
                   "init_images": [_b64(IMAGE)], "override_settings": overrides,
                   "override_settings_restore_afterwards": True,
                   rng.choice(["negative_prompt", "hr_negative_prompt"]): rng.choice(["", "blurry", "mask: cat"]),
                   "alwayson_scripts": {"LD-ZNet mask": {"args": ["", "LD-ZNet head", 0.5]}}}
        status, body = _call(server, "/sdapi/v1/img2img", payload)
        _check(status, body, payload)
        if status == 200:
            assert "Traceback" not in " ".join(json.loads(body["info"])["infotexts"]), payload
        statuses.add(status)
    assert statuses == {200, 409, 422}  # 409: a head file named but not there, as on /ldznet/v1/mask
