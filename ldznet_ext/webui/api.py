"""HTTP API: ``POST /ldznet/v1/mask``, ``GET /ldznet/v1/version``, ``GET /ldznet/v1/schema``, and
checks of the LD-ZNet args of ``/sdapi/v1/img2img`` and ``/sdapi/v1/txt2img`` that answer 4xx
before a generation starts.

The host runs script hooks with every exception caught and logged, so a bad ``alwayson_scripts``
arg could only be reported after a generation. An ASGI middleware (:class:`ApiGuard`) reads those
request bodies first; it also enforces the request size limit and the host's --api-auth on our
routes. The handlers here are plain functions of a JSON payload, raising :class:`ApiError`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import warnings
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image, ImageOps

from .. import __version__
from ..checkpoint_io import json_kind
from ..errors import CheckpointError, ImageError, LdznetError, unexpected
from ..images import load_image, open_image
from ..job import MaskJob, checked_flag
from ..masks.instances import Instance, instance_image
from ..outputs import mask_image, probability_image, render_overlay, selected_share
from .request import (ARG_NAMES, NEGATIVE_PROMPTS, TITLE, ZERO_MEANS_NONE, check_init_images, check_negative_prompt,
                      detail_from_args, from_args, with_prompt_line)

MASK_ROUTE = "/ldznet/v1/mask"
VERSION_ROUTE = "/ldznet/v1/version"
SCHEMA_ROUTE = "/ldznet/v1/schema"
IMAGE_FIELDS = ("image", "mask")
ANSWER_FIELDS = ("instances",)  # what the answer holds; not part of the job
GENERATION_ROUTES = ("/sdapi/v1/img2img", "/sdapi/v1/txt2img")
OPTIONS_ROUTE = "/sdapi/v1/options"
MAX_REQUEST_BYTES = 64 * 2**20
API_MAX_PIXELS = 4096 * 4096
TOO_DEEP = "the body is not JSON (nested too deeply)"
"""JSON nested beyond Python's recursion limit: a RecursionError, not a ValueError, from ``json.loads``."""


