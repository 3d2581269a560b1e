"""Which ``Host`` names are served, and what binding off loopback requires.

A server that answers any ``Host`` can be reached by DNS rebinding: a page of
``evil.example`` whose name now resolves to this server sends ``Host: evil.example`` and
``Origin: http://evil.example``, which match each other. So the names are listed:

- ``allowed_hosts`` (``XIAOX_ALLOWED_HOSTS``), checked by Starlette's
  ``TrustedHostMiddleware`` (an unknown ``Host`` gets a JSON 400, ``bad_host``);
- by default, bound to loopback: the loopback names; bound elsewhere the setting is
  required (``startup_problems``), as is an API key unless ``XIAOX_PUBLIC_API=1``.

``X-Forwarded-Host`` is never read: nginx passes the real ``Host``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.web.security.asgi import send_json_error

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_SEND = "xiaox.host_send"  # the scope key that carries the server's send past the check



def is_loopback(bind: str) -> bool:
    """Whether the bind address only accepts connections from this machine."""
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def effective_allowed_hosts(allowed_hosts: Sequence[str], bind: str) -> tuple[str, ...]:
    """The names to serve: the setting's, else the loopback names on loopback, else none."""
    names = allowed_hosts or (LOOPBACK_NAMES if is_loopback(bind) else ())
    return tuple(_bracketed(h.strip().lower()) for h in names)


def _bracketed(host: str) -> str:
    """An IPv6 address as a ``Host`` header spells it: ``[::1]``."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


HOSTS_REQUIRED = ("bound to {bind}, which is not loopback: set XIAOX_ALLOWED_HOSTS to the "
                  "host names this server answers to (e.g. chat.example.com), so that a page "
                  "served from another name (DNS rebinding) is refused")
API_KEY_REQUIRED = ("bound to {bind}, which is not loopback, without XIAOX_API_KEY: anyone "
                    "could use the /v1 API; set XIAOX_API_KEY, or XIAOX_PUBLIC_API=1 to make "
                    "it public on purpose")


def startup_problems(*, bind: str, allowed_hosts: Sequence[str], api_key: str | None,
                     public_api: bool) -> list[str]:
    """Why the server must not start on ``bind`` with these settings (empty: it may)."""
    if is_loopback(bind):
        return []
    problems = []
    if not allowed_hosts:
        problems.append(HOSTS_REQUIRED.format(bind=bind))
    if not api_key and not public_api:
        problems.append(API_KEY_REQUIRED.format(bind=bind))
    return problems


class HostCheckMiddleware:
    """Starlette's ``TrustedHostMiddleware``, its plain-text 400 replaced by our JSON one."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], on_reject=None):
        self.app = app
        self.on_reject = on_reject
        self.check = TrustedHostMiddleware(self._passed, allowed_hosts=list(allowed_hosts),
                                           www_redirect=False)

    async def _passed(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The app gets the server's own send, not ``sending``: no layer per message.
        scope["xiaox.host_ok"] = True
        await self.app(scope, receive, scope.pop(_SEND, send))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = False

        async def sending(message: Message) -> None:
            nonlocal refused
            if scope.get("xiaox.host_ok"):
                await send(message)
            elif message["type"] == "http.response.start":
                refused = True  # TrustedHostMiddleware's own answer: ours instead, below

        scope[_SEND] = send
        await self.check(scope, receive, sending)
        if refused:
            if self.on_reject is not None:
                self.on_reject("bad_host")
            await send_json_error(scope, send, 400, "this server does not answer to that "
                                  "Host", "bad_host")
