"""``RemoteEngine``: ``Engine``'s interface, served by an engine in its own process
(``serve.runtime.engine_process``).

The web server's event loop then shares its interpreter's GIL with nothing heavier than
the pipe: under load, one process running both the web layer and the engine keeps about
one core busy (``benchmarks/results/http.md``), however many the machine has.

What stays here: the model folder's manifest and tokenizer (``model``: the routes count
prompt tokens and spell log-probs with them), the rules of which replies are chosen among
candidates (``sources``: ``ReplySources.mode``/``needs_selection``, the index and the
scorer themselves staying in the engine's process), the lanes, the engine's counters as
last reported (``stats``) and its latencies (``on_metric``, as they arrive). Requests,
cancellations and the stop go to the engine's process; pieces, results and errors come
back, each raised here as it was there (``Overloaded``, ``EngineStopped``,
``ValueError``).

If that process dies (killed, out of memory, a crash in a native library), sends nothing
for ``silence_seconds`` (it says it is alive every second: one that does not is hung,
and is killed) or says its decoder steps made no progress for as long while there were
rows to step (its step thread hangs while its event loop runs: it is killed too), every
open request ends with ``EngineStopped``, ``running`` turns false (the health check's
503) and another process is started, after 0.5 s, then twice as long after each one that
fails to load, up to 30 s: the server comes back by itself, and a folder that cannot
load does not make it spin. ``stats`` counts on across the restarts (``restarts_total``:
how many).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.runtime.engine import (
    EngineStats,
    EngineStopped,
    MetricCallback,
    Piece,
    Stream,
    decoding_options,
)
from serve.runtime.engine_process import EngineConfig, read_message, send_message
from serve.runtime.lanes import DEFAULT_LANE, Lane
from serve.runtime.manifest import Manifest, ModelError, load_manifest
from serve.runtime.model import folder_tokenizer
from serve.runtime.options import DecodingOptions
from serve.runtime.replies import ReplySources
from serve.runtime.search import GenerationResult
from serve.runtime.selection import SelectionWeights
from serve.runtime.tokenizer import Tokenizer

START_SECONDS = 120.0  # loading the model folder in the engine's process, at most
STOP_SECONDS = 10.0
RESTART_FIRST_SECONDS = 0.5  # after the engine's process died; doubled after each failure
RESTART_MOST_SECONDS = 30.0
# what a restarted process counts from: the counters, not the gauges of the moment
_COUNTERS = tuple(f.name for f in dataclasses.fields(EngineStats)
                  if f.name not in ("queue_size", "active", "beams_running"))

log = logging.getLogger(__name__)


class _Hung(Exception):
    """The engine's process is hung: silent, or its decoder steps stalled (it is killed
    and replaced)."""


@dataclass
class FolderModel:
    """The part of a model folder the web layer reads: its manifest and tokenizer."""

    manifest: Manifest
    tokenizer: Tokenizer

    @classmethod
    def load(cls, model_dir: str | Path) -> FolderModel:
        """The manifest (its files' hashes are checked by the engine's own load) and
        the tokenizer."""
        manifest = load_manifest(Path(model_dir), verify=False)
        return cls(manifest, folder_tokenizer(Path(model_dir), manifest))


class RemoteStream(Stream):
    """``engine.stream(...)``: ``pieces()`` (or ``async for delta``), then ``result``, as
    ``Stream``'s, the pieces coming from the engine's process. Leaving early cancels the
    request there."""

    async def pieces(self) -> AsyncIterator[Piece]:
        rid, events = self._engine._open("stream", self._text, self._options, self._lane)
        try:
            while True:
                kind, value = await events.get()
                if kind == "piece":
                    yield value
                elif kind == "done":
                    self.result = value
                    return
                else:
                    raise value
        finally:
            self._engine._close(rid, finished=self.result is not None)


class RemoteEngine:
    """``Engine``'s public interface over an engine process (see the module docstring)."""

    def __init__(self, model_dir: str | Path, *, threads: int = 1, max_batch_size: int = 32,
                 max_queue: int = 256, on_metric: MetricCallback | None = None,
                 lanes: dict[str, Lane] | None = None, silence_seconds: float = 10.0):
        self.model = FolderModel.load(model_dir)
        self.silence_seconds = silence_seconds
        self.lanes = lanes or {DEFAULT_LANE: Lane(rows=max_batch_size, queue=max_queue)}
        self.on_metric = on_metric
        self.stats = EngineStats()
        self._counted = EngineStats()  # by the engine's processes that died
        self.sources = ReplySources()  # as the engine's process loaded them, once started
        self._config = EngineConfig(str(model_dir), threads, max_batch_size, max_queue,
                                    self.lanes, stall_seconds=silence_seconds)
        self._ids = itertools.count()
        self._open_requests: dict[int, asyncio.Queue] = {}
        self._outbox: list[tuple] = []
        self._process: Any = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._alive = False
        self._stopping = False
        self._restarting: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._alive  # false once its process ends (the pipe's end says so)

    async def start(self) -> None:
        """Start the engine's process and wait until its model is loaded (ModelError if
        it could not load it)."""
        if self.running:
            return
        self._stopping = False
        await self._launch()

    async def _launch(self) -> None:
        self._process, ours = _spawn()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        send_message(self._writer, self._config)  # the first message: not a list
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._reading = loop.create_task(self._read_events(reader))
        # jieba loads its dictionary on first use: here too, beside the engine's load.
        await asyncio.to_thread(self.model.tokenizer.encode, "你好")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_SECONDS)
        except BaseException:
            await self._end_process()
            raise
        self._alive = True

    async def stop(self) -> None:
        """Stop the engine's process: its open requests end with ``EngineStopped``."""
        self._stopping = True
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        if self._process is None:
            return
        self._flush()
        if self._writer is not None and not self._writer.is_closing():
            send_message(self._writer, [("stop",)])
        await self._wait_process()
        await self._end_process()

    async def _wait_process(self) -> None:
        try:
            await asyncio.to_thread(self._process.wait, STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pass

    async def _end_process(self) -> None:
        if self._process.poll() is None:  # it did not stop when told (it ignores SIGTERM)
            self._process.kill()
            await self._wait_process()
        self._gone("the engine stopped")
        if self._reading is not None:
            self._reading.cancel()
        if self._writer is not None:
            self._writer.close()
        self._process = None

    # -- public API -----------------------------------------------------------------------
    def stream(self, text: str, options: DecodingOptions | None = None, *,
               lane: str | None = None, **kwargs) -> RemoteStream:
        """As ``Engine.stream``: errors are raised when iteration begins."""
        return RemoteStream(self, text, decoding_options(options, kwargs), lane)

    async def generate(self, text: str, options: DecodingOptions | None = None, *,
                       lane: str | None = None, **kwargs) -> GenerationResult:
        """As ``Engine.generate``: cancelling the awaiting task cancels the request."""
        return await self._ask("generate", text, decoding_options(options, kwargs), lane)

    async def forward_log_probs(self, text: str, replies: list[list[int]]
                                ) -> list[list[float]] | None:
        return await self._ask("forward", text, replies)

    # -- the pipe -------------------------------------------------------------------------
    async def _ask(self, *command: Any) -> Any:
        rid, events = self._open(*command)
        done = False
        try:
            kind, value = await events.get()
            done = True
        finally:
            self._close(rid, finished=done)
        if kind == "error":
            raise value
        return value

    def _open(self, kind: str, *args: Any) -> tuple[int, asyncio.Queue]:
        """A request sent to the engine's process: its id and the queue of its events."""
        events: asyncio.Queue = asyncio.Queue()
        rid = next(self._ids)
        if not self.running:
            events.put_nowait(("error", EngineStopped("the engine is not running")))
            return rid, events
        self._open_requests[rid] = events
        self._post((kind, rid, *args))
        return rid, events

    def _post(self, command: tuple) -> None:
        """``command`` for the engine's process, sent with the others of this event-loop
        pass (one write for all of them)."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(command)

    def _flush(self) -> None:
        commands, self._outbox = self._outbox, []
        if commands and self.running and not self._writer.is_closing():
            send_message(self._writer, commands)

    def _close(self, rid: int, *, finished: bool) -> None:
        """The request's events are no longer read: unless it ended, cancel it there."""
        if self._open_requests.pop(rid, None) is not None and not finished and self.running:
            self._post(("cancel", rid))

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        """The engine process's events, until it ends (or is hung: it is killed)."""
        why = "the engine's process ended"
        try:
            while True:
                for event in await self._next_events(reader):
                    self._dispatch(event)
        except _Hung as e:
            why = str(e)
            log.error("%s: killed", why)
            self._process.kill()
        except (asyncio.IncompleteReadError, OSError):
            pass
        was_serving = self._alive
        self._gone(why)
        if was_serving and not self._stopping:
            self._restarting = asyncio.get_running_loop().create_task(self._restart())

    async def _next_events(self, reader: asyncio.StreamReader) -> list:
        if not self._alive:  # loading its model: START_SECONDS bounds that
            return await read_message(reader)
        try:
            return await asyncio.wait_for(read_message(reader), self.silence_seconds)
        except TimeoutError:  # (an OSError: _read_events would take it for the end)
            raise _Hung(f"the engine's process sent nothing for "
                        f"{self.silence_seconds:g} s") from None

    async def _restart(self) -> None:
        """Another engine process for the one that died, retried with a growing wait."""
        process = self._process
        await self._end_process()
        log.error("the engine's process ended (exit code %s): starting another",
                  process.returncode)
        self._counted = self.stats
        wait = RESTART_FIRST_SECONDS
        while True:
            await asyncio.sleep(wait)
            try:
                await self._launch()
            except (ModelError, TimeoutError, OSError) as e:
                wait = min(2 * wait, RESTART_MOST_SECONDS)
                log.error("the engine's process could not start again (%s): retrying in "
                          "%.1f s", e, wait)
                continue
            self._counted = dataclasses.replace(
                self._counted, restarts_total=self._counted.restarts_total + 1)
            self.stats = self._counted
            log.warning("the engine's process is serving again")
            return

    def _dispatch(self, event: tuple) -> None:
        kind = event[0]
        if kind in ("piece", "done", "error"):
            events = self._open_requests.get(event[1])
            if events is not None:  # else cancelled here meanwhile
                events.put_nowait((kind, event[2]))
        elif kind == "metric":
            if self.on_metric is not None:
                self.on_metric(event[1], event[2])
        elif kind == "stats":
            self.stats = _counted_on(event[1], self._counted)
        elif kind == "ready" and self._ready is not None and not self._ready.done():
            self.sources = _sources_shaped(self.model.manifest, *event[1:])
            self._ready.set_result(None)
        elif kind == "failed" and self._ready is not None and not self._ready.done():
            self._ready.set_exception(ModelError(event[1]))
        elif kind == "stalled":
            raise _Hung(f"the engine's decoder steps made no progress for "
                        f"{event[1]:.0f} s")

    def _gone(self, why: str) -> None:
        """Every open request ends with ``EngineStopped``; nothing more is sent."""
        self._alive = False
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ModelError(f"{why} before the model was loaded"))
        requests, self._open_requests = self._open_requests, {}
        for events in requests.values():
            events.put_nowait(("error", EngineStopped(why)))


