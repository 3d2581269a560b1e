"""The app factory: the chat, health and OpenAI routes behind the middleware stack, and
the lifespan that starts and drains the ``Chat``.

``serve.web.chat`` holds the state the routes share, ``serve.web.reply`` 小X's reply task,
``serve.web.chat_routes`` / ``serve.web.health`` / ``serve.web.openai_api`` the routes.
"""

from __future__ import annotations

import contextlib

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serve.web import chat_routes, health, openai_api
from serve.web.chat import Chat
from serve.web.chat_routes import STATIC_DIR
from serve.web.errors import exception_handlers
from serve.web.metrics import Metrics, RequestMetricsMiddleware
from serve.web.security.body_limit import BodyLimitMiddleware
from serve.web.security.cors import ApiCorsMiddleware
from serve.web.security.headers import SecurityHeadersMiddleware
from serve.web.security.hosts import (
    HOSTS_REQUIRED,
    HostCheckMiddleware,
    effective_allowed_hosts,
)
from serve.web.security.origin import OriginCheckMiddleware
from serve.web.security.rate_limit import SharedRateLimiter
from serve.web.security.revocation import RevocationMiddleware, Revocations
from serve.web.security.secret_key import signing_keys
from serve.web.security.session import session_middleware
from serve.web.settings import Settings, settings_from_env


def _middleware(settings: Settings, secret_keys: list[str], metrics: Metrics,
                route_paths: set[str], revocations: Revocations) -> list[Middleware]:
    def count_rejection(reason: str) -> None:
        metrics.errors.labels(reason).inc()

    hosts = effective_allowed_hosts(settings.allowed_hosts, settings.host)
    if not hosts:
        raise ValueError(HOSTS_REQUIRED.format(bind=settings.host))
    # CORS (for /v1/* only) sits outside the body limit and the Origin check, so that the
    # API's refusals reach a permitted page with their CORS headers; the Origin check
    # never applies to /v1/* (bearer key, no cookie).
    cors = ([Middleware(ApiCorsMiddleware, origins=settings.cors_origins,
                        on_reject=count_rejection)] if settings.cors_origins else [])
    return [  # outermost first
        Middleware(RequestMetricsMiddleware, metrics=metrics, routes=route_paths),
        Middleware(SecurityHeadersMiddleware),
        Middleware(HostCheckMiddleware, allowed_hosts=hosts, on_reject=count_rejection),
        *cors,
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                   on_reject=count_rejection),
        Middleware(OriginCheckMiddleware, allowed_origins=settings.allowed_origins,
                   allowed_hosts=hosts, on_reject=count_rejection),
        session_middleware(secret_keys, https_only=settings.cookie_secure),
        Middleware(RevocationMiddleware, revocations=revocations),
    ]


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings if settings is not None else settings_from_env()
    secret_keys = signing_keys(settings.secret_keys, settings.secret_key,
                               settings.secret_key_file)
    metrics = Metrics()
    chat = Chat(settings, metrics)
    revocations = Revocations(lambda: chat.broker)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await chat.start()
        try:
            yield
        finally:
            await revocations.close()
            await chat.stop()

    routes = [
        *chat_routes.routes(),
        *health.routes(),
        *openai_api.routes(),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
    ]
    # The request counter's route labels: the routes' own paths (a bounded set).
    route_paths = {route.path for route in routes if isinstance(route, Route)}
    app = Starlette(routes=routes, middleware=_middleware(settings, secret_keys, metrics,
                                                          route_paths, revocations),
                    lifespan=lifespan, exception_handlers=exception_handlers())
    app.state.chat = chat
    app.state.revocations = revocations
    app.state.login_limiter = SharedRateLimiter("login", settings.login_rate_limit,
                                                settings.login_rate_window, lambda: chat.broker)
    return app


def create_app_from_env() -> Starlette:
    """The factory uvicorn's worker processes import (``serve.web.app:create_app_from_env``)."""
    return create_app(settings_from_env())
