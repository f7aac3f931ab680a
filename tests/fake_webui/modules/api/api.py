"""modules.api.api: the HTTP behaviour of A1111 v1.10.1's ``Api`` that an ASGI middleware in front of
it can observe, as a plain ASGI app (no FastAPI here).

- ``--api-auth "u:p,u2:p2"`` puts every ``/sdapi/v1/*`` route behind FastAPI's ``HTTPBasic`` and a
  ``compare_digest`` of the password: no or non-Basic Authorization header -> 401 "Not
  authenticated"; a token that is not base64 of ASCII "user:password" -> 401 "Invalid
  authentication credentials"; unknown user or wrong password -> 401 "Incorrect username or
  password". Only the first Authorization header counts.
- FastAPI reads the JSON body before it runs the route's dependencies: malformed JSON is 422 even
  without credentials.
- Errors are JSON ``{"error", "detail", "body", "errors"}`` (the host's exception handler).
- txt2img/img2img answer 200 with ``images: []`` (no generation is modelled).
- POST /sdapi/v1/options stores every key it is sent with ``shared.opts.set`` (``Api.set_config``
  checks nothing else) and answers null.
- GET /sdapi/v1/options answers the options of the host's ``OptionsModel``, which
  ``modules.api.models`` builds from ``opts.data_labels`` when it is imported: with --nowebui that
  is when ``webui.create_api`` imports the Api, before ``Api.__init__`` runs ``ui.create_ui`` and
  with it the on_ui_settings callbacks; FastAPI drops the keys the model lacks.
"""
import base64
import binascii
import json
from secrets import compare_digest

from modules import shared

GENERATION_ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


class HostError(Exception):
    def __init__(self, status, detail):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Api:
    """The host's API app; reads ``shared.cmd_opts.api_auth`` when built, as the host does."""

    def __init__(self):
        self.credentials = None
        if shared.cmd_opts.api_auth:
            self.credentials = dict(entry.split(":") for entry in shared.cmd_opts.api_auth.split(","))
        self.requests = []
        self.option_keys = set(shared.opts.data_labels)

    def _basic(self, headers):
        value = next((v.decode("latin-1") for k, v in headers if k.lower() == b"authorization"), None)
        scheme, _, token = (value or "").partition(" ")
        if not value or scheme.lower() != "basic":
            raise HostError(401, "Not authenticated")
        try:
            user, colon, password = base64.b64decode(token).decode("ascii").partition(":")
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise HostError(401, "Invalid authentication credentials") from None
        if not colon:
            raise HostError(401, "Invalid authentication credentials")
        return user, password

    def _auth(self, headers):
        user, password = self._basic(headers)
        if user in self.credentials and compare_digest(password, self.credentials[user]):
            return
        raise HostError(401, "Incorrect username or password")

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            status, content = 200, self._route(scope, body)
        except HostError as error:
            status = error.status
            content = {"error": "HTTPException", "detail": error.detail, "body": "",
                       "errors": f"{error.status}: {error.detail}"}
        await self._answer(send, status, content)

    def _route(self, scope, body):
        route = (scope["path"], scope["method"])
        if route == ("/sdapi/v1/options", "GET"):
            payload = None
        elif route == ("/sdapi/v1/options", "POST"):
            if self.credentials is not None:
                self._auth(scope.get("headers", []))
            for key, value in json.loads(body).items():
                shared.opts.set(key, value)
            return None
        elif scope["path"] in GENERATION_ROUTES and scope["method"] == "POST":
            try:
                payload = json.loads(body)
            except ValueError:
                raise HostError(422, "JSON decode error") from None
        else:
            raise HostError(404, "Not Found")
        if self.credentials is not None:
            self._auth(scope.get("headers", []))
        if payload is None:
            return {k: v for k, v in shared.opts.data.items() if k in self.option_keys}
        self.requests.append(payload)
        return {"images": [], "parameters": payload, "info": "{}"}

    @staticmethod
    async def _answer(send, status, content):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(content).encode()})
