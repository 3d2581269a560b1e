"""Prometheus metrics of one app (its own registry, so several apps can live in one process).

With ``--workers N`` each worker is a process of its own: ``python -m serve`` then sets
``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before the workers start, every value is
kept in a file there, and ``/metrics`` (whichever worker answers it) adds up the files of
all workers with ``MultiProcessCollector``. Gauges say how: ``livesum`` (the sum over the
live workers) or ``livemin`` (the broker is healthy only if it is for every worker).

The engine's own counters (``engine.stats``) are copied into ordinary metrics: at every
scrape by the worker that answers it, and every second by every worker when there are
several (``sync``).

Requests (a chat reply or an API completion, one each) follow vLLM's metrics:
``request`` returns a ``RequestRecord`` that counts the prompt's tokens, then the reply's
tokens and finish reason when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SYNC_SECONDS = 1.0  # how often each of several workers copies its engine's counters
FINISH_REASONS = ("stop", "length", "cancelled", "error")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

# engine.stats attribute -> (metric, help): copied by ``sync``
_ENGINE_GAUGES = {
    "queue_size": ("xiaox_engine_queue_size", "Requests waiting to join the batch"),
    "active": ("xiaox_engine_batch_size", "Rows in the current decoder batch"),
}
_ENGINE_COUNTERS = {
    "requests_total": ("xiaox_engine_requests", "Requests submitted to the engine"),
    "overloaded_total": ("xiaox_engine_overloaded", "Requests refused with a full queue"),
    "tokens_total": ("xiaox_generated_tokens", "Tokens generated (</s> included)"),
    "steps_total": ("xiaox_engine_steps", "Batched decoder steps"),
    "requests_cancelled": ("xiaox_engine_cancelled", "Requests cancelled (client gone)"),
    "restarts_total": ("xiaox_engine_restarts",
                       "Engine processes started again after one died"),
}


def multiprocess_dir() -> str | None:
    """The directory of several workers' metrics, or None (one process)."""
    return os.environ.get(MULTIPROC_ENV) or None


