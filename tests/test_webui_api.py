"""The HTTP side of the extension on the fake WebUI: ApiGuard in front of the host's API and its
--api-auth, image bodies of /ldznet/v1/mask, checks that answer before a generation starts."""
from __future__ import annotations

import asyncio
import base64
import html
import re
import io
import json
import struct
import sys
import zlib
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch
import pytest
from PIL import Image

from fake_webui import world  # puts the fake ``modules`` on sys.path

import modules.sd_models  # noqa: E402
import modules.shared  # noqa: E402
from modules import script_callbacks  # noqa: E402
from modules.api.api import Api  # noqa: E402

from ldznet_ext.errors import CheckpointError  # noqa: E402
from ldznet_ext.heads import load_head  # noqa: E402
from ldznet_ext.images import load_image  # noqa: E402
from ldznet_ext.job import MaskJob, with_grow  # noqa: E402
from ldznet_ext.masks.expression import parse  # noqa: E402
from ldznet_ext.masks.ops import MaskOptions  # noqa: E402
from ldznet_ext.outputs import render_overlay  # noqa: E402
from ldznet_ext.refine import RefineSettings  # noqa: E402
from ldznet_ext.segmenter import Segmenter, SegmenterSettings  # noqa: E402
from ldznet_ext.webui import api, host, register, request, ui  # noqa: E402
from ldznet_ext.world.scenes import make_scene  # noqa: E402

pytestmark = pytest.mark.usefixtures("every_term_found")  # option plumbing on tiny random models

BAD_ARGS = json.dumps({"prompt": "cat", "alwayson_scripts": {"ld-znet mask": {"args": ["cat", "nope"]}}}).encode()


def _basic(token: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Basic " + base64.b64encode(token))]


def _post(app, path: str, body: bytes, headers=()) -> tuple[int, dict]:
    """One POST through an ASGI app, the body in two chunks; (status, JSON body)."""
    chunks, sent = [body[:5], body[5:]], []

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


@pytest.fixture
def guarded(monkeypatch):
    """(ApiGuard over the host's API with --api-auth "u:p,v:q", the host's API)."""
    monkeypatch.setattr(modules.shared.cmd_opts, "api_auth", "u:p,v:q")
    host_api = Api()

    def check(payload, is_img2img):
        api.check_generation(payload, is_img2img, lambda request: None)

    return api.ApiGuard(host_api, check, api.parse_credentials(modules.shared.cmd_opts.api_auth)), host_api


@pytest.mark.parametrize("headers, detail", [
    ((), "Not authenticated"),
    ([(b"authorization", b"Bearer abc")], "Not authenticated"),
    (_basic(b"u:wrong"), "Incorrect username or password"),
    (_basic(b"nobody:p"), "Incorrect username or password"),
    (_basic(b"u"), "Invalid authentication credentials"),
    (_basic("u:p\u00e9".encode()), "Invalid authentication credentials"),
    ([(b"authorization", b"Basic !!!")], "Invalid authentication credentials"),
    ([*_basic(b"u:wrong"), *_basic(b"u:p")], "Incorrect username or password"),  # the host reads the first
])
def test_the_host_refuses_unauthenticated_generations_itself(guarded, headers, detail):
    """With --api-auth, a request the host would refuse reaches the host untouched: its 401, not our 422."""
    guard, host_api = guarded
    for path in api.GENERATION_ROUTES:
        status, body = _post(guard, path, BAD_ARGS, headers)
        assert (status, body["error"], body["detail"]) == (401, "HTTPException", detail)
    assert host_api.requests == []


def test_authenticated_generations_are_checked(guarded):
    guard, host_api = guarded
    for token in (b"u:p", b"v:q"):
        status, body = _post(guard, "/sdapi/v1/txt2img", BAD_ARGS, _basic(token))
        assert status == 422 and "mode must be one of" in body["detail"]
    good = json.dumps({"prompt": "a cat\nmask: cat"}).encode()
    assert _post(guard, "/sdapi/v1/txt2img", good, _basic(b"u:p"))[0] == 200
    assert host_api.requests == [{"prompt": "a cat\nmask: cat"}]
    assert _post(guard, "/ldznet/v1/mask", b"{}", _basic(b"u:wrong"))[0] == 401
    lower = [(b"authorization", b"basic " + base64.b64encode(b"u:p"))]  # the host takes the scheme in any case
    assert _post(guard, "/sdapi/v1/txt2img", BAD_ARGS, lower)[0] == 422


def test_a_token_without_a_colon_is_refused_even_for_an_empty_password():
    """The token "u" splits to user "u" and password "", which matched a stored "": the host refuses it."""
    def header(token: bytes) -> dict[str, str]:
        return {"authorization": "Basic " + base64.b64encode(token).decode()}

    assert api.authorized(header(b"u:"), {"u": ""})
    assert not api.authorized(header(b"u"), {"u": ""})


@pytest.mark.parametrize("body, detail", [
    (b"", "the body is not JSON (Expecting value: line 1 column 1 (char 0))"),
    (b'{"image": ', "the body is not JSON (Expecting value: line 1 column 11 (char 10))"),
    (b"\xff\xfe\xfd", "the body is not JSON ("),
    (b'"cat"', "the body must be a JSON object, got a string"),
    (b"5", "the body must be a JSON object, got a number"),
    (b"[]", "the body must be a JSON object, got a JSON list"),
    (b"null", "the body must be a JSON object, got null"),
    (b"[" * 100_000 + b"]" * 100_000, "the body is not JSON (nested too deeply)"),  # RecursionError
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "the body is not JSON (nested too deeply)"),
])
def test_a_mask_body_that_is_no_json_object_is_one_line(monkeypatch, body, detail):
    """Our words, not the route's list of FastAPI errors, and the host's API never sees the request."""
    monkeypatch.setattr(modules.shared.cmd_opts, "api_auth", None)
    host_api = Api()
    guard = api.ApiGuard(host_api, lambda payload, is_img2img: None, api.parse_credentials(None))
    status, answer = _post(guard, api.MASK_ROUTE, body)
    assert status == 422 and answer["detail"].startswith(detail) and "\n" not in answer["detail"]
    assert host_api.requests == []


