"""The operations routes: ``/healthz`` (200 or 503 with its problems) and ``/metrics``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.web.chat import chat_of


async def healthz(request: Request) -> Response:
    chat = chat_of(request)
    problems = chat.problems()
    body = {"status": "ok" if not problems else "unhealthy", "problems": problems,
            "model": chat.model_name,
            "broker": "redis" if chat.settings.redis_url else "in-process"}
    return JSONResponse(body, status_code=503 if problems else 200,
                        headers={"Cache-Control": "no-store"})


async def metrics_endpoint(request: Request) -> Response:
    chat = chat_of(request)
    if chat.broker is not None:
        chat.metrics.broker_healthy.set(1 if chat.broker.healthy else 0)
    body, content_type = chat.metrics.render()
    return Response(body, media_type=content_type)


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
