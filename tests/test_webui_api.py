"""The HTTP side of the extension on the fake WebUI: ApiGuard in front of the host's API and its
--api-auth, image bodies of /ldznet/v1/mask, checks that answer before a generation starts."""
from __future__ import annotations

import asyncio
import base64
import json

import pytest

from fake_webui import world  # noqa: F401  (puts the fake ``modules`` on sys.path)

import modules.shared  # noqa: E402
from modules.api.api import Api  # noqa: E402

from ldznet_ext.webui import api  # noqa: E402

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


def test_without_api_auth_every_request_is_checked(monkeypatch):
    monkeypatch.setattr(modules.shared.cmd_opts, "api_auth", None)
    guard = api.ApiGuard(Api(), lambda payload, is_img2img: api.check_generation(payload, is_img2img, lambda request: None),
                         api.parse_credentials(None))
    status, body = _post(guard, "/sdapi/v1/img2img", BAD_ARGS)
    assert status == 422 and "mode must be one of" in body["detail"]
