"""What the pure ASGI middlewares share: the unsafe methods, a header, a JSON error."""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import Scope, Send

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the (lower-case) header ``name``, or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json_error(scope: Scope, send: Send, status: int, message: str, reason: str,
                          headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """An error sent before any route runs: OpenAI's shape under ``/v1`` (its SDKs parse
    nothing else), the app's own ``{"error", "reason"}`` elsewhere."""
    if scope.get("path", "").startswith("/v1"):
        kind = "rate_limit_error" if status == 429 else "invalid_request_error"
        payload: dict = {"error": {"message": message, "type": kind, "param": None,
                                   "code": reason}}
    else:
        payload = {"error": message, "reason": reason}
    body = json.dumps(payload, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
