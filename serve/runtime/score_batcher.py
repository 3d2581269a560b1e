"""Scoring for concurrent requests, gathered into one onnxruntime call per graph.

While one scoring call runs in a worker thread, the candidates of other requests queue;
the next call takes them all (up to ``max_pairs``), so that under load a call scores the
candidates of many requests, and alone a request waits for no one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence

from serve.runtime.scoring import IdPair, PairScore

ScoreFn = Callable[[Sequence[IdPair]], list[PairScore]]


class ScoreBatcher:
    def __init__(self, score: ScoreFn, *, max_pairs: int = 40):
        # More pairs a call would not be cheaper per pair; the graph runs them in slices
        # (``scoring.RUN_ROWS``), which bounds the memory a call holds.
        if max_pairs < 1:
            raise ValueError("max_pairs must be >= 1")
        self._score = score
        self.max_pairs = max_pairs
        self._pending: deque[tuple[list[IdPair], asyncio.Future]] = deque()
        self._task: asyncio.Task | None = None
        self.calls = 0  # scoring calls made (each scores every pair it took, in one run)

    async def score(self, pairs: Sequence[IdPair]) -> list[PairScore]:
        """The scores of ``pairs``, in order; cancelling the caller drops its pairs if
        their call has not begun."""
        if not pairs:
            return []
        future = asyncio.get_running_loop().create_future()
        job = (list(pairs), future)
        self._pending.append(job)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="xiaox-scoring")
        try:
            return await future
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._pending.remove(job)
            raise

    async def _drain(self) -> None:
        while self._pending:
            jobs = [self._pending.popleft()]
            size = len(jobs[0][0])
            while self._pending and size + len(self._pending[0][0]) <= self.max_pairs:
                jobs.append(self._pending.popleft())
                size += len(jobs[-1][0])
            jobs = [(pairs, f) for pairs, f in jobs if not f.done()]
            if not jobs:
                continue
            try:
                scores = await asyncio.to_thread(self._score, [p for pairs, _ in jobs
                                                               for p in pairs])
            except Exception as e:  # a failing call fails its requests, never the batcher
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.calls += 1
            start = 0
            for pairs, future in jobs:
                if not future.done():
                    future.set_result(scores[start : start + len(pairs)])
                start += len(pairs)