def _gauge(name: str, doc: str, registry: CollectorRegistry, mode: str = "livesum") -> Gauge:
    return Gauge(name, doc, registry=registry, multiprocess_mode=mode)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("xiaox_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.errors = Counter("xiaox_errors", "Refused or failed requests by reason",
                              ["reason"], registry=r)
        self.messages = Counter("xiaox_chat_messages", "Chat messages published",
                                ["role"], registry=r)
        self.active_replies = _gauge("xiaox_active_replies", "Replies being generated", r)
        self.sse_clients = _gauge("xiaox_sse_clients", "Connected /stream clients", r)
        self.time_to_first_token = Histogram(
            "xiaox_time_to_first_token_seconds", "Request start to first token",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "xiaox_inter_token_latency_seconds", "Time between consecutive tokens",
            buckets=_TOKEN_BUCKETS, registry=r)
        self.end_to_end_latency = Histogram(
            "xiaox_end_to_end_latency_seconds", "Request submitted to reply finished",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.broker_healthy = _gauge("xiaox_broker_healthy",
                                     "1 when the event log is reachable", r, mode="livemin")
        self.asyncio_tasks = _gauge(
            "xiaox_asyncio_tasks", "asyncio tasks alive in this process (a leak shows here)", r)
        self._define_request_metrics(r)
        self._engine = _EngineMirror(r)
        # on_engine_metric runs for every token: the names' histograms looked up, not built
        self._latencies = {"time_to_first_token": self.time_to_first_token,
                           "inter_token_latency": self.inter_token_latency,
                           "request_latency": self.end_to_end_latency}

    def _define_request_metrics(self, r: CollectorRegistry) -> None:
        """vLLM's request metrics, under xiaox_ names (the README maps them)."""
        self.prompt_tokens = Counter("xiaox_prompt_tokens", "Prompt tokens of the requests",
                                     registry=r)
        self.generation_tokens = Counter(
            "xiaox_generation_tokens", "Tokens of the finished replies (usage.completion_tokens)",
            registry=r)
        self.request_success = Counter(
            "xiaox_request_success", "Requests ended, by finish reason",
            ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:  # every series exists from the start
            self.request_success.labels(reason)
        self.request_queue_time = Histogram(
            "xiaox_request_queue_time_seconds",
            "Submission to the end of a row's first decoder step", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.requests_running = _gauge(
            "xiaox_num_requests_running", "Rows in the decoder batch, and beam searches running",
            r)
        self.requests_waiting = _gauge(
            "xiaox_num_requests_waiting", "Rows and beam searches waiting for the decoder", r)

    def request(self, prompt_tokens: int) -> RequestRecord:
        """A request handed to the engine (its prompt tokens counted now)."""
        return RequestRecord(self, prompt_tokens)

    def on_engine_metric(self, name: str, seconds: float) -> None:
        """The engine's ``on_metric`` hook: latencies as they happen."""
        histogram = self._latencies.get(name)
        if histogram is not None:
            histogram.observe(seconds)
        if name == "time_to_first_token":  # a row's first step has run: it left the queue
            self.request_queue_time.observe(seconds)

    def watch_engine(self, engine: Any) -> None:
        """Export ``engine.stats`` (queue, batch, counters), copied at every ``sync``."""
        self._engine.engine = engine

    def sync(self, broker: Any = None) -> None:
        """Copy what is read rather than counted: the engine's stats, the broker's health,
        the number of asyncio tasks (in the event loop)."""
        stats = self._engine.sync()
        if stats is not None:
            self.requests_running.set(getattr(stats, "active", 0)
                                      + getattr(stats, "beams_running", 0))
            self.requests_waiting.set(getattr(stats, "queue_size", 0))
        if broker is not None:
            self.broker_healthy.set(1 if broker.healthy else 0)
        self.asyncio_tasks.set(_asyncio_task_count())

    async def sync_forever(self, broker_of) -> None:
        """Several workers: keep this worker's copied values fresh for the others' scrapes."""
        while True:
            self.sync(broker_of())
            await asyncio.sleep(SYNC_SECONDS)

    def render(self) -> tuple[bytes, str]:
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client.multiprocess import MultiProcessCollector

        _forget_dead_processes(path)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """This worker is stopping: its live gauges no longer count."""
        path = multiprocess_dir()
        if path is not None:
            from prometheus_client.multiprocess import mark_process_dead

            with contextlib.suppress(OSError):
                mark_process_dead(os.getpid(), path)


class RequestRecord:
    """One request to the engine: its prompt tokens now, its end once (``finish``)."""

    def __init__(self, metrics: Metrics, prompt_tokens: int):
        self._metrics = metrics
        self.done = False
        metrics.prompt_tokens.inc(max(0, prompt_tokens))

    def finish(self, reason: str, generation_tokens: int = 0) -> None:
        if self.done:
            return
        self.done = True
        self._metrics.request_success.labels(reason if reason in FINISH_REASONS
                                              else "error").inc()
        if generation_tokens > 0:
            self._metrics.generation_tokens.inc(generation_tokens)

    def finish_with(self, result: Any) -> None:
        """A reply the engine finished (a ``GenerationResult``, or None for an empty one)."""
        if result is None:
            self.finish("stop")
            return
        self.finish("length" if result.finish_reason == "length" else "stop",
                    len(result.token_ids))

    @contextlib.contextmanager
    def guard(self) -> Iterator[RequestRecord]:
        """A block that may end the request early: cancelled (the client or the server
        went away) or error (the engine refused or failed it)."""
        try:
            yield self
        except (asyncio.CancelledError, GeneratorExit):
            self.finish("cancelled")
            raise
        except BaseException:
            self.finish("error")
            raise


class _EngineMirror:
    """``engine.stats`` copied into metrics: counters by their increase, gauges as set."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.engine: Any = None
        self._gauges = {attr: _gauge(name, doc, registry)
                        for attr, (name, doc) in _ENGINE_GAUGES.items()}
        self._counters = {attr: Counter(name, doc, registry=registry)
                          for attr, (name, doc) in _ENGINE_COUNTERS.items()}
        self._seen = dict.fromkeys(_ENGINE_COUNTERS, 0)

    def sync(self) -> Any:
        stats = getattr(self.engine, "stats", None)
        if stats is None:
            return None
        for attr, gauge in self._gauges.items():
            gauge.set(getattr(stats, attr, 0))
        for attr, counter in self._counters.items():
            value = getattr(stats, attr, 0)
            if value > self._seen[attr]:
                counter.inc(value - self._seen[attr])
                self._seen[attr] = value
        return stats


def _asyncio_task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # outside the event loop
        return 0


_LIVE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _forget_dead_processes(path: str) -> None:
    """A worker that died without stopping (killed, crashed) leaves its live gauges'
    files behind: they must not count any more."""
    from prometheus_client.multiprocess import mark_process_dead

    pids = {int(m.group(1)) for f in glob.glob(os.path.join(path, "gauge_live*_*.db"))
            if (m := _LIVE_FILE.fullmatch(os.path.basename(f)))}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                mark_process_dead(pid, path)
        except PermissionError:
            pass  # alive, someone else's


class RequestMetricsMiddleware:
    """Counts requests by route template and method, from known sets only: an unknown
    path is ``other``, an unknown method ``OTHER`` (any token is a valid HTTP method, and
    each new label value would be a new series kept forever)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else (
            "/static" if path.startswith("/static/") else "other")
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.requests.labels(method, route, str(status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if status == 500:
                self.metrics.requests.labels(method, route, "500").inc()
                self.metrics.errors.labels("internal").inc()
            raise
