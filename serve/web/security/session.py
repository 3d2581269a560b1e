"""The session: a signed cookie (Starlette's ``SessionMiddleware``) naming the user and a
random session id issued at login.

Limits, presence and revocation are keyed on the session id, never on the self-chosen
name: fifty names do not make fifty budgets, and nobody can spend "alice"'s.
"""

from __future__ import annotations

import secrets

from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request

from serve.web.security.text import InvalidInput

SESSION_COOKIE = "xiaox_session"
SESSION_MAX_AGE = 14 * 24 * 3600


def session_middleware(secret_key: str, *, https_only: bool) -> Middleware:
    """The signed, HttpOnly, SameSite=Lax cookie; ``https_only`` behind HTTPS."""
    return Middleware(SessionMiddleware, secret_key=secret_key, session_cookie=SESSION_COOKIE,
                      max_age=SESSION_MAX_AGE, same_site="lax", https_only=https_only)


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
