"""The floor: a bare sse-starlette endpoint that streams five fixed pieces.

    python benchmarks/floor/sse_floor.py --port 8000

``POST /v1/chat/completions`` answers five OpenAI-shaped chunks and ``[DONE]`` on the
same Starlette, sse-starlette and uvicorn (``loop="auto"``, ``http="auto"``) as xiaoX:
what the framework costs per streamed reply, with no model and no project code. A
standalone script, run in its own process: it is not a module of the ``benchmarks``
package (the benchmarks never import the web stack).
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

PIECES = ("你", "好", "，", "很高兴", "认识你")


def _chunk(text: str) -> str:
    return json.dumps({"object": "chat.completion.chunk", "model": "floor",
                       "choices": [{"index": 0, "delta": {"content": text},
                                    "finish_reason": None}]},
                      ensure_ascii=False, separators=(",", ":"))


async def completions(request: Request) -> EventSourceResponse:
    await request.body()  # read like a real endpoint would

    async def events():
        for piece in PIECES:
            yield {"data": _chunk(piece)}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                        Route("/healthz", healthz)])

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", loop="auto",
                http="auto", server_header=False)
