"""The WebUI's pure parts: script args, infotext, the prompt's mask line, combine modes, API checks."""
from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from ldznet_ext.errors import ExpressionError, LdznetError
from ldznet_ext.webui import api
from ldznet_ext.webui.request import INFOTEXT_KEYS, MaskRequest, combine, split_mask_line


@pytest.mark.parametrize("prompt, rest, expression", [
    ("a goblin\nmask: goblin", "a goblin", "goblin"),
    ("mask: goblin OR  sword\na goblin with a sword", "a goblin with a sword", "goblin OR sword"),
    ("a\n  MASK : cat{+4}\nb", "a\nb", "cat{+4}"),
    ("a masked ball, mask: no line start", "a masked ball, mask: no line start", None),
    ("no mask here", "no mask here", None),
])
def test_split_mask_line(prompt, rest, expression):
    assert split_mask_line(prompt) == (rest, expression)


@pytest.mark.parametrize("prompt, message", [("mask: a\nmask: b", "2 'mask:' lines"), ("x\nmask:  ", "empty")])
def test_split_mask_line_errors(prompt, message):
    with pytest.raises(LdznetError, match=message):
        split_mask_line(prompt)


def test_infotext_round_trip():
    request = MaskRequest("goblin OR sword{+4}", "zero-shot", 0.35, -3, 2.5, True, "subtract", False)
    params = request.infotext()
    assert params == {"LD-ZNet mask": "goblin OR sword{+4}", "LD-ZNet mode": "zero-shot", "LD-ZNet threshold": "0.35",
                      "LD-ZNet grow": "-3", "LD-ZNet feather": "2.5", "LD-ZNet invert": "True",
                      "LD-ZNet combine": "subtract", "LD-ZNet refine": "False"}
    assert MaskRequest.from_infotext(params) == request
    assert MaskRequest.from_infotext({"Steps": "20"}) is None
    assert set(INFOTEXT_KEYS.values()) == set(params)


def test_from_args_defaults_and_strings():
    assert MaskRequest.from_args(["cat"]) == MaskRequest("cat")
    assert MaskRequest.from_args(["cat", None, "0.25", None, None, "false"]) == MaskRequest("cat", threshold=0.25)
    assert MaskRequest.from_args([]).active is False
    assert MaskRequest.from_args(["cat"]).refine_settings().enabled  # refinement is on unless switched off
    assert not MaskRequest.from_args(["cat", *[None] * 6, "false"]).refine_settings().enabled


@pytest.mark.parametrize("args, message", [
    ("cat", "args must be a list"),
    (["cat", "head"], "mode must be one of 'LD-ZNet head', 'zero-shot', got 'head'"),
    (["cat", "zero-shot", 1.0], r"threshold must be in \[0, 1\), got 1.0"),
    (["cat", "zero-shot", 0.5, 300], r"grow must be in \[-256, 256\], got 300"),
    (["cat", "zero-shot", 0.5, 0, -1], r"feather must be in \[0, 256\], got -1"),
    (["cat", "zero-shot", 0.5, 0, 0, "yes"], "invert must be true or false, got 'yes'"),
    (["cat", "zero-shot", 0.5, 0, 0, False, "xor"], "combine must be one of"),
    ([1], "expression \\(arg 0\\) must be text"),
    (["cat", "zero-shot", 0.5, 0, 0, False, "add", "on"], "refine must be true or false, got 'on'"),
    (["cat"] * 9, "got 9 args, expected at most 8"),
    (["cat OR"], "expected a term"),
])
def test_from_args_errors(args, message):
    with pytest.raises(LdznetError, match=message):
        MaskRequest.from_args(args)


def test_combine_modes_on_hand_arrays():
    ours = np.array([[0, 255, 255, 0, 128]], np.uint8)
    brush = np.array([[255, 255, 0, 0, 255]], np.uint8)
    assert combine(ours, brush, "replace").tolist() == [[0, 255, 255, 0, 128]]
    assert combine(ours, brush, "add").tolist() == [[255, 255, 255, 0, 255]]
    assert combine(ours, brush, "subtract").tolist() == [[0, 0, 255, 0, 0]]
    assert combine(ours, brush, "intersect").tolist() == [[0, 255, 0, 0, 128]]
    assert combine(ours, None, "intersect").tolist() == ours.tolist()
    with pytest.raises(LdznetError, match="brush mask is 2x1 but the image is 5x1"):
        combine(ours, brush[:, :2], "add")


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _ready(request):
    pass


