"""The Origin check: the CSRF guard of the cookie-authenticated routes."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.web.security.asgi import UNSAFE_METHODS, header, send_json_error


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """``host`` (lower case, IPv6 in brackets) against names and ``*.domain`` patterns, as
    Starlette's ``TrustedHostMiddleware`` compares."""
    return any(host == p or p == "*" or (p.startswith("*.") and host.endswith(p[1:]))
               for p in patterns)


class OriginCheckMiddleware:
    """CSRF guard: a browser POST must come from this site (``Origin``/``Sec-Fetch-Site``).

    "This site" is an origin whose host is one of the allowed hosts, and the very host
    (and port, when the ``Host`` header names one) the request was sent to; never merely
    "the same as the ``Host`` header", which a rebinding page chooses. ``X-Forwarded-Host``
    is not read. ``allowed_origins`` are accepted as they are.

    Requests without either header (curl, scripts) pass: they carry no ambient cookie
    risk. ``exempt_prefixes`` (the bearer-authenticated API) are not checked.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = (),
                 exempt_prefixes: tuple[str, ...] = ("/v1/",), on_reject=None,
                 allowed_hosts: Iterable[str] = ("*",)):
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}
        self.allowed_hosts = tuple(allowed_hosts)
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
            return origin in self.allowed or self._own_origin(origin, header(scope, b"host"))
        fetch_site = header(scope, b"sec-fetch-site")
        return fetch_site is None or fetch_site.lower() in ("same-origin", "none")

    def _own_origin(self, origin: str, host_header: str | None) -> bool:
        try:
            o = urlsplit(origin)
            h = urlsplit("//" + (host_header or "").strip().lower())
            o_port, h_port = o.port, h.port
        except ValueError:
            return False
        if o.scheme not in ("http", "https") or not o.hostname or o.path:
            return False
        o_host = _spelt(o.hostname)
        if not host_matches(o_host, self.allowed_hosts) or o_host != _spelt(h.hostname or ""):
            return False
        # behind nginx the Host may carry no port ($host); when it does, it must agree
        default = 443 if o.scheme == "https" else 80
        return h_port is None or (o_port or default) == h_port


def _spelt(hostname: str) -> str:
    """urlsplit drops IPv6 brackets: put them back, as a Host header spells it."""
    return f"[{hostname}]" if ":" in hostname else hostname