def test_a_generation_body_nested_too_deeply_is_422(monkeypatch):
    """Our check reads the body first: JSON too deep for Python's parser (RecursionError, a 500 in the
    host's FastAPI too) is answered in one line, never an exception out of the middleware."""
    monkeypatch.setattr(modules.shared.cmd_opts, "api_auth", None)
    host_api = Api()
    guard = api.ApiGuard(host_api, lambda payload, is_img2img: api.check_generation(payload, is_img2img, None),
                         api.parse_credentials(None))
    status, answer = _post(guard, "/sdapi/v1/txt2img", b"[" * 100_000 + b"]" * 100_000)
    assert (status, answer["detail"]) == (422, "the body is not JSON (nested too deeply)")
    assert host_api.requests == []


def test_without_api_auth_every_request_is_checked(monkeypatch):
    monkeypatch.setattr(modules.shared.cmd_opts, "api_auth", None)
    def check(payload, is_img2img):
        api.check_generation(payload, is_img2img, lambda request: None)

    guard = api.ApiGuard(Api(), check,
                         api.parse_credentials(None))
    status, body = _post(guard, "/sdapi/v1/img2img", BAD_ARGS)
    assert status == 422 and "mode must be one of" in body["detail"]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _grey16() -> Image.Image:
    """A 16-bit grey image whose values all lie above 255 (``convert("RGB")`` makes it solid white)."""
    values = np.linspace(1000, 64000, 40 * 56).reshape(40, 56).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return image


def _recording_compute(seen: list):
    def compute(image, request, brush):
        seen.append(np.array(image))
        mask = np.zeros(np.asarray(image).shape[:2], np.uint8)
        mask[:, :10] = 255
        prediction = SimpleNamespace(expression=request.expression, mask_image=lambda: mask,
                                     probability_image=lambda: mask.astype(np.uint16) * 257, presence_report=lambda: {},
                                     instances=lambda: [])
        return SimpleNamespace(mask=mask, prediction=prediction)

    return compute


def test_a_failure_that_is_not_ours_is_a_one_line_500():
    """Out of memory while the mask model loads gave the host's 500 with a traceback."""
    def out_of_memory(image, job, brush):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    with pytest.raises(api.ApiError) as caught:
        api.mask_response({"image": base64.b64encode(_png_bytes(_grey16())).decode(), "expression": "cat"},
                          out_of_memory, lambda request: None)
    assert caught.value.status == 500
    assert caught.value.content() == {"error": "ApiError",
                                      "detail": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}