def test_check_generation():
    args = {"alwayson_scripts": {"LD-ZNet Mask": {"args": ["cat", "zero-shot", 2]}}, "init_images": ["x"]}
    with pytest.raises(api.ApiError, match=r"alwayson_scripts\['ld-znet mask'\].args: threshold") as caught:
        api.check_generation(args, True, _ready)
    assert caught.value.status == 422
    with pytest.raises(api.ApiError, match="prompt: '\\(' is never closed"):
        api.check_generation({"prompt": "x\nmask: (cat", "init_images": ["x"]}, True, _ready)
    with pytest.raises(api.ApiError, match="needs init_images"):
        api.check_generation({"prompt": "mask: cat"}, True, _ready)
    with pytest.raises(api.ApiError, match="args must be a list"):
        api.check_generation({"alwayson_scripts": {"ld-znet mask": {"args": "cat"}}}, False, _ready)

    def not_ready(request):
        raise LdznetError(f"no head for {request.expression}")

    with pytest.raises(api.ApiError, match="no head for cat"):
        api.check_generation({"prompt": "mask: cat", "init_images": ["x"]}, True, not_ready)
    api.check_generation({"prompt": "no mask", "alwayson_scripts": {"other": {"args": [1]}}}, True, not_ready)


def test_mask_response_validation():
    image = _b64(Image.new("RGB", (8, 6)))
    cases = [({"image": image}, 422, "expression is required"),
             ({"image": image, "expression": "cat", "colour": 1}, 422, "unknown fields \\['colour'\\]"),
             ({"image": "!!", "expression": "cat"}, 422, "image is not valid base64"),
             ({"image": base64.b64encode(b"not a png").decode(), "expression": "cat"}, 422, "not an image"),
             ({"image": image, "expression": "cat", "mask": _b64(Image.new("L", (4, 4)))}, 422, "mask is 4x4"),
             ({"image": image, "expression": "cat", "threshold": -1}, 422, "threshold must be")]
    for payload, status, message in cases:
        with pytest.raises(api.ApiError, match=message) as caught:
            api.mask_response(payload, None, _ready)
        assert caught.value.status == status
    with pytest.raises(api.ApiError, match="pixels; the limit is 40") as caught:
        api.decode_image(image, "image", max_pixels=40)
    assert caught.value.status == 413


def _asgi(guard, path, body: bytes, headers=()):
    """Drive an ASGI app with one request; returns (status, body, body the inner app received)."""
    seen, sent = {}, []
    chunks = [body[:3], body[3:]]

    async def inner(scope, receive, send):
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen["body"] = b"".join(parts)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    guard.app = inner
    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], seen.get("body")


def test_api_guard():
    def check(payload, is_img2img):
        api.check_generation(payload, is_img2img, _ready)

    guard = api.ApiGuard(None, check, {"u": "p"}, max_bytes=100)
    auth = [(b"authorization", b"Basic " + base64.b64encode(b"u:p"))]
    good = json.dumps({"prompt": "cat"}).encode()
    assert _asgi(guard, "/sdapi/v1/img2img", good, auth) == (200, b"ok", good)
    bad = json.dumps({"alwayson_scripts": {"ld-znet mask": {"args": ["cat", "nope"]}}}).encode()
    status, body, seen = _asgi(guard, "/sdapi/v1/txt2img", bad, auth)
    assert (status, seen) == (422, None) and "mode must be one of" in json.loads(body)["detail"]
    assert _asgi(guard, "/sdapi/v1/txt2img", bad) == (200, b"ok", bad)  # the host's auth answers it
    assert _asgi(guard, "/ldznet/v1/mask", b"{}")[0] == 401
    assert _asgi(guard, "/ldznet/v1/mask", b"{}", auth) == (200, b"ok", b"{}")
    status, body, _ = _asgi(guard, "/ldznet/v1/mask", b"x" * 101, auth)
    assert status == 413 and "limit of 100 bytes" in json.loads(body)["detail"]
    assert _asgi(guard, "/sdapi/v1/img2img", b"not json", auth)[:2] == (200, b"ok")


def test_expression_error_position():
    with pytest.raises(ExpressionError) as caught:
        MaskRequest("cat AND")
    assert caught.value.position == 7
