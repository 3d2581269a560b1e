"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._engine_collector = _EngineCollector()
        self.registry.register(self._engine_collector)
        r = self.registry
        self.requests = Counter("xiaox_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.errors = Counter("xiaox_errors", "Refused or failed requests by reason",
                              ["reason"], registry=r)
        self.messages = Counter("xiaox_chat_messages", "Chat messages published",
                                ["role"], registry=r)
        self.active_replies = Gauge("xiaox_active_replies", "Replies being generated",
                                    registry=r)
        self.sse_clients = Gauge("xiaox_sse_clients", "Connected /stream clients", registry=r)
        self.time_to_first_token = Histogram(
            "xiaox_time_to_first_token_seconds", "Request start to first token",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "xiaox_inter_token_latency_seconds", "Time between consecutive tokens",
            buckets=_TOKEN_BUCKETS, registry=r)
        self.end_to_end_latency = Histogram(
            "xiaox_end_to_end_latency_seconds", "Request submitted to reply finished",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.broker_healthy = Gauge("xiaox_broker_healthy", "1 when the event log is reachable",
                                    registry=r)
        self.asyncio_tasks = Gauge("xiaox_asyncio_tasks",
                                   "asyncio tasks alive in this process (a leak shows here)",
                                   registry=r)
        self.asyncio_tasks.set_function(_asyncio_task_count)

    def on_engine_metric(self, name: str, seconds: float) -> None:
        """The engine's ``on_metric`` hook: latencies as they happen."""
        histogram = {"time_to_first_token": self.time_to_first_token,
                     "inter_token_latency": self.inter_token_latency,
                     "request_latency": self.end_to_end_latency}.get(name)
        if histogram is not None:
            histogram.observe(seconds)

    def watch_engine(self, engine: Any) -> None:
        """Export ``engine.stats`` (queue, batch, counters), read at every scrape."""
        self._engine_collector.engine = engine

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _asyncio_task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the event loop
        return 0


class _EngineCollector:
    """Reads the engine's live counters when Prometheus scrapes, instead of copying them."""

    def __init__(self) -> None:
        self.engine: Any = None

    def collect(self):
        stats = getattr(self.engine, "stats", None)
        if stats is None:
            return
        for name, doc, attr in (
            ("xiaox_engine_queue_size", "Requests waiting to join the batch", "queue_size"),
            ("xiaox_engine_batch_size", "Rows in the current decoder batch", "active"),
        ):
            yield GaugeMetricFamily(name, doc, value=getattr(stats, attr, 0))
        for name, doc, attr in (
            ("xiaox_engine_requests", "Requests submitted to the engine", "requests_total"),
            ("xiaox_engine_overloaded", "Requests refused with a full queue", "overloaded_total"),
            ("xiaox_generated_tokens", "Tokens generated (</s> included)", "tokens_total"),
            ("xiaox_engine_steps", "Batched decoder steps", "steps_total"),
            ("xiaox_engine_cancelled", "Requests cancelled (client gone)", "requests_cancelled"),
        ):
            yield CounterMetricFamily(name, doc, value=getattr(stats, attr, 0))


class RequestMetricsMiddleware:
    """Counts requests by route template (not raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else (
            "/static" if path.startswith("/static/") else "other")
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if status == 500:
                self.metrics.requests.labels(scope["method"], route, "500").inc()
                self.metrics.errors.labels("internal").inc()
            raise
