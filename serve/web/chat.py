"""``Chat``: everything the routes share (settings, engine, broker, metrics, reply tasks).

``start`` loads the model folder and its reply sources, builds the engine and the broker;
``stop`` drains: replies in flight may finish (up to ``drain_seconds``) before the engine
and the broker stop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import anyio
from starlette.requests import Request

from serve.web import reply
from serve.web.broker import Broker, InProcessBroker, RedisBroker
from serve.web.lanes import engine_lanes
from serve.web.leases import LocalLeases, RedisLeases
from serve.web.metrics import Metrics, multiprocess_dir
from serve.web.presence import StreamGate
from serve.web.security.rate_limit import SharedRateLimiter
from serve.web.settings import Settings

log = logging.getLogger("xiaox.app")


def _import(target: str):
    """``module:name`` -> that object (an engine other than ours, for benchmarks)."""
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class Chat:
    """Everything the routes share: settings, engine, broker, metrics, reply tasks."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.engine: Any = None
        self.model_name = "xiaox"
        self.model_error: str | None = "the model is loading"
        self.broker: Broker | None = None
        # Both must allow a message: the session's budget and its address's.
        self.send_limiters = tuple(
            SharedRateLimiter(name, rate, settings.rate_limit_window, lambda: self.broker)
            for name, rate in (("send:session", settings.rate_limit_messages),
                               ("send:ip", settings.rate_limit_ip_messages)))
        self.gate: StreamGate | None = None
        self.replies: set[asyncio.Task] = set()
        self.closing = False
        self.sse_shutdown: anyio.Event | None = None  # set by sse-starlette on shutdown
        self._watcher: asyncio.Task | None = None
        self._metrics_sync: asyncio.Task | None = None

    @property
    def reply_options(self) -> dict[str, Any]:
        """The room's decoding: the model folder's own default generation settings (its
        manifest's ``generation``; the hybrid mode where it has a reply index), else
        nucleus sampling as CDial-GPT (p 0.9, T 0.7)."""
        generation = self.engine.model.manifest.generation if self.engine else {}
        defaults = generation or {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2,
                                  "sampling_topk": 0, "sampling_topp": 0.9,
                                  "sampling_temperature": 0.7}
        return {**defaults, "max_length": self.settings.reply_max_tokens}

    async def _engine_here(self) -> Any:
        """The engine in this process (``XIAOX_ENGINE``'s, if set)."""
        from serve.runtime.engine import Engine
        from serve.runtime.model import OnnxSeq2Seq
        from serve.runtime.replies import ReplySources

        s = self.settings
        # Loading reads and hashes the model files: keep the event loop free meanwhile.
        model = await asyncio.to_thread(OnnxSeq2Seq.load, s.model_path,
                                        intra_op_num_threads=s.threads)
        sources = await asyncio.to_thread(ReplySources.load, model,
                                          intra_op_num_threads=s.threads)
        engine_class = _import(s.engine) if s.engine else Engine
        return engine_class(model, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                            on_metric=self.metrics.on_engine_metric, sources=sources,
                            **({} if s.engine else {"lanes": engine_lanes(s)}))

    async def start(self) -> None:
        s = self.settings
        if s.engine_process and not s.engine:
            from serve.runtime.remote_engine import RemoteEngine

            self.engine = await asyncio.to_thread(
                RemoteEngine, s.model_path, threads=s.threads,
                max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                on_metric=self.metrics.on_engine_metric, lanes=engine_lanes(s))
        else:
            self.engine = await self._engine_here()
        self.model_name = self.engine.model.manifest.name or "xiaox"
        await self.engine.start()
        self.metrics.watch_engine(self.engine)
        self.model_error = None
        if s.redis_url:
            self.broker = RedisBroker(s.redis_url, log_max_events=s.log_max_events,
                                      history_max_messages=s.history_max_messages,
                                      wait_replicas=s.redis_wait_replicas,
                                      wait_ms=s.redis_wait_ms)
        else:
            self.broker = InProcessBroker(log_max_events=s.log_max_events,
                                          history_max_messages=s.history_max_messages,
                                          max_rooms=s.max_rooms)
        self.broker.room_idle_seconds = s.room_idle_seconds
        await self.broker.start()
        self.gate = self.make_gate(self.broker)
        self.gate.start()
        self.sse_shutdown = anyio.Event()
        self._watcher = asyncio.create_task(self._end_streams_on_shutdown())
        if multiprocess_dir() is not None:  # the other workers' scrapes read our copy
            self._metrics_sync = asyncio.create_task(
                self.metrics.sync_forever(lambda: self.broker), name="xiaox-metrics-sync")

    async def _end_streams_on_shutdown(self) -> None:
        # sse-starlette sets the event when uvicorn begins to shut down; ending the
        # subscriptions lets every stream finish cleanly (and say "leave") instead of
        # being cancelled mid-response.
        assert self.sse_shutdown is not None
        await self.sse_shutdown.wait()
        self.closing = True
        if self.broker is not None:
            self.broker.end_listeners()

    async def stop(self) -> None:
        """Drain: let replies in flight finish (up to drain_seconds), then stop everything."""
        self.closing = True
        pending = {t for t in self.replies if not t.done()}
        if pending:
            log.info("waiting for %d replies in flight", len(pending))
            _, still = await asyncio.wait(pending, timeout=self.settings.drain_seconds)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=2)
        for task in (self._watcher, self._metrics_sync):
            if task is not None:
                task.cancel()
        if self.gate is not None:
            await self.gate.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.broker is not None:
            await self.broker.close()
        self.metrics.close()

    def make_gate(self, broker: Broker) -> StreamGate:
        """The stream caps and presence, counted in Redis when the broker is Redis's."""
        s = self.settings
        leases = RedisLeases(broker) if isinstance(broker, RedisBroker) else LocalLeases()

        async def announce(room: str, kind: str, data: dict) -> None:
            await reply.try_publish(broker, room, kind, data)

        return StreamGate(leases, announce, per_session=s.max_streams_per_session,
                          per_ip=s.max_streams_per_ip, grace=s.presence_grace_seconds)

    async def allow_send(self, sid: str, ip: str) -> tuple[bool, float]:
        """The rate limits of the session and of the client's address (both must allow):
        shared through Redis when there is one. (allowed, seconds to wait)."""
        for limiter, key in zip(self.send_limiters, (sid, ip), strict=True):
            allowed, wait = await limiter.allow(key)
            if not allowed:
                return False, wait
        return True, 0.0

    def problems(self) -> list[str]:
        problems = []
        if self.closing:
            problems.append("shutting down")
        if self.model_error:
            problems.append(f"model: {self.model_error}")
        elif self.engine is None or not self.engine.running:
            problems.append("model: the engine is not running")
        if self.broker is None:
            problems.append("broker: not started")
        elif not self.broker.healthy:
            problems.append(self.broker.problem or "broker: unhealthy")
        return problems

    def start_reply(self, room: str, text: str, reply_to: str,
                    reply_id: str | None = None) -> str:
        """小X's reply to ``text`` as a task of its own (see ``serve.web.reply``): its id."""
        assert self.broker is not None
        reply_id = reply_id or secrets.token_hex(8)
        coro = reply.reply(self.broker, self.engine, self.metrics, room, text,
                           reply_id=reply_id, reply_to=reply_to, options=self.reply_options)
        task = asyncio.create_task(coro, name=f"xiaox-reply-{reply_id}")
        self.replies.add(task)
        task.add_done_callback(self.replies.discard)
        return reply_id


def chat_of(request: Request) -> Chat:
    return request.app.state.chat
