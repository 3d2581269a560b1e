"""A streamed completion on the wire: its chunks as text templates, the event-stream
response that sends them, and the watch on the client that cancels a request whose client
hung up.

Why not a dict and ``json.dumps`` per token, and Starlette's ``StreamingResponse``: both
cost per token and per request more than the rest of the route (``benchmarks/results/
web_layer.md``). A chunk's id, object, created and model are the same for every chunk of
a request: they are formatted once (``ChunkFormat``), and a token's chunk is one string
join around its JSON-escaped text, byte for byte what ``json.dumps`` gives
(``tests/serve/web/test_openai_stream.py`` compares them). ``EventStream`` sends each
chunk as one ASGI message, the last one closing the body (no separate empty message), and
watches for the client leaving with one task for the whole request (``ClientWatch``), not
a task group per response.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from json.encoder import encode_basestring  # what json.dumps(ensure_ascii=False) uses
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def data(obj: Any) -> bytes:
    """One SSE event of a JSON value (compact, UTF-8 as it is)."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


class Last(bytes):
    """The body's last piece: sent with ``more_body: False``."""


class ChunkFormat:
    """The chunks of one streamed completion, as ``data()`` of OpenAI's chunk objects
    would spell them: ``{"id", "object", "created", "model", "system_fingerprint",
    "choices": [one choice]}``."""

    def __init__(self, completion_id: str, created: int, model: str, chat_api: bool):
        kind = "chat.completion.chunk" if chat_api else "text_completion"
        self.chat_api = chat_api
        self.envelope = {"id": completion_id, "object": kind, "created": created,
                         "model": model, "system_fingerprint": None}
        head = json.dumps(self.envelope, ensure_ascii=False, separators=(",", ":"))
        self.head = "data: " + head[:-1] + ',"choices":[{"index":'
        self.text_key = ',"delta":{"content":' if chat_api else ',"text":'
        self.text_end = "}," if chat_api else ","

    def first(self, index: int) -> bytes:
        """A chat choice's first chunk: the assistant's role, no content yet."""
        return (f'{self.head}{index},"delta":{{"content":"","role":"assistant"}},'
                '"logprobs":null,"finish_reason":null}]}\n\n').encode()

    def text(self, index: int, text: str, logprobs: Any = None) -> bytes:
        """A piece of choice ``index``'s text (with its tokens' log-probs, if any)."""
        lp = "null" if logprobs is None else json.dumps(logprobs, ensure_ascii=False,
                                                         separators=(",", ":"))
        return (f"{self.head}{index}{self.text_key}{encode_basestring(text)}{self.text_end}"
                f'"logprobs":{lp},"finish_reason":null}}]}}\n\n').encode()

    def end(self, index: int, finish: str | None) -> bytes:
        """A choice's last chunk: no text, its finish reason."""
        body = ',"delta":{}' if self.chat_api else ',"text":""'
        return (f"{self.head}{index}{body},\"logprobs\":null,\"finish_reason\":"
                f"{json.dumps(finish)}}}]}}\n\n").encode()

    def usage(self, usage: dict[str, int]) -> bytes:
        return data({**self.envelope, "choices": [], "usage": usage})


class ClientWatch:
    """Watches ``receive`` for ``http.disconnect`` while a request is worked on and
    streamed: when the client hangs up, the task that started the watch is cancelled
    (``gone`` then says why), so that its engine requests are freed at once."""

    def __init__(self, receive: Receive):
        self.gone = False
        self._owner = asyncio.current_task()
        self._task: asyncio.Task | None = asyncio.get_running_loop().create_task(
            self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._task is not None and self._owner is not None:  # not stopped yet
            self.gone = True
            self._owner.cancel()

    def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    def absorb(self, error: BaseException) -> bool:
        """Whether ``error`` (a CancelledError) is the client leaving; it is then taken
        back, so the task goes on (cleanup, then the end of the request)."""
        if self.gone and isinstance(error, asyncio.CancelledError):
            if self._owner is not None:
                self._owner.uncancel()
            return True
        return False


class EventStream(Response):
    """``text/event-stream`` of ``chunks``: one ASGI message each (a ``Last`` ends the
    body); ``watch`` (the request's ``ClientWatch``) is stopped when it ends."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], watch: ClientWatch | None,
                 headers: dict[str, str] | None = None):
        self.chunks, self.watch = chunks, watch
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = self.watch or ClientWatch(receive)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            await self._send_all(send)
        except asyncio.CancelledError as e:
            if not watch.absorb(e):
                raise
        finally:
            watch.stop()
            try:  # the generator's cleanup (its engine requests), here and now
                await self.chunks.aclose()  # type: ignore[attr-defined]
            except asyncio.CancelledError as e:
                if not watch.absorb(e):
                    raise

    async def _send_all(self, send: Send) -> None:
        ended = False
        async for chunk in self.chunks:
            ended = type(chunk) is Last
            await send({"type": "http.response.body", "body": bytes(chunk) if ended
                        else chunk, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
