"""The session: a signed cookie (Starlette's ``SessionMiddleware``) naming the user."""

from __future__ import annotations

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


def log_in(request: Request, user: str) -> None:
    request.session.clear()
    request.session["user"] = user


def log_out(request: Request) -> None:
    request.session.clear()


def current_user(request: Request) -> str | None:
    user = request.session.get("user")
    return user if isinstance(user, str) and user else None


def require_user(request: Request) -> str:
    """The logged-in user, or a 401."""
    user = current_user(request)
    if user is None:
        raise InvalidInput("log in first", status=401, reason="not_logged_in")
    return user
