"""The session: a signed cookie naming the user and a random session id issued at login.

Limits, presence and revocation are keyed on the session id, never on the self-chosen
name: fifty names do not make fifty budgets, and nobody can spend "alice"'s.

The cookie is Starlette's (``SessionMiddleware``'s format), signed with a key list: the
newest key signs, every key verifies, so a key can be rotated without logging everyone
out. Its ``Secure`` flag is set with ``XIAOX_COOKIE_SECURE``, and also whenever the request
came over HTTPS (behind a trusted proxy: the ``X-Forwarded-Proto`` it reports, which
uvicorn believes from ``XIAOX_TRUSTED_PROXIES`` only).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import itsdangerous
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.web.security.text import InvalidInput

SESSION_COOKIE = "xiaox_session"
SESSION_MAX_AGE = 14 * 24 * 3600


class RotatingSessionMiddleware(SessionMiddleware):
    """``SessionMiddleware`` with a key list (newest first) and a per-request Secure flag."""

    def __init__(self, app: ASGIApp, secret_keys: Sequence[str], **options) -> None:
        if not secret_keys:
            raise ValueError("at least one session key is needed")
        super().__init__(app, secret_key=secret_keys[0], **options)
        # itsdangerous takes the keys oldest to newest and signs with the last one.
        self.signer = itsdangerous.TimestampSigner(list(reversed(secret_keys)))
        self.always_secure = "secure" in self.security_flags.split("; ")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("scheme") == "https" and not self.always_secure:
            send = _secure_cookie(send, self.session_cookie)
        await super().__call__(scope, receive, send)


def _secure_cookie(send: Send, cookie: str) -> Send:
    """``send`` with ``; secure`` added to this cookie's Set-Cookie headers."""
    prefix = f"{cookie}=".encode()

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [
                (k, v + b"; secure" if k.lower() == b"set-cookie" and v.startswith(prefix)
                 else v) for k, v in message.get("headers", [])]}
        await send(message)

    return sending


def session_middleware(secret_keys: Sequence[str] | str, *, https_only: bool) -> Middleware:
    """The signed, HttpOnly, SameSite=Lax cookie; Secure behind HTTPS."""
    keys = [secret_keys] if isinstance(secret_keys, str) else list(secret_keys)
    return Middleware(RotatingSessionMiddleware, secret_keys=keys,
                      session_cookie=SESSION_COOKIE, max_age=SESSION_MAX_AGE, same_site="lax",
                      https_only=https_only)


def log_in(request: Request, user: str) -> str:
    """Start a fresh session for ``user``; returns its new id."""
    request.session.clear()
    sid = secrets.token_urlsafe(18)
    request.session["user"] = user
    request.session["sid"] = sid
    return sid


def log_out(request: Request) -> None:
    request.session.clear()


def current_user(request: Request) -> str | None:
    """The logged-in name; None without a session (or with one from before session ids)."""
    user = request.session.get("user")
    if not isinstance(user, str) or not user or session_id(request) is None:
        return None
    return user


def session_id(request: Request) -> str | None:
    """The random id issued at login, or None when not logged in."""
    sid = request.session.get("sid")
    return sid if isinstance(sid, str) and sid else None


def require_user(request: Request) -> str:
    """The logged-in user, or a 401."""
    user = current_user(request)
    if user is None:
        raise InvalidInput("log in first", status=401, reason="not_logged_in")
    return user
