"""Continuous batching: concurrent requests share each decoder step.

One thread (the scheduler, ``serve.runtime.scheduler``) owns the batch and runs its steps
back to back. Between two steps it

1. drops cancelled rows and admits waiting requests up to ``max_batch_size`` (each lane up
   to its guaranteed rows first, then idle rows lent: ``serve.runtime.lanes``);
2. runs one decoder step for every row, padding ``memory`` and ``memory_keys`` with zeros
   and ``src_mask`` with 0 to the batch's longest source, and lets every row choose its
   token with its own rules and its own seeded RNG (``serve.runtime.batch_step``);
3. posts every row's token to the event loop in one callback, which sends each streaming
   row's text delta to its consumer (a whole reply, ``generate``, gets only its end).

A request's tokens, rules (a vocabulary scan for new suppressed words) and encoder (batch
1, its own source length) are made in a worker thread before it is queued: one thread a
lane, so that one lane's costly word lists delay neither the other lane nor the decoder
steps. That thread queues the request itself; it joins the batch at the next step.

Since every row's log-probs do not depend on the other rows (fp32 onnxruntime computes
each row alone; the padding is masked out exactly) and a row's choice only depends on its
own history and RNG, a request's result is identical to decoding it alone. An int8 model
quantizes activations per tensor (over the whole batch), so there a batched row can
differ from the same row alone in the last digits.

Beam search requests do not join the shared batch: each runs its own decode (a batch of
``beam_size`` rows) in a worker thread, one beam at a time, and returns its final n-best.

A reply chosen among candidates (``serve.runtime.replies``: the hybrid mode, or several
proposals) is made of parts that batch the same way, from the message tokenized once:
retrieval in a worker thread, the model's proposals as ordinary rows of the shared
batch, and the scoring of every candidate of every concurrent request in one call per
graph (``ScoreBatcher``). The chosen reply then streams piece by piece like a decoded
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from serve.runtime.batch_step import BatchRow, BatchStep
from serve.runtime.lanes import DEFAULT_LANE, Lane, LaneQueues
from serve.runtime.model import OnnxSeq2Seq
from serve.runtime.options import DecodingOptions
from serve.runtime.replies import (
    ReplySources,
    forward_token_log_probs,
    generated_candidates,
    reply_deltas,
    score_pairs,
)
from serve.runtime.rules import TokenRules
from serve.runtime.scheduler import Scheduler, StepTokens
from serve.runtime.score_batcher import ScoreBatcher
from serve.runtime.search import (
    INLINE_TOKENIZE_CHARS,
    MAX_SOURCE_LENGTH,
    DecodingCancelled,
    GenerationResult,
    SequenceDecoder,
    TokenLogProb,
    beam_search,
    request_rng,
    source_ids,
    text_delta,
)
from serve.runtime.selection import usable

__all__ = ["Engine", "EngineStats", "EngineStopped", "GenerationResult", "Lane", "Overloaded",
           "Piece", "Stream"]


class Overloaded(Exception):
    """The request queue is full: try again later (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is not running (not started yet, or stopped while the request waited)."""


@dataclass
class EngineStats:
    """Live counters for metrics. Latencies go to ``Engine(on_metric=...)`` as they happen."""

    queue_size: int = 0  # requests waiting to join the batch (beam requests included)
    active: int = 0  # rows in the current decoder batch
    beams_running: int = 0
    requests_total: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    overloaded_total: int = 0
    tokens_total: int = 0  # generated tokens (</s> included)
    steps_total: int = 0  # batched decoder steps run
    restarts_total: int = 0  # engine processes started again after one died (RemoteEngine)


MetricCallback = Callable[[str, float], None]
"""``on_metric(name, seconds)`` with name one of ``time_to_first_token``,
``inter_token_latency``, ``request_latency``."""


class _Request(BatchRow):
    """A queued or batched request: its row of the batch and its consumer's events
    (made on the event loop; ``attach`` gives it its row once prepared)."""

    def __init__(self, lane: str, streaming: bool, events: Any = None):
        self.lane = lane
        self.streaming = streaming  # a piece event per token; else only the end
        # put_nowait((kind, value)) on the event loop: a queue its consumer reads, or a
        # _Relay that hands each event on at once
        self.events: asyncio.Queue[tuple[str, object]] = (
            asyncio.Queue() if events is None else events)
        self.cancelled = False
        self.held = True  # counted in its lane's queue while being prepared
        self.submitted = time.perf_counter()
        self.last_token_at: float | None = None
        self.last_piece = ""
        self.closed = False  # its "done" or "error" event was sent
        self.decoder = None  # type: ignore[assignment]  # set once prepared (attach)

    def attach(self, src_ids: list[int], decoder: SequenceDecoder) -> None:
        BatchRow.__init__(self, src_ids, decoder)


@dataclass(frozen=True)
class Piece:
    """What one decoded token adds to the reply (``text`` may be empty), with its token and
    (with ``return_log_probs``) its log-probs; a chosen or beam reply's pieces have
    neither (``token_id`` None)."""

    text: str
    token_id: int | None = None
    log_prob: TokenLogProb | None = None


class Stream:
    """``async for delta in engine.stream(...)``: the reply's text, piece by piece
    (``stream.pieces()``: one ``Piece`` per token instead).

    After the loop, ``result`` holds the GenerationResult. Leaving the loop early (break,
    an exception, or the consumer task being cancelled) cancels the request.
    """

    def __init__(self, engine: Engine, text: str, options: DecodingOptions,
                 lane: str | None = None):
        self._engine = engine
        self._text = text
        self._options = options
        self._lane = lane
        self.result: GenerationResult | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        pieces = self.pieces()
        try:
            async for piece in pieces:
                if piece.text:
                    yield piece.text
        finally:
            await pieces.aclose()

    async def pieces(self) -> AsyncIterator[Piece]:
        """One ``Piece`` per decoded token (a chosen reply: per word or character)."""
        if self._engine.sources.needs_selection(self._options):  # chosen, then streamed
            self.result = await self._engine._select(self._text, self._options, self._lane)
            for delta in reply_deltas(self._engine.model, self.result.text):
                yield Piece(delta)
            return
        if self._options.beam_size > 1:  # beam search has no partial text: one final delta
            self.result = await self._engine.generate(self._text, options=self._options,
                                                      lane=self._lane)
            if self.result.text:
                yield Piece(self.result.text)
            return
        request = self._engine._submit(self._text, self._options, self._lane, True)
        try:
            while True:
                kind, value = await request.events.get()
                if kind == "piece":
                    yield value  # type: ignore[misc]
                elif kind == "done":
                    self.result = value  # type: ignore[assignment]
                    return
                else:
                    raise value  # type: ignore[misc]
        finally:
            if self.result is None:
                self._engine._cancel(request)


class Engine:
    """Continuous batching over one model. See the module docstring."""

    def __init__(
        self,
        model: OnnxSeq2Seq,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_source_length: int = MAX_SOURCE_LENGTH,
        on_metric: MetricCallback | None = None,
        sources: ReplySources | None = None,
        lanes: dict[str, Lane] | None = None,
    ):
        """``sources``: the folder's reply index, scoring graphs and selection weights
        (``ReplySources.load(model)``); None serves plain generation. ``lanes``: who
        submits, each with its share of the batch and its own queue cap
        (``serve.runtime.lanes``); None: one lane of the whole batch and queue."""
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        lanes = lanes or {DEFAULT_LANE: Lane(rows=max_batch_size, queue=max_queue)}
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_source_length = max_source_length
        self.on_metric = on_metric
        self.stats = EngineStats()
        self._waiting = LaneQueues(lanes)
        self.lanes = self._waiting.lanes
        # The waiting queues and the gauges, shared by the event loop, the preparers and
        # the scheduler's thread (reentrant: the gauges are set under it too).
        self._lock = threading.Condition(threading.RLock())
        self._accepting = False  # prepared requests are queued (not once stopped)
        self._beams_waiting = 0
        self._selecting: Counter[str] = Counter()  # chosen replies under way, per lane
        self._preparers = _preparers(self.lanes)
        self._beam_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch = BatchStep(model)
        self._scheduler = Scheduler(self._batch, self._waiting, max_batch_size, self._lock,
                                    self._update_sizes)
        self.sources = sources or ReplySources()
        self._scoring = ScoreBatcher(lambda pairs: score_pairs(self.sources, pairs))

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._scheduler.alive

    def stalled_seconds(self) -> float:
        """How long the decoder steps have made no progress while there were rows to
        step (0 while they run, or wait for requests): the sign of a hung step thread."""
        return self._scheduler.stalled_seconds()

    async def start(self) -> None:
        if self.running:
            return
        self._beam_lock = asyncio.Lock()
        # jieba loads its dictionary on first use (about a second): not on the event loop.
        await asyncio.to_thread(self.model.tokenizer.encode, "你好")
        self._accepting = True
        self._loop = asyncio.get_running_loop()  # where the preparers post failures
        self._scheduler.start(self._loop, self._deliver_step,
                              self._fail_step)

    async def stop(self) -> None:
        """Stop the scheduler; waiting and active requests end with ``EngineStopped``."""
        with self._lock:
            self._accepting = False
        rows = await asyncio.to_thread(self._scheduler.stop)  # the step under way ends
        with self._lock:
            pending = {id(r): r for r in [*self._waiting, *rows]}
            self._waiting.clear()
        for request in pending.values():
            if not request.closed:
                request.closed = True  # a step posted before the stop delivers nothing
                request.events.put_nowait(("error", EngineStopped("the engine stopped")))
        for pool in self._preparers.values():
            pool.shutdown(wait=False)  # what it still holds ends in EngineStopped
        self._preparers = _preparers(self.lanes)
        self._batch.reset()
        self._update_sizes(0)

    # -- public API -----------------------------------------------------------------------
    def stream(self, text: str, options: DecodingOptions | None = None, *,
               lane: str | None = None, **kwargs) -> Stream:
        """Text deltas as tokens are decoded (greedy and sampling; beam yields its best
        reply once at the end). Options as ``DecodingOptions`` or keyword arguments;
        ``lane``: whose request it is (None: the first lane).

        Overloaded, EngineStopped and ValueError (bad text, option or lane) are raised
        when iteration begins.
        """
        return Stream(self, text, decoding_options(options, kwargs), lane)

    async def generate(
        self, text: str, options: DecodingOptions | None = None, *,
        lane: str | None = None, **kwargs
    ) -> GenerationResult:
        """The whole reply. Cancelling the awaiting task frees the request's slot."""
        options = decoding_options(options, kwargs)
        if self.sources.needs_selection(options):
            return await self._select(text, options, lane)
        return await self._generate_plain(text, options, lane)

    def relay(self, text: str, options: DecodingOptions,
              sink: Callable[[str, object], None], *, lane: str | None = None
              ) -> Callable[[], None]:
        """A decoded reply's events handed to ``sink(kind, value)`` on the event loop as
        they come: ``"piece"`` (a ``Piece``) per token, then ``"done"`` (the
        ``GenerationResult``) or ``"error"`` (the exception). No task or queue per
        request: the engine's process forwards them so. Returns the request's cancel.
        Overloaded and EngineStopped are raised here; a chosen or beam reply is not
        decoded token by token (``stream`` serves those), so it is a ValueError."""
        if options.beam_size > 1 or self.sources.needs_selection(options):
            raise ValueError("relay decodes plain replies: use stream for a chosen or "
                             "beam reply")
        request = self._submit(text, options, lane, True, _Relay(sink))
        return lambda: self._cancel(request)

    async def forward_log_probs(self, text: str, replies: list[list[int]]
                                ) -> list[list[float]] | None:
        """Each reply's per-token log p(token | message, the tokens before) by the folder's
        forward scoring graph (the model's own, no rules), in a worker thread; None when
        the folder has none."""
        src = source_ids(self.model, text, self.max_source_length)
        return await asyncio.to_thread(forward_token_log_probs, self.sources, src, replies)

    async def _generate_plain(self, text: str, options: DecodingOptions,
                              lane: str | None = None, src: list[int] | None = None
                              ) -> GenerationResult:
        """The decoder's own reply, no selection (``src``: the message's source ids, when
        the caller has them)."""
        if options.beam_size > 1:
            return await self._generate_beam(text, options, lane)
        request = self._submit(text, options, lane, False, src=src)  # no events per token
        done = False
        try:
            kind, value = await request.events.get()
            done = kind == "done"
        finally:
            if not done:
                self._cancel(request)
        if not done:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]

    # -- requests -------------------------------------------------------------------------
    def _check_capacity(self, lane: str | None) -> str:
        """The request's lane, which has room for it in its queue."""
        if not self.running:
            raise EngineStopped("the engine is not running: await engine.start() first")
        name = self._waiting.name(lane)
        with self._lock:
            full = self._waiting.full(name)
        if full:
            self.stats.overloaded_total += 1
            raise Overloaded(f"the request queue is full ({self.lanes[name].queue} "
                             f"waiting in lane {name!r})")
        return name

    def _submit(self, text: str, options: DecodingOptions, lane: str | None,
                streaming: bool, events: Any = None, src: list[int] | None = None
                ) -> _Request:
        """The request, handed to its lane's preparer: it joins the batch once prepared,
        and a failure to prepare it (a bad text, the engine stopping) is its one event."""
        request = _Request(self._check_capacity(lane), streaming, events)
        self._hold(request.lane)
        # Tokenizing, a vocabulary scan and the encoder take milliseconds: not on the
        # event loop, and in the lane's own thread, so that a lane's costly word lists
        # delay only itself. Nothing comes back from that thread but the request's
        # events: no future and no wake-up of the event loop per request.
        self._preparers[request.lane].submit(self._prepare, request, text, options, src)
        return request

    def _prepare(self, request: _Request, text: str, options: DecodingOptions,
                 src: list[int] | None = None) -> None:
        """Worker thread: the request's source tokens, rules, decoder and encoder; then
        it is queued (the scheduler admits it at its next step)."""
        if request.cancelled:  # while it waited for this thread: nothing to make
            return
        try:
            if src is None:
                src = source_ids(self.model, text, self.max_source_length)
            rules = TokenRules.for_model(self.model, options)
            request.attach(src, SequenceDecoder(rules, request_rng(options)))
            self._batch.encode(request)  # here, beside the running step, not inside it
        except Exception as e:
            with self._lock:
                self._unhold(request)
                self._update_sizes()
            self._post_error(request, e)
            return
        with self._lock:
            queued = self._unhold(request) and not request.cancelled and self._accepting
            if queued:
                self._waiting.append(request)
                self.stats.requests_total += 1
                self._lock.notify()
        if not queued and not request.cancelled:  # the engine stopped meanwhile
            self._post_error(request, EngineStopped("the engine stopped"))

    def _post_error(self, request: _Request, error: Exception) -> None:
        """From a worker thread: the request's end with ``error`` (unless it has one)."""
        def fail() -> None:
            if not request.closed:
                request.closed = True
                request.events.put_nowait(("error", error))

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
            self._loop.call_soon_threadsafe(fail)  # type: ignore[union-attr]

    def _hold(self, lane: str) -> None:
        with self._lock:
            self._waiting.hold(lane)
            self._update_sizes()

    def _release(self, lane: str) -> None:
        with self._lock:
            self._waiting.release(lane)
            self._update_sizes()

    def _unhold(self, request: _Request) -> bool:
        """Under the lock: the request leaves its lane's count of those being prepared
        (once); False when it already had."""
        if not request.held:
            return False
        request.held = False
        self._waiting.release(request.lane)
        return True

    def _cancel(self, request: _Request) -> None:
        """Called from the consumer's side: the row leaves before the next step."""
        if request.cancelled or request.closed or (request.decoder is not None
                                                    and request.decoder.done):
            return
        request.cancelled = True
        self.stats.requests_cancelled += 1
        with self._lock:
            self._unhold(request)  # still being prepared: its place is free at once
            self._waiting.remove(request)
            self._update_sizes()

    async def _generate_beam(self, text: str, options: DecodingOptions,
                             lane: str | None = None) -> GenerationResult:
        lane = self._check_capacity(lane)
        self._hold(lane)  # a place in its lane's queue until the beam runs
        try:  # tokenizing takes milliseconds: not on the event loop
            src = await asyncio.to_thread(source_ids, self.model, text, self.max_source_length)
        except BaseException:
            self._release(lane)
            raise
        with self._lock:  # the preparers count theirs from their threads
            self.stats.requests_total += 1
        stop_flag = threading.Event()
        started = time.perf_counter()
        self._beams_waiting += 1
        waiting = True
        self._update_sizes()
        try:
            assert self._beam_lock is not None
            async with self._beam_lock:  # one beam at a time: it already is a batch
                self._beams_waiting -= 1
                self._release(lane)
                waiting = False
                self.stats.beams_running += 1
                self._update_sizes()
                task = asyncio.ensure_future(
                    asyncio.to_thread(beam_search, self.model, src, options, stop_flag.is_set)
                )
                try:
                    result = await asyncio.shield(task)
                except asyncio.CancelledError:
                    stop_flag.set()  # the thread stops before its next step
                    with contextlib.suppress(DecodingCancelled):
                        await task  # hold the lock until the thread is really done
                    raise
                finally:
                    self.stats.beams_running -= 1
        except asyncio.CancelledError:
            self.stats.requests_cancelled += 1
            raise
        except Exception:
            self.stats.requests_failed += 1
            raise
        finally:
            if waiting:
                self._beams_waiting -= 1
                self._release(lane)
            self._update_sizes()
        self.stats.requests_finished += 1
        self.stats.tokens_total += len(result.token_ids) + (result.finish_reason == "stop")
        self._metric("request_latency", time.perf_counter() - started)
        return result

    async def _select(self, text: str, options: DecodingOptions,
                      lane: str | None = None) -> GenerationResult:
        """A reply chosen among candidates (module docstring); cancelling the caller
        cancels its proposals' rows. A lane has at most its queue cap of these under way
        (retrieval and scoring have queues of their own, which this bounds)."""
        sources, started = self.sources, time.perf_counter()
        hybrid = sources.mode(options) == "hybrid"
        lane = self._waiting.name(lane)
        if self._selecting[lane] >= self.lanes[lane].queue:
            self.stats.overloaded_total += 1
            raise Overloaded(f"too many replies being chosen ({self.lanes[lane].queue} "
                             f"in lane {lane!r})")
        self._selecting[lane] += 1
        try:
            src, retrieved, generated = await self._candidates(text, options, lane, hybrid)
            candidates = usable([*retrieved, *generated_candidates(self.model, generated)],
                                text)
            scores = await self._scoring.score([(src, c.token_ids) for c in candidates])
        finally:
            self._selecting[lane] -= 1
        result = sources.choose(self.model, text, candidates, scores, generated, options)
        self._metric("selection_latency", time.perf_counter() - started)
        return result

    async def _candidates(self, text: str, options: DecodingOptions, lane: str,
                          hybrid: bool) -> tuple[list[int], list, list[GenerationResult]]:
        """The message's source ids, its retrieved candidates and the model's proposals,
        made side by side from the message tokenized once (in a worker thread unless it is
        short: a few tens of microseconds, less than the thread's hand-off). A failure is
        the request's own error, not the group of them the task group gathers."""
        if len(text) <= INLINE_TOKENIZE_CHARS:
            whole = source_ids(self.model, text, max_source_length=sys.maxsize)  # not cut
        else:
            whole = await asyncio.to_thread(source_ids, self.model, text, sys.maxsize)
        src = whole[-self.max_source_length:]
        try:
            async with asyncio.TaskGroup() as group:
                found = group.create_task(asyncio.to_thread(  # BM25 and the rules
                    self.sources.retrieved, self.model, text, options, ids=whole)
                ) if hybrid else None
                proposals = [group.create_task(self._generate_plain(text, o, lane, src))
                             for o in self.sources.proposals(options)]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        retrieved = found.result() if found is not None else []
        return src, retrieved, [p.result() for p in proposals]

    # -- the scheduler's steps, delivered on the event loop ----------------------------------
    def _deliver_step(self, step: StepTokens) -> None:
        """One step's tokens to their consumers (one callback per step)."""
        self.stats.steps_total += 1
        self.stats.tokens_total += len(step.rows)
        eos, now = self.model.eos_id, step.at
        for request, token, finished, log_prob in zip(
                step.rows, step.tokens, step.finished, step.log_probs, strict=True):
            if request.cancelled or request.closed:
                continue
            if token != eos:
                if request.last_token_at is None:
                    self._metric("time_to_first_token", now - request.submitted)
                else:
                    self._metric("inter_token_latency", now - request.last_token_at)
                request.last_token_at = now
                if request.streaming:
                    self._send_piece(request, token, log_prob)
            if finished:
                self.stats.requests_finished += 1
                self._metric("request_latency", now - request.submitted)
                request.closed = True
                request.events.put_nowait(("done", request.decoder.result(self.model)))

    def _send_piece(self, request: _Request, token: int, log_prob: TokenLogProb | None
                    ) -> None:
        piece = self.model.tokenizer.id_to_piece(token)
        delta = text_delta(request.last_piece, piece)
        request.last_piece = piece
        request.events.put_nowait(("piece", Piece(delta, token, log_prob)))

    def _fail_step(self, rows: list[_Request], error: Exception) -> None:
        for request in rows:
            if not request.closed:
                request.closed = True
                request.events.put_nowait(("error", error))
        self.stats.requests_failed += len(rows)

    def _update_sizes(self, active: int | None = None) -> None:
        """The gauges (any thread): ``active`` rows now in the batch (None: as is)."""
        with self._lock:
            self.stats.queue_size = len(self._waiting) + self._beams_waiting
            if active is not None:
                self.stats.active = active

    def _metric(self, name: str, seconds: float) -> None:
        if self.on_metric is not None:
            try:
                self.on_metric(name, seconds)
            except Exception:  # a broken metrics hook must not break decoding
                pass


class _Relay:
    """A request's events handed on as they are put (``Engine.relay``)."""

    __slots__ = ("sink",)

    def __init__(self, sink: Callable[[str, object], None]):
        self.sink = sink

    def put_nowait(self, event: tuple[str, object]) -> None:
        self.sink(*event)


def _preparers(lanes: dict[str, Lane]) -> dict[str, ThreadPoolExecutor]:
    """One worker thread a lane for making its requests' tokens and rules."""
    return {name: ThreadPoolExecutor(1, thread_name_prefix=f"xiaox-prepare-{name}")
            for name in lanes}


def decoding_options(options: DecodingOptions | None, kwargs: dict) -> DecodingOptions:
    """``options``, or the ``DecodingOptions`` of keyword arguments (not both)."""
    if options is not None and kwargs:
        raise ValueError("pass either options= or keyword options, not both")
    return options if options is not None else DecodingOptions.from_kwargs(**kwargs)
