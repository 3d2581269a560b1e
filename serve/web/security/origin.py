"""The Origin check: the CSRF guard of the cookie-authenticated routes."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.web.security.asgi import UNSAFE_METHODS, header, send_json_error


class OriginCheckMiddleware:
    """CSRF guard: a browser POST must come from this site (``Origin``/``Sec-Fetch-Site``).

    Requests without either header (curl, scripts) pass: they carry no ambient cookie
    risk. ``exempt_prefixes`` (the bearer-authenticated API) are not checked.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = (),
                 exempt_prefixes: tuple[str, ...] = ("/v1/",), on_reject=None):
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}
        self.exempt_prefixes = exempt_prefixes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] in UNSAFE_METHODS
                and not scope["path"].startswith(self.exempt_prefixes)
                and not self.same_site(scope)):
            if self.on_reject is not None:
                self.on_reject("bad_origin")
            await send_json_error(scope, send, 403, "cross-site request refused", "bad_origin")
            return
        await self.app(scope, receive, send)

    def same_site(self, scope: Scope) -> bool:
        origin = header(scope, b"origin")
        if origin is not None:
            origin = origin.rstrip("/").lower()
            if origin in self.allowed:
                return True
            host = (header(scope, b"x-forwarded-host") or header(scope, b"host") or "")
            host = host.split(",")[0].strip().lower()
            return origin in (f"http://{host}", f"https://{host}")
        fetch_site = header(scope, b"sec-fetch-site")
        return fetch_site is None or fetch_site.lower() in ("same-origin", "none")