class ApiError(Exception):
    """An HTTP error with a message for the client."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def content(self) -> dict:
        """The JSON answer: {"error": "ApiError", "detail": why}."""
        return {"error": type(self).__name__, "detail": self.detail}

    def body(self) -> bytes:
        return json.dumps(self.content()).encode()


def _base64_bytes(data, what: str) -> bytes:
    """Standard or url-safe base64, optionally a data URL, line-wrapped or unpadded -> bytes; 422 otherwise."""
    if not isinstance(data, str) or not data:
        raise ApiError(422, f"{what} must be a base64-encoded image, got {type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    # `base64` wraps its output in lines; url-safe encoders write - and _ and often drop the padding
    text = "".join(data.split()).replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4) if len(text) % 4 != 1 else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{what} is not valid base64") from None


def _check_pixels(raw: bytes, what: str, max_pixels: int) -> None:
    """413 for an image over ``max_pixels`` (read from its header, before decoding), 422 for no image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(io.BytesIO(raw)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        width = height = None  # over Pillow's own limit, which is above ours
    except Exception:
        raise ApiError(422, f"{what} is not an image Pillow can read (PNG, JPEG, WebP...)") from None
    if width is None:
        raise ApiError(413, f"{what} is over Pillow's decompression-bomb limit; the limit is {max_pixels:,} pixels")
    if width * height > max_pixels:
        raise ApiError(413, f"{what} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")


def _image_bytes(data, what: str, max_pixels: int) -> bytes:
    raw = _base64_bytes(data, what)
    _check_pixels(raw, what, max_pixels)
    return raw


def _load(raw: bytes, what: str, max_pixels: int) -> np.ndarray:
    try:
        return load_image(raw, max_pixels)
    except ImageError as error:
        raise ApiError(422, f"{what} cannot be decoded ({error})") from None


def decode_image(data, what: str, max_pixels: int = API_MAX_PIXELS) -> np.ndarray:
    """A base64 (optionally data-URL) PNG/JPEG/WebP -> RGB uint8 [H, W, 3], read by ``load_image`` as
    the CLI reads files (16-bit, alpha, EXIF); 422 when unreadable, 413 when too large."""
    return _load(_image_bytes(data, what, max_pixels), what, max_pixels)


def decode_mask(data, what: str, max_pixels: int = API_MAX_PIXELS) -> np.ndarray:
    """A base64 brush mask -> uint8 [H, W], read as the host reads img2img masks: the alpha channel
    when it is not fully opaque, else the grey levels (``load_image``'s, so 16-bit masks scale)."""
    raw = _image_bytes(data, what, max_pixels)
    try:
        with open_image(io.BytesIO(raw)) as image:
            if "A" in image.getbands() or "transparency" in image.info:
                alpha = ImageOps.exif_transpose(image.convert("RGBA")).getchannel("A")
                if alpha.getextrema() != (255, 255):
                    return np.asarray(alpha)
    except Exception:  # noqa: BLE001 (corrupt data makes Pillow raise almost anything, as load_image says)
        raise ApiError(422, f"{what} cannot be decoded; the data may be truncated or corrupt") from None
    return np.asarray(Image.fromarray(_load(raw, what, max_pixels)).convert("L"))


def encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _our_args(payload: Mapping) -> list | None:
    scripts = payload.get("alwayson_scripts")
    if not isinstance(scripts, Mapping):
        return None
    names = [name for name in scripts if isinstance(name, str) and name.lower() == TITLE.lower()]
    if not names:
        return None
    if len(names) > 1:  # the host finds scripts by lower-case title: the last entry's args would run, unchecked
        raise ApiError(422, f"alwayson_scripts names the LD-ZNet script {len(names)} times "
                            f"({', '.join(map(repr, names))}); send its args once")
    name, entry = names[0], scripts[names[0]]
    if not isinstance(entry, Mapping):
        raise ApiError(422, f"alwayson_scripts[{name!r}] must be an object with 'args': {list(ARG_NAMES)}")
    args = entry.get("args", [])
    if not isinstance(args, list):
        raise ApiError(422, f"alwayson_scripts[{name!r}].args must be a list in the order {list(ARG_NAMES)}")
    return args


def check_generation(payload, is_img2img: bool, check_ready: Callable[[MaskJob], None]) -> None:
    """Validate the LD-ZNet part of a generation request; ApiError with the reason: 409 when the
    head or the loaded model does not allow the mask, 422 for bad args."""
    if not isinstance(payload, Mapping):
        return  # the host answers malformed bodies itself
    args = _our_args(payload)
    prompt = payload.get("prompt")
    try:
        job, detail = from_args(args or []), detail_from_args(args or [])
    except LdznetError as error:
        raise ApiError(422, f"alwayson_scripts[{TITLE.lower()!r}].args: {error}") from None
    try:
        job = with_prompt_line(job, prompt)  # the script's own rule: the prompt's line wins
    except LdznetError as error:
        raise ApiError(422, f"prompt: {error}") from None
    for name in NEGATIVE_PROMPTS:
        try:
            check_negative_prompt(payload.get(name))
        except LdznetError as error:
            raise ApiError(422, f"{name}: {error}") from None
    inpaints = is_img2img and job.active  # txt2img makes no mask to inpaint with (saved masks fail alone)
    if not (inpaints or detail.active):
        return
    if inpaints:
        images = payload.get("init_images")
        try:
            check_init_images(len(images) if isinstance(images, list) else int(bool(images)))
        except LdznetError as error:
            raise ApiError(422, f"init_images: {error}") from None
    try:
        check_ready(job if inpaints else detail.mask_job(job))
    except CheckpointError as error:  # the host's model or our head file: a conflict, as on /ldznet/v1/mask
        raise ApiError(409, str(error)) from None
    except LdznetError as error:
        raise ApiError(422, str(error)) from None


def _override_settings(payload) -> Mapping:
    """A generation request's ``override_settings`` (the settings the host sets for its job alone)."""
    overrides = payload.get("override_settings") if isinstance(payload, Mapping) else None
    return overrides if isinstance(overrides, Mapping) else {}


def setting_overrides(payload, checked: Callable[[str, object], object]) -> dict[str, object]:
    """The LD-ZNet settings (keys "ldznet_...") that a generation request's ``override_settings`` sets
    for its job, each as ``checked`` reads it; ApiError 422 naming the first one it refuses (the host
    would set it and the mask would fail mid-generation)."""
    ours = {}
    for key, value in _override_settings(payload).items():
        if isinstance(key, str) and key.startswith("ldznet_"):
            try:
                ours[key] = checked(key, value)
            except LdznetError as error:
                raise ApiError(422, f"override_settings: {error}") from None
    return ours


def names_a_checkpoint(payload) -> bool:
    """Whether a generation request's ``override_settings`` names a checkpoint, which the host loads
    for the job: the model loaded now is then not the one its mask would run on."""
    return _override_settings(payload).get("sd_model_checkpoint") is not None


def check_options(payload, check: Callable[[Mapping], None]) -> None:
    """Validate the LD-ZNet settings of a POST /sdapi/v1/options body with ``check`` (LdznetError for
    a bad value); ApiError 422 with the reason. The host stores whatever it is sent, so without this a
    bad value would be answered 200 and fail every later mask."""
    if not isinstance(payload, Mapping):
        return  # the host answers malformed bodies itself
    try:
        check(payload)
    except LdznetError as error:
        raise ApiError(422, str(error)) from None


def mask_response(payload, compute: Callable, check_ready: Callable[[MaskJob], None]) -> dict:
    """POST /ldznet/v1/mask: {"image": b64, "mask": optional b64 brush mask, and the MaskJob fields
    by name (:meth:`MaskJob.json_schema`; "expression" required, null = default), "instances": true
    for each object's mask} -> {"mask", "probability" (16-bit), "overlay": b64 PNGs, "coverage", "width",
    "height", "expression", "terms": {term: {"found", "score"}}, "instances": [{"order", "box", "area",
    "score"} (+ "mask" when asked), left to right, of our mask before it meets the brush]}.

    ``compute(image, job, brush) -> MaskResult`` runs under the host's queue lock."""
    _check_object(payload)
    try:
        job = MaskJob.from_dict(payload, other_fields=IMAGE_FIELDS + ANSWER_FIELDS)
        instances = payload.get("instances")
        instance_masks = checked_flag(False if instances is None else instances, "instances")
    except LdznetError as error:
        raise ApiError(422, str(error)) from None
    if not job.active:
        raise ApiError(422, "expression is required, e.g. \"cat OR dog\"")
    image = decode_image(payload.get("image"), "image")
    height, width = image.shape[:2]
    brush = None
    if payload.get("mask") is not None:
        brush = decode_mask(payload["mask"], "mask")
        if brush.shape != (height, width):
            raise ApiError(422, f"mask is {brush.shape[1]}x{brush.shape[0]} but image is {width}x{height}; "
                                "they must be the same size")
    try:
        check_ready(job)
        result = compute(image, job, brush)
    except CheckpointError as error:
        raise ApiError(409, str(error)) from None
    except LdznetError as error:
        raise ApiError(422, str(error)) from None
    except Exception as error:  # noqa: BLE001 - out of memory, a host failure: one line, not the host's traceback
        raise ApiError(500, unexpected(error)) from None
    return {
        "expression": str(result.prediction.expression),
        "width": width,
        "height": height,
        "coverage": selected_share(result.mask),
        "mask": encode_png(mask_image(result.mask)),
        "probability": encode_png(probability_image(result.prediction.probability_image())),
        "overlay": encode_png(Image.fromarray(render_overlay(image, result.mask))),
        "terms": result.prediction.presence_report(),
        "instances": [_instance_entry(i, job.feather, instance_masks) for i in result.prediction.instances()],
    }


def _instance_entry(instance: Instance, feather: float, with_mask: bool) -> dict:
    entry = instance.to_dict()
    if with_mask:
        entry["mask"] = encode_png(mask_image(instance_image(instance, feather)))
    return entry


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """--api-auth "user:password,user2:password2" -> {user: password}."""
    return dict(item.split(":", 1) for item in api_auth.split(",") if ":" in item) if api_auth else {}


def _check_object(payload) -> None:
    """ApiError 422 unless ``payload`` (a parsed JSON body) is an object."""
    if not isinstance(payload, Mapping):
        raise ApiError(422, f"the body must be a JSON object, got {json_kind(payload)}")


def parse_body(body: bytes) -> object:
    """The JSON of a request body; ApiError 422 in one line when it is not JSON, or nested too deeply
    for Python's parser (a RecursionError, which the host's FastAPI answers with a 500)."""
    try:
        return json.loads(body)
    except ValueError as error:  # UnicodeDecodeError included
        raise ApiError(422, f"the body is not JSON ({error})") from None
    except RecursionError:
        raise ApiError(422, TOO_DEEP) from None


def check_mask_body(body: bytes) -> None:
    """ApiError 422, in one line, for a mask request whose body is not a JSON object (the route's own
    validation would answer it with FastAPI's list of errors)."""
    _check_object(parse_body(body))


def _first_headers(scope) -> dict[str, str]:
    """Request headers by lower-case name; the first of repeated ones, as Starlette's ``get`` reads them."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def authorized(headers: Mapping[str, str], credentials: Mapping[str, str]) -> bool:
    """Whether the host's --api-auth check lets the request in; True without credentials.

    The same test as A1111's and Forge's ``Api.auth`` (FastAPI's ``HTTPBasic``: "Basic" scheme, a
    base64 token of ASCII "user:password"; then ``compare_digest`` of the password), so that a
    request is never checked by us when the host would refuse it."""
    if not credentials:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, colon, password = base64.b64decode(token).decode("ascii").partition(":")
    except ValueError:  # binascii.Error and UnicodeDecodeError included
        return False
    expected = credentials.get(user)
    # bytes: compare_digest refuses non-ASCII str (the host then fails with 500; we only say "no")
    return bool(colon) and expected is not None and secrets.compare_digest(password.encode(), expected.encode())


class ApiGuard:
    """ASGI middleware: size limit and auth for /ldznet/*, LD-ZNet arg checks for generations and
    LD-ZNet settings checks for POST /sdapi/v1/options.

    ``check_generation(payload, is_img2img)`` and ``check_options(payload)`` raise ApiError; bodies
    are read once and replayed. With --api-auth, a generation or options request without the host's
    credentials goes to the host unread: the host answers it (401), never our checks.
    """

    def __init__(self, app, check_generation: Callable[[object, bool], None], credentials: Mapping[str, str],
                 max_bytes: int = MAX_REQUEST_BYTES, check_options: Callable[[object], None] | None = None):
        self.app = app
        self.check_generation = check_generation
        self.check_options = check_options
        self.credentials = dict(credentials)
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        ours = path.startswith("/ldznet/")
        generation = path in GENERATION_ROUTES and scope.get("method") == "POST"
        options = path == OPTIONS_ROUTE and scope.get("method") == "POST" and self.check_options is not None
        if not (ours or generation or options):
            return await self.app(scope, receive, send)
        headers = _first_headers(scope)
        allowed = authorized(headers, self.credentials)
        if (generation or options) and not allowed:
            return await self.app(scope, receive, send)  # the host refuses it, in its own words
        try:
            if ours and not allowed:
                raise ApiError(401, "this server requires --api-auth credentials (HTTP Basic)")
            body = await self._read_body(receive, limit=self.max_bytes if ours else None,
                                         declared=headers.get("content-length"))
            if path == MASK_ROUTE and scope.get("method") == "POST":
                check_mask_body(body)
            if generation or options:
                try:
                    payload = json.loads(body or b"null")
                except ValueError:
                    payload = None  # the host reports malformed JSON in its own words
                except RecursionError:  # which the host's FastAPI would answer with a 500
                    raise ApiError(422, TOO_DEEP) from None
                if generation:
                    self.check_generation(payload, path.endswith("img2img"))
                else:
                    self.check_options(payload)
        except ApiError as error:
            extra = [(b"www-authenticate", b"Basic")] if error.status == 401 else []
            await send({"type": "http.response.start", "status": error.status,
                        "headers": [(b"content-type", b"application/json"), *extra]})
            await send({"type": "http.response.body", "body": error.body()})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read_body(receive, limit: int | None, declared: str | None) -> bytes:
        if limit is not None and declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request is {int(declared):,} bytes; the limit is {limit:,}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit is not None and size > limit:
                raise ApiError(413, f"the request is over the limit of {limit:,} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def version_response(host_name: str, heads: list[str], head: str) -> dict:
    """GET /ldznet/v1/version."""
    return {"version": __version__, "api": 1, "host": host_name, "heads": heads, "head": head,
            "script_args": list(ARG_NAMES), "script_title": TITLE}


def schema_response() -> dict:
    """GET /ldznet/v1/schema: the JSON Schema of a mask job (the fields of POST /ldznet/v1/mask
    besides IMAGE_FIELDS), and the script's positional args: their order, and the ones whose 0
    stands for null."""
    return {"job": MaskJob.json_schema(), "image_fields": list(IMAGE_FIELDS), "script_title": TITLE,
            "script_args": list(ARG_NAMES), "script_args_zero_is_null": list(ZERO_MEANS_NONE)}
