"""The engine's step thread: decoder steps back to back, each step's tokens posted once.

One thread owns the shared batch. Between two steps it drops cancelled rows and admits
waiting requests into the free rows (``LaneQueues.admit``: the lanes' shares), under the
engine's lock, without a round trip through the event loop: a request made ready by its
lane's preparer thread joins at the next step. After each step it posts every row's token
to the event loop in one ``call_soon_threadsafe``, then starts the next step at once,
so the event loop streams step N's pieces while step N+1 runs (onnxruntime releases the
GIL). A row's decoder is only touched here; what the event loop needs of a step (the
token, whether the row finished, its log-probs) is captured before the next step runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve.runtime.batch_step import BatchRow, BatchStep
from serve.runtime.lanes import LaneQueues
from serve.runtime.search import TokenLogProb

STOP_SECONDS = 30.0  # a step takes milliseconds: one running this long hangs
log = logging.getLogger(__name__)


@dataclass
class StepTokens:
    """One step's outcome, as posted to the event loop (lists by row)."""

    rows: list
    tokens: list[int]
    finished: list[bool]
    log_probs: list[TokenLogProb | None]
    at: float  # perf_counter when the step ended


class Scheduler:
    """Runs the steps in its own thread (``start``) until ``stop``. ``lock`` guards the
    waiting queues and the gauges: the event loop and the preparer threads take it too;
    ``lock.notify()`` after queueing a request wakes an idle scheduler."""

    def __init__(self, batch: BatchStep, waiting: LaneQueues, max_batch_size: int,
                 lock: threading.Condition, gauges: Callable[[int], None]):
        self.batch = batch
        self.waiting = waiting
        self.max_batch_size = max_batch_size
        self.lock = lock
        self._gauges = gauges  # called under the lock with the rows now in the batch
        self.active: list[BatchRow] = []  # the rows that go on after the last step
        self.in_flight: list[BatchRow] = []  # the rows of the step running now
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stepped_at = time.monotonic()  # the last step's end, or the last idle wait
        self._idle = True  # waiting for rows (not stepping)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self, loop: asyncio.AbstractEventLoop,
              deliver: Callable[[StepTokens], None],
              fail: Callable[[list, Exception], None]) -> None:
        self._stopping = False
        self._idle, self._stepped_at = True, time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(loop, deliver, fail),
                                        name="xiaox-engine-steps", daemon=True)
        self._thread.start()

    def stalled_seconds(self) -> float:
        """How long the thread has gone without ending a step while it had rows to step
        (0 while it waits for rows): a step takes milliseconds, so seconds mean it hangs."""
        return 0.0 if self._idle else time.monotonic() - self._stepped_at

    def stop(self) -> list:
        """Blocking: the step under way ends, then the thread; the rows it held. A step
        still running after ``STOP_SECONDS`` hangs: its (daemon) thread is left behind,
        so that a stop, and the process, still end."""
        with self.lock:
            self._stopping = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_SECONDS)
            if self._thread.is_alive():
                log.error("the decoder step has not ended in %g s: its thread is left "
                          "behind", STOP_SECONDS)
        rows = {id(r): r for r in [*self.active, *self.in_flight]}
        self.active, self.in_flight = [], []
        return list(rows.values())

    def _next_rows(self) -> tuple[list, list] | None:
        """(newcomers, rows) of the next step, waiting while there are none; None once
        stopping."""
        with self.lock:
            while not self._stopping:
                self.active = [r for r in self.active if not r.cancelled]  # type: ignore
                newcomers = self.waiting.admit(self.active,
                                               self.max_batch_size - len(self.active))
                rows = self.active + newcomers
                self._gauges(len(rows))
                if rows:
                    self.in_flight = rows
                    if self._idle:  # (from now on, its steps are timed)
                        self._stepped_at, self._idle = time.monotonic(), False
                    return newcomers, rows
                self._idle = True
                self.lock.wait()
        return None

    def _run(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[StepTokens], None],
             fail: Callable[[list, Exception], None]) -> None:
        while (chosen := self._next_rows()) is not None:
            newcomers, rows = chosen
            try:
                outcome = self._outcome(rows, self.batch.step(newcomers, rows))
            except Exception as e:  # a failing step fails its rows, never the scheduler
                with self.lock:
                    self.active = []
                    self._gauges(0)
                self._stepped_at = time.monotonic()
                self.batch.reset()
                self._post(loop, fail, rows, e)
                continue
            with self.lock:  # the gauge says so before the consumers hear of it
                self.active = [r for r, done in zip(rows, outcome.finished, strict=True)
                               if not done]
                self._gauges(len(self.active))
            self._stepped_at = time.monotonic()
            self._post(loop, deliver, outcome)

    def _outcome(self, rows: list, tokens: list[int]) -> StepTokens:
        eos = self.batch.model.eos_id
        finished, log_probs = [], []
        for row, token in zip(rows, tokens, strict=True):
            decoder = row.decoder
            finished.append(decoder.done)
            wanted = decoder.options.return_log_probs and token != eos
            log_probs.append(decoder.log_probs[-1] if wanted else None)
        return StepTokens(rows, tokens, finished, log_probs, time.perf_counter())

    def _post(self, loop: asyncio.AbstractEventLoop, callback, *args) -> None:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to serve
            self._stopping = True
