"""The body cap: 413 for a request body over ``max_bytes``, before any parser reads it."""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.web.security.asgi import UNSAFE_METHODS, header, send_json_error


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes`` (declared or streamed), before any parser."""

    drain_bytes = 4 << 20

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, send, receive)
            return
        # Read the (small, capped) body here so a chunked upload cannot exceed the cap.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, send, receive, more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send, receive: Receive,
                      more: bool = True) -> None:
        # Read and drop what the client is still sending (up to a bound): answering while
        # it writes makes the closing socket reset the connection before it reads the 413.
        dropped = 0
        with anyio.move_on_after(2.0):
            while more and dropped < self.drain_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    break
                dropped += len(message.get("body", b""))
                more = message.get("more_body", False)
        if self.on_reject is not None:
            self.on_reject("body_too_large")
        await send_json_error(scope, send, 413,
                              f"the request body is over {self.max_bytes} bytes",
                              "body_too_large", [(b"connection", b"close")])