def _counted_on(stats: EngineStats, before: EngineStats) -> EngineStats:
    """A restarted engine's ``stats`` with its predecessors' counts added."""
    if not before.restarts_total:
        return stats
    return dataclasses.replace(stats, **{name: getattr(stats, name) + getattr(before, name)
                                         for name in _COUNTERS})


class _InEngineProcess:
    """Stands for a part that lives in the engine's process: there, not here."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        raise RuntimeError(f"the {self._name} lives in the engine's process")


def _sources_shaped(manifest: Manifest, has_index: bool, has_scorer: bool) -> ReplySources:
    """``ReplySources`` with the engine's index and scorer standing in: their presence
    decides the reply mode and whether a reply is chosen, here as there."""
    return ReplySources(index=_InEngineProcess("reply index") if has_index else None,
                        scorer=_InEngineProcess("scorer") if has_scorer else None,
                        weights=SelectionWeights.from_dict(manifest.selection))


def _spawn() -> tuple[subprocess.Popen, socket.socket]:
    """``python -m serve.runtime.engine_process FD``, its end of a socket pair on FD (a
    fresh interpreter: no fork of this threaded one, no import of its ``__main__``)."""
    ours, theirs = socket.socketpair()
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-m", "serve.runtime.engine_process", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path})
    theirs.close()
    return process, ours
