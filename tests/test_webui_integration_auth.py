"""Opt-in, like test_webui_integration.py (LDZNET_WEBUI_DIR): A1111 started with ``--api-auth``.

A module of its own so that its WebUI starts after the other module's has stopped (pytest tears a
module's fixtures down before the next module), never two at once.
"""
from __future__ import annotations

import pytest
from test_webui_integration import IMAGE, _b64, _call, a1111

CREDENTIALS = "ldznet:s3cret"
BAD_ARGS = {"init_images": None, "prompt": "x", "steps": 1,
            "alwayson_scripts": {"ld-znet mask": {"args": ["cat", "LD-ZNet head", 1.5]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with a1111(tmp_path_factory, ("--api-auth", CREDENTIALS), auth=CREDENTIALS) as base:
        yield base


@pytest.mark.parametrize("auth", [None, "ldznet:wrong", "nobody:s3cret"], ids=["none", "wrong-password", "wrong-user"])
def test_requests_the_host_refuses_get_its_401_not_our_422(server, auth):
    payload = {**BAD_ARGS, "init_images": [_b64(IMAGE)]}
    status, _ = _call(server, "/sdapi/v1/img2img", payload, auth)
    assert status == 401
    status, _ = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": "cat"}, auth)
    assert status == 401


def test_authenticated_bad_args_get_our_422(server):
    payload = {**BAD_ARGS, "init_images": [_b64(IMAGE)]}
    status, body = _call(server, "/sdapi/v1/img2img", payload, CREDENTIALS)
    assert status == 422 and "threshold" in body["detail"]
    status, body = _call(server, "/ldznet/v1/mask", {"image": _b64(IMAGE), "expression": "cat"}, CREDENTIALS)
    assert status == 200 and 0 <= body["coverage"] <= 1