def test_route_reads_images_like_load_image():
    """/ldznet/v1/mask reads its image with load_image (16-bit grey scaled, not clipped to white):
    the engine and the overlay get the same pixels as the CLI."""
    raw = _png_bytes(_grey16())
    seen = []
    response = api.mask_response({"image": base64.b64encode(raw).decode(), "expression": "cat"},
                                 _recording_compute(seen), lambda request: None)
    expected = load_image(raw)
    assert len(np.unique(expected)) > 200 and np.array_equal(seen[0], expected)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(response["mask"]))))
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(response["overlay"]))))
    assert np.array_equal(overlay, render_overlay(expected, mask))
    assert (response["width"], response["height"]) == (56, 40)


def test_host_compute_reads_a_16_bit_image_like_the_cli(tmp_path, monkeypatch):
    """The script path (a PIL init image) and the route give the engine the pixels load_image gives,
    and so the CLI's mask."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    world.install(tmp_path)
    image, request = _grey16(), MaskJob("goblin", threshold=0.3)
    raw = _png_bytes(image)
    expected = host.compute(load_image(raw), request)
    predict, seen = host.engine().predict, []

    def spy(backbone, picture, *args):
        seen.append(load_image(picture))
        return predict(backbone, picture, *args)

    monkeypatch.setattr(host.engine(), "predict", spy)
    result = host.compute(image, request)
    assert np.array_equal(seen[0], load_image(raw)) and len(np.unique(seen[0])) > 200
    response = api.mask_response({"image": base64.b64encode(raw).decode(), "expression": "goblin",
                                  "threshold": 0.3}, host.compute, host.check_ready)
    assert np.array_equal(seen[1], load_image(raw))
    for mask, probability in ((result.mask, result.prediction.probability_image()),
                              (_decoded(response["mask"]), _decoded(response["probability"]))):
        assert np.array_equal(mask, expected.mask)
        assert np.array_equal(probability, expected.prediction.probability_image())


def _decoded(png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))


def _find_encoding(want: str) -> tuple[bytes, str]:
    """A small PNG whose standard base64 contains ``want`` ('+' or '/') and so differs url-safe."""
    for seed in range(100):
        raw = _png_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (6, 8, 3), np.uint8)))
        if want in base64.b64encode(raw).decode():
            return raw, base64.urlsafe_b64encode(raw).decode()
    raise AssertionError("no such image")


def test_route_accepts_wrapped_and_url_safe_base64():
    raw = _png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), np.uint8)))
    expected = load_image(raw)
    plus, url_plus = _find_encoding("+")
    slash, url_slash = _find_encoding("/")
    encodings = [(raw, base64.encodebytes(raw).decode()),  # 76-character lines, as `base64` prints
                 (raw, "data:image/png;base64," + base64.encodebytes(raw).decode()),
                 (plus, url_plus), (slash, url_slash), (slash, url_slash.rstrip("="))]
    assert "\n" in encodings[0][1] and "-" in url_plus and "_" in url_slash
    for source, text in encodings:
        assert np.array_equal(api.decode_image(text, "image"), load_image(source))
    assert np.array_equal(api.decode_image(encodings[0][1], "image"), expected)
    for garbage in ("!!", "abc$", "aGVsbG8=x", "a"):
        with pytest.raises(api.ApiError, match="image is not valid base64") as caught:
            api.decode_image(garbage, "image")
        assert caught.value.status == 422


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 1-bit pixels and holds no image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side, message", [(5000, "image is 5000x5000 = 25,000,000 pixels; the limit is"),
                                           (20000, "image is over Pillow's decompression-bomb limit")])
def test_huge_images_are_413(side, message):
    with pytest.raises(api.ApiError, match=message) as caught:
        api.decode_image(base64.b64encode(_png_header(side, side)).decode(), "image")
    assert caught.value.status == 413


def _exif_pillow_cannot_rewrite() -> bytes:
    """Big-endian EXIF: Orientation 6, and tag 0x0121 (a SHORT for Pillow) holding ASCII text, so that
    exif_transpose's rewrite of the EXIF raises struct.error (found by mutating a WebP's bytes)."""
    entries = [(0x0112, 3, 1, struct.pack(">HH", 6, 0)), (0x0121, 2, 4, b"cam\x00")]
    return (b"MM\x00*" + struct.pack(">IH", 8, len(entries))
            + b"".join(struct.pack(">HHI", tag, kind, count) + value for tag, kind, count, value in entries)
            + struct.pack(">I", 0))


@pytest.mark.parametrize("image_format", ["WEBP", "PNG"])
def test_a_brush_mask_with_corrupt_exif_is_422(image_format):
    """One line, as load_image says it, not a 500."""
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 6), (0, 0, 0, 100)).save(buffer, format=image_format, exif=_exif_pillow_cannot_rewrite())
    with pytest.raises(api.ApiError, match="^mask cannot be decoded") as caught:
        api.decode_mask(base64.b64encode(buffer.getvalue()).decode(), "mask")
    assert caught.value.status == 422 and "\n" not in caught.value.detail


def test_postscript_uploads_are_no_images():
    """EPS would be decoded by Ghostscript on the server (images.EXTERNAL_DECODERS)."""
    eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 12\nshowpage\n").decode()
    for decode, what in ((api.decode_image, "image"), (api.decode_mask, "mask")):
        with pytest.raises(api.ApiError, match=f"^{what} is not an image Pillow can read") as caught:
            decode(eps, what)
        assert caught.value.status == 422


def test_brush_masks_are_read_as_the_host_reads_them():
    """Grey levels (16-bit ones scaled like load_image's), or the alpha channel when it is not opaque."""
    levels = np.zeros((40, 56), np.uint8)
    levels[:, 20:] = 255
    levels[:, 40:] = 100
    grey = np.asarray(Image.fromarray(load_image(_png_bytes(Image.fromarray(levels.astype(np.uint16) * 257))))
                      .convert("L"))
    assert np.array_equal(grey, levels)
    alpha = Image.fromarray(np.dstack([np.zeros_like(levels)] * 3 + [levels]), "RGBA")
    opaque = Image.fromarray(np.dstack([levels] * 3 + [np.full_like(levels, 255)]), "RGBA")  # its greys, not alpha
    for image in (Image.fromarray(levels), Image.fromarray(levels.astype(np.uint16) * 257), alpha, opaque):
        assert np.array_equal(api.decode_mask(base64.b64encode(_png_bytes(image)).decode(), "mask"), levels)


def test_preview_reads_the_image_like_load_image(tmp_path):
    """img2img's Preview button: the overlay is drawn on load_image's pixels of a 16-bit image."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    world.install(tmp_path)
    image = _grey16()
    overlay, status = ui.preview_mask(0, "a photo\nmask: goblin", image, None, None, None, None, None,
                                      "", "LD-ZNet head", 0.3)
    mask = host.compute(load_image(_png_bytes(image)), MaskJob("goblin", threshold=0.3)).mask
    assert np.array_equal(np.asarray(overlay), render_overlay(load_image(_png_bytes(image)), mask))
    assert "goblin: " in status and "ldznet-status" in status


def test_preview_uses_the_prompt_line_first(tmp_path):
    """Preview shows what a generation masks: the prompt's line wins over the accordion's expression."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    world.install(tmp_path)
    image = _grey16()
    overlay, status = ui.preview_mask(0, "a photo\nmask: goblin", image, None, None, None, None, None,
                                      "sword", "LD-ZNet head", 0.3)
    mask = host.compute(load_image(_png_bytes(image)), MaskJob("goblin", threshold=0.3)).mask
    assert np.array_equal(np.asarray(overlay), render_overlay(load_image(_png_bytes(image)), mask))
    assert status.startswith("<p class='ldznet-status'>goblin: ")
    _, status = ui.preview_mask(0, "a photo", image, None, None, None, None, None, "sword", "LD-ZNet head", 0.3)
    assert status.startswith("<p class='ldznet-status'>sword: ")


def test_preview_in_inpaint_sketch_says_it_leaves_out_the_strokes(tmp_path):
    """Inpaint sketch's mask is the strokes against the image before them, which the page does not
    name: Preview shows the text mask and says so when the generation would combine it with them."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    world.install(tmp_path)
    image = _grey16()
    sketch = [None, None, None, image, None, None]
    mask = host.compute(load_image(_png_bytes(image)), MaskJob("goblin", threshold=0.3)).mask
    for combine in ("replace", "add"):
        overlay, status = ui.preview_mask(3, "a photo", *sketch, "goblin", "LD-ZNet head", 0.3, 0, 0, False, combine)
        assert np.array_equal(np.asarray(overlay), render_overlay(load_image(_png_bytes(image)), mask))
        note = "Inpaint sketch: this is the text mask alone; the generation combines it with the mask of your strokes"
        assert (note in html.unescape(status)) == (combine == "add")


def test_preview_names_the_terms_not_found(tmp_path, monkeypatch):
    """Preview says which terms presence rejected (their maps gave nothing), and the found ones' share."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    from ldznet_ext import segmenter
    from ldznet_ext.masks.presence import PresenceRule

    world.install(tmp_path)
    image = _grey16()
    monkeypatch.setattr(segmenter, "HEAD_RULE", PresenceRule(0.0, 0.999999))  # nothing is found
    overlay, status = ui.preview_mask(0, "a photo", image, None, None, None, None, None,
                                      "goblin OR sword", "LD-ZNet head", 0.3)
    assert re.fullmatch(r"<p class='ldznet-status'>goblin OR sword: 0\.0% of the image selected; "
                        r"no match for 'goblin' \(score 0\.\d\d\); no match for 'sword' \(score 0\.\d\d\)</p>",
                        html.unescape(status))
    _, status = ui.preview_mask(0, "a photo", image, None, None, None, None, None, "goblin", "LD-ZNet head", 0.3,
                                0, 0, False, "replace", True, 0, 0, 1.0, 0, False)  # presence off
    assert "no match" not in status


def _mask_before_mask_job(image, brush, expression, mode, threshold, grow, feather, invert, combine, refine):
    """The engine's mask as it was computed before MaskJob: MaskRequest handed threshold, invert
    and feather to MaskOptions, refine to RefineSettings(enabled=...), grow as a modifier, and the
    engine built the Segmenter from the host's settings and the selected head."""
    with host.job_backbone(MaskJob(expression, mode)) as backbone:
        options = host.engine_options()
    refine_settings = RefineSettings(enabled=refine)
    if mode == "zero-shot":
        segmenter = Segmenter(backbone, settings=SegmenterSettings(resolution=options.resolution, seed=options.seed,
                                                                   refine=refine_settings))
    else:
        head, config = load_head(host.engine().heads_dir / options.head, device="cpu", dtype=backbone.dtype)
        segmenter = Segmenter(backbone, head, config, SegmenterSettings(
            resolution=options.resolution, timestep=config.timestep, seed=options.seed, refine=refine_settings))
    segmenter.set_image(image)
    prediction = segmenter.predict(with_grow(parse(expression), grow),
                                   MaskOptions(threshold=threshold, invert=invert, feather=feather))
    return request.combine(prediction.mask_image(), brush, combine)


@pytest.mark.parametrize("args", [
    ["yellow square OR grass", "LD-ZNet head", 0.5, 0, 0, False, "replace"],
    ["grass{+2}", "LD-ZNet head", 0.5, -3, 2, True, "add", False],
    ["grass AND NOT sky", "zero-shot", "0.45", "2", "1.5", "false", "subtract", "true"],
    ["grass", "zero-shot", 0.5, 0, 0, False, "intersect", False],
])
def test_todays_args_and_body_give_todays_masks(tmp_path, args):
    """Compatibility: positional args of 7 and 8 items and the README's /ldznet/v1/mask body give
    the masks they gave before MaskJob, bit for bit, on a micro-world scene."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    world.install(tmp_path)
    image = make_scene(5, size=64).image
    brush = np.zeros(image.shape[:2], np.uint8)
    brush[:, :30] = 255
    full = [*args, True] if len(args) == 7 else args
    expected = _mask_before_mask_job(image, brush, full[0], full[1], float(full[2]), float(full[3]), float(full[4]),
                                     str(full[5]).lower() == "true", full[6], str(full[7]).lower() == "true")
    assert 0 < expected.mean() < 255  # a mask with both sides
    assert np.array_equal(host.compute(image, request.from_args(args), brush).mask, expected)
    body = dict(zip(request.ARG_NAMES, args))
    body.update(image=base64.b64encode(_png_bytes(Image.fromarray(image))).decode(),
                mask=base64.b64encode(_png_bytes(Image.fromarray(brush))).decode())
    response = api.mask_response(body, host.compute, host.check_ready)
    assert np.array_equal(_decoded(response["mask"]), expected)


def _install_wide_head(tmp_path) -> None:
    """The fake WebUI with a head made for a wider UNet (model_channels 64; the model's is 32) selected."""
    from ldznet_ext.heads import save_head
    from ldznet_ext.modeling.build import build_head, head_config
    from ldznet_ext.sd.unet import unet_config

    world.install(tmp_path)
    config = head_config("ldznet", "tiny", latent_size=8, unet=unet_config("tiny", model_channels=64, out_channels=1))
    save_head(build_head(config), config, tmp_path / "models" / "ldznet" / "wide.safetensors")
    modules.shared.opts.data["ldznet_head"] = "wide.safetensors"


def test_a_head_for_another_model_is_refused_before_the_generation(tmp_path):
    """The real host answers such an img2img call 200 with no images (the reason only in its log):
    the pre-generation check finds it, names the WebUI's zero-shot mode, and answers 409."""
    pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
    _install_wide_head(tmp_path)
    reason = ("wide.safetensors: this ldznet head was made for a different SD model (head vs model: "
              "model_channels 64 vs 32); use a head trained on this model, or mode 'zero-shot'")
    with pytest.raises(CheckpointError) as caught:
        host.check_ready(MaskJob("cat"))
    assert str(caught.value) == reason
    detail = [None] * 13 + ["face"]  # the detail pass alone: it masks the generated image
    for payload, is_img2img in (({"prompt": "mask: cat", "init_images": ["x"]}, True),
                                ({"alwayson_scripts": {"LD-ZNet mask": {"args": detail}}}, False)):
        with pytest.raises(api.ApiError) as caught:
            api.check_generation(payload, is_img2img, host.check_ready)
        assert (caught.value.status, caught.value.detail) == (409, reason)
    # txt2img inpaints nothing with a mask, and the UI generates it: so does the API
    api.check_generation({"prompt": "a knight\nmask: cat"}, False, host.check_ready)
    api.check_generation({"alwayson_scripts": {"LD-ZNet mask": {"args": ["cat"]}}}, False, host.check_ready)
    with pytest.raises(api.ApiError) as caught:
        api.mask_response({"image": base64.b64encode(_png_bytes(_grey16())).decode(), "expression": "cat"},
                          host.compute, host.check_ready)
    assert (caught.value.status, caught.value.detail) == (409, reason)
    host.check_ready(MaskJob("cat", mode="zero-shot"))
    modules.sd_models.model_data.sd_model = None  # nothing loaded: nothing to compare with yet
    host.check_ready(MaskJob("cat"))


def _get(app, path: str) -> tuple[int, dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_options_are_in_the_api_with_nowebui(monkeypatch):
    """--nowebui: the host loads the scripts (our register()), builds its API (freezing the options
    model), then runs the on_ui_settings callbacks; GET /sdapi/v1/options lists the ldznet_* options."""
    monkeypatch.setitem(sys.modules, "gradio", SimpleNamespace(Dropdown=object, Slider=object, Radio=object))
    monkeypatch.setattr(modules.shared, "opts", modules.shared.Options())
    monkeypatch.setattr(script_callbacks, "callbacks", defaultdict(list))
    register.register()
    host_api = Api()
    for callback in script_callbacks.callbacks["ui_settings"]:
        callback()
    status, options = _get(host_api, "/sdapi/v1/options")
    assert status == 200
    assert options == {"ldznet_head": "None", "ldznet_mask_model": "automatic", "ldznet_timestep": -1,
                       "ldznet_resolution": 0, "ldznet_threshold": 0.5,
                       "ldznet_keep_on_gpu": True, "ldznet_cuda_graphs": True, "ldznet_dtype": "auto",
                       "ldznet_save_masks": False}
    assert modules.shared.opts.data_labels["ldznet_head"].section == ("ldznet", "LD-ZNet")
    # the default threshold is read when the controls are built: the settings page says it needs Reload UI
    assert [key for key, info in modules.shared.opts.data_labels.items() if info.reload_ui] == ["ldznet_threshold"]


def test_an_install_the_host_would_not_order_is_named(tmp_path):
    """metadata.ini's order applies to a real folder named ldznet (any case) only."""
    (tmp_path / "extensions" / "LDZNet").mkdir(parents=True)
    (tmp_path / "extensions" / "sd-webui-ldznet").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "extensions" / "ldznet").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert register.install_problem(str(tmp_path / "extensions" / "LDZNet")) is None
    assert register.install_problem(str(tmp_path / "extensions" / "sd-webui-ldznet")) == (
        "its folder is named 'sd-webui-ldznet', not 'ldznet'")
    assert register.install_problem(str(tmp_path / "extensions" / "ldznet")) == "it is installed through a link"


class _StartedApp:
    """Starlette's middleware bookkeeping (starlette/applications.py) on an app that already answers:
    whenever its stack is reset to None, a request arrives (as from another thread) and rebuilds it."""

    def __init__(self):
        self.user_middleware = ["the host's"]
        self._stack = self.build_middleware_stack()

    @property
    def middleware_stack(self):
        return self._stack

    @middleware_stack.setter
    def middleware_stack(self, stack):
        self._stack = self.build_middleware_stack() if stack is None else stack

    def build_middleware_stack(self):
        return tuple(self.user_middleware)

    def add_middleware(self, cls, **options):
        if self._stack is not None:
            raise RuntimeError("Cannot add middleware after an application has started")
        self.user_middleware.insert(0, (cls, options))


def test_the_guard_is_added_while_requests_arrive(monkeypatch):
    """The host runs on_app_started with its server up: a request between resetting the stack and adding
    ours made Starlette refuse the middleware, so neither the guard nor our routes existed."""
    monkeypatch.setitem(sys.modules, "starlette", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "starlette.middleware",
                        SimpleNamespace(Middleware=lambda cls, **options: (cls, options)))
    monkeypatch.setattr(modules.shared.cmd_opts, "api", False, raising=False)
    app = _StartedApp()
    register.add_routes(None, app)
    (guard, options), host_middleware = app.middleware_stack
    assert guard is api.ApiGuard and host_middleware == "the host's"
    assert set(options) == {"check_generation", "check_options", "credentials"}


def test_mask_route_answers_terms_and_instances():
    """/ldznet/v1/mask: each term's found and score, and the objects of the mask left to right (with their
    masks when "instances" is true), from the engine's prediction (an oracle's maps here)."""
    from oracle import OracleSegmenter
    star = torch.zeros(40, 56)
    star[5:10, 30:35] = 0.9
    star[20:30, 2:12] = 0.9
    segmenter = OracleSegmenter({"star": star, "goblin": torch.zeros(40, 56)})

    def compute(image, job, brush):
        prediction = segmenter.predict(job.tree(), job.mask_options())
        return SimpleNamespace(mask=prediction.mask_image(), prediction=prediction)

    body = {"image": base64.b64encode(_png_bytes(Image.new("RGB", (56, 40)))).decode(),
            "expression": "goblin OR star", "instances": True}
    response = api.mask_response(body, compute, lambda job: None)
    assert response["terms"] == {"goblin": {"found": False, "score": 0.0}, "star": {"found": True, "score": 0.9}}
    assert [(i["order"], i["box"], i["area"], i["score"]) for i in response["instances"]] == [
        (1, [2, 20, 12, 30], 100, 0.9), (2, [30, 5, 35, 10], 25, 0.9)]
    assert int((_decoded(response["instances"][1]["mask"]) == 255).sum()) == 25
    response = api.mask_response({**body, "expression": "star[-1]", "instances": None}, compute, lambda job: None)
    assert [("mask" in i, i["box"]) for i in response["instances"]] == [(False, [30, 5, 35, 10])]
    for value in ("some", 0, "", [], {}):  # only null stands for false, as for the job's flags
        with pytest.raises(api.ApiError, match="instances must be true or false"):
            api.mask_response({**body, "instances": value}, compute, lambda job: None)
