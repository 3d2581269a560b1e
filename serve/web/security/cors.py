"""CORS for the API only: pages of the ``cors_origins`` may call ``/v1/*`` from a browser.

Starlette's ``CORSMiddleware`` answers the preflights and adds the headers, but only for
paths under ``/v1``: the chat routes (cookie-authenticated, CSRF-checked) never send a
CORS header. A preflight from an origin not listed is refused with a 403 and no CORS
header; an ordinary request from one gets none either. The API authenticates with a
bearer key, not a cookie, so no credentials are allowed.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.web.security.asgi import header, send_json_error
from serve.web.settings import normalize_origin

API_PREFIX = "/v1"
ALLOW_METHODS = ("GET", "POST", "OPTIONS")
ALLOW_HEADERS = ("Authorization", "Content-Type")


class ApiCorsMiddleware:
    """``CORSMiddleware`` applied to the paths under ``/v1``, every other path untouched."""

    def __init__(self, app: ASGIApp, origins: Iterable[str], on_reject=None):
        self.app = app
        self.origins = frozenset(normalize_origin(o) for o in origins)
        self.cors = CORSMiddleware(app, allow_origins=sorted(self.origins),
                                   allow_methods=ALLOW_METHODS, allow_headers=ALLOW_HEADERS,
                                   allow_credentials=False, max_age=600)
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_api(scope["path"]):
            await self.app(scope, receive, send)
            return
        origin = header(scope, b"origin")
        if (origin is not None and scope["method"] == "OPTIONS"
                and header(scope, b"access-control-request-method") is not None
                and not self.allowed(origin)):
            if self.on_reject is not None:
                self.on_reject("cors_origin")
            await send_json_error(scope, send, 403, "this origin may not call the API",
                                  "cors_origin")
            return
        await self.cors(scope, receive, send)

    def allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins  # as CORSMiddleware compares


def _is_api(path: str) -> bool:
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")
