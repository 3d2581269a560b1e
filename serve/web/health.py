"""The operations routes: the probes and ``/metrics``.

- ``/livez``: the process answers (no dependency is checked): 200 while it serves.
- ``/readyz``: the model is loaded, the broker reachable and the process not draining:
  200, else 503; the body names each check and which failed, in fixed words (never a
  host, a port or an error message).
- ``/healthz``: readiness with the problems spelt out (200 or 503), as before.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.web.chat import chat_of

_NO_STORE = {"Cache-Control": "no-store"}


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "alive"}, headers=_NO_STORE)


def readiness(chat: Any) -> dict[str, Any]:
    """Each readiness check's state ("ok" or why not), and the checks that failed."""
    engine = chat.engine
    if engine is None:
        model = "loading"
    elif not engine.running:
        model = "stopped"
    else:
        model = "ok"
    if chat.broker is None:
        broker = "not started"
    elif not chat.broker.healthy:
        broker = "unreachable"
    else:
        broker = "ok"
    checks = {"model": model, "broker": broker, "draining": "yes" if chat.closing else "ok"}
    failed = [name for name, state in checks.items() if state != "ok"]
    return {"status": "ready" if not failed else "not ready", "failed": failed,
            "checks": checks}


async def readyz(request: Request) -> Response:
    body = readiness(chat_of(request))
    return JSONResponse(body, status_code=503 if body["failed"] else 200, headers=_NO_STORE)


async def healthz(request: Request) -> Response:
    chat = chat_of(request)
    problems = chat.problems()
    body = {"status": "ok" if not problems else "unhealthy", "problems": problems,
            "model": chat.model_name,
            "broker": "redis" if chat.settings.redis_url else "in-process"}
    return JSONResponse(body, status_code=503 if problems else 200, headers=_NO_STORE)


async def metrics_endpoint(request: Request) -> Response:
    chat = chat_of(request)
    chat.metrics.sync(chat.broker)
    body, content_type = chat.metrics.render()
    return Response(body, media_type=content_type)


def routes() -> list[Route]:
    return [
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
