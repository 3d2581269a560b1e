"""The operations routes: the probes and ``/metrics``.

- ``/livez``: the process answers (no dependency is checked): 200 while it serves.
- ``/readyz``: the model is loaded (and its decoder steps not stalled), the broker
  reachable and the process not draining: 200, else 503; the body names each check and
  which failed, in fixed words (never a host, a port or an error message).
- ``/healthz``: readiness with the problems spelt out (200 or 503), in the same fixed words.
- ``/metrics``: only for the ``metrics_allow`` addresses (default loopback); a 404 for
  anyone else (behind nginx the client is the real one, see ``XIAOX_TRUSTED_PROXIES``).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve.web.chat import chat_of
from serve.web.security.client import client_ip

_NO_STORE = {"Cache-Control": "no-store"}


async def livez(request: Request) -> Response:
    return JSONResponse({"status": "alive"}, headers=_NO_STORE)


# An engine in the server's process whose decoder steps made no progress this long while
# it had rows to step hangs: the probes say so, for whatever restarts the server. (An
# engine in a process of its own is replaced by the server itself: it has no such wait.)
ENGINE_STALLED_SECONDS = 10.0


def _stalled_seconds(engine: Any) -> float:
    stalled = getattr(engine, "stalled_seconds", None)  # (an engine process: none)
    return stalled() if stalled is not None else 0.0


def readiness(chat: Any) -> dict[str, Any]:
    """Each readiness check's state ("ok" or why not), and the checks that failed."""
    engine = chat.engine
    if engine is None:
        model = "loading"
    elif not engine.running:
        model = "stopped"
    elif _stalled_seconds(engine) >= ENGINE_STALLED_SECONDS:
        model = "stalled"
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
    """Readiness with its problems, in fixed words: no host, port, address or error text
    (``chat.problems()`` has those, for the log)."""
    chat = chat_of(request)
    ready = readiness(chat)
    broker = "redis" if chat.settings.redis_url else "in-process"
    words = {"model": "model", "broker": broker, "draining": "shutting down"}
    problems = [words[name] if name == "draining" else f"{words[name]}: {ready['checks'][name]}"
                for name in ready["failed"]]
    body = {"status": "ok" if not problems else "unhealthy", "problems": problems,
            "model": chat.model_name, "broker": broker}
    return JSONResponse(body, status_code=503 if problems else 200, headers=_NO_STORE)


@functools.lru_cache(maxsize=8)
def _networks(allowed: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                  ...]:
    return tuple(ipaddress.ip_network(a, strict=False) for a in allowed)


def metrics_allowed(ip: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``ip`` is in one of the ``metrics_allow`` addresses or networks."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False  # "unknown" (no client address) is nobody's
    return any(address in net for net in _networks(allowed)
               if net.version == address.version)


async def metrics_endpoint(request: Request) -> Response:
    chat = chat_of(request)
    if not metrics_allowed(client_ip(request.scope), tuple(chat.settings.metrics_allow)):
        # 404, as for a path that does not exist: nothing to learn from the refusal
        chat.metrics.errors.labels("metrics_refused").inc()
        return JSONResponse({"error": "not found", "reason": "not_found"}, status_code=404)
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
