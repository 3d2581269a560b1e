"""A free engine: xiaoX's web layer with no model work, to measure what the web layer
costs on its own.

    XIAOX_ENGINE=free_engine:FreeEngine PYTHONPATH=benchmarks/floor python -m serve ...

Every streamed request gets the floor's five pieces (``sse_floor.py``), one per "step":
a thread wakes every millisecond and posts one callback to the event loop that hands
each active request its next piece, as the engine's scheduler posts one per decoder
step. The prompt is tokenized as the engine's preparer does; nothing else runs. The
same server, routes and middleware as xiaoX; only ``Engine.stream`` is replaced.
"""

from __future__ import annotations

import asyncio
import threading
import time

from serve.runtime.engine import Engine, Piece
from serve.runtime.search import GenerationResult, source_ids

PIECES = ("你", "好", "，", "很高兴", "认识你")  # the floor's
STEP_SECONDS = 0.001


class FreeStream:
    """``engine.stream()``'s stand-in: the pieces, then ``result``."""

    def __init__(self, engine: FreeEngine, text: str):
        self.engine, self.text = engine, text
        self.result: GenerationResult | None = None

    async def pieces(self):
        source_ids(self.engine.model, self.text)  # the preparer's tokenizing
        queue: asyncio.Queue = asyncio.Queue()
        self.engine.join(queue)
        while True:
            piece = await queue.get()
            if piece is None:
                self.result = GenerationResult("".join(PIECES), [5] * len(PIECES), None,
                                               "length")
                return
            yield piece


class FreeEngine(Engine):
    """``Engine`` whose streams cost no model work (see the module docstring)."""

    async def start(self) -> None:
        await super().start()
        self._free_loop = asyncio.get_running_loop()
        self._active: list[list] = []  # [queue, pieces sent]
        self._wanted = threading.Event()
        threading.Thread(target=self._steps, name="free-engine-steps", daemon=True).start()

    def stream(self, text, options=None, *, lane=None, **kwargs) -> FreeStream:  # noqa: ARG002
        return FreeStream(self, text)

    def join(self, queue: asyncio.Queue) -> None:
        self._active.append([queue, 0])
        self._wanted.set()

    def _steps(self) -> None:
        while True:
            self._wanted.wait()
            time.sleep(STEP_SECONDS)
            self._free_loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """One step: every active request's next piece (None once it has them all)."""
        still = []
        for entry in self._active:
            queue, sent = entry
            queue.put_nowait(Piece(PIECES[sent], 5) if sent < len(PIECES) else None)
            if sent < len(PIECES):
                entry[1] += 1
                still.append(entry)
        self._active = still
        if not still:
            self._wanted.clear()
