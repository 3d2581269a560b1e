"""Error responses: ``{"error", "reason"}`` JSON, each counted by its reason."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve.web.chat import chat_of
from serve.web.security.text import InvalidInput

log = logging.getLogger("xiaox.app")


def error_response(status: int, message: str, reason: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status,
                        headers=headers)


async def invalid_input_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidInput)
    chat_of(request).metrics.errors.labels(exc.reason).inc()
    # The real window where the raiser knows it (serve.web.fields.try_later), else 5 s.
    retry_after = getattr(exc, "retry_after", 5)
    headers = {"Retry-After": str(retry_after)} if exc.status in (429, 503) else None
    return error_response(exc.status, str(exc), exc.reason, headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    chat_of(request).metrics.errors.labels(reason).inc()
    return error_response(exc.status_code, str(exc.detail), reason, exc.headers)


async def server_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "internal")


def exception_handlers() -> dict:
    """The app's handlers, as ``Starlette(exception_handlers=...)`` takes them."""
    return {InvalidInput: invalid_input_handler,
            HTTPException: http_exception_handler,
            500: server_error_handler}
