"""The engine's own process: an ``Engine`` served over a pipe to ``RemoteEngine``.

The decoder's Python (token rules, sampling, the batch's bookkeeping), the encoder and
the hybrid mode's retrieval and scoring then hold this process's GIL, not the web
server's: the two share the machine's cores instead of one interpreter.

What goes over the pipe (a socket pair; each message a 4-byte length and a pickle, read
and written by asyncio streams, so neither side ever blocks on the other):

- in, the ``EngineConfig``, then lists of commands (those of one event-loop pass):
  ``("stream" | "generate", id, text, options, lane)``, ``("forward", id, text,
  replies)``, ``("cancel", id)``, ``("stop",)``;
- out, a list of events per event-loop pass (one write per decoder step for all its
  rows): ``("piece", id, Piece)``, ``("done", id, result)``, ``("error", id,
  exception)``, ``("metric", name, seconds)``, ``("stats", EngineStats)``,
  ``("ready", has an index, has a scorer)``, ``("failed", message)``, ``("stalled",
  seconds)`` (its decoder steps made no progress for ``stall_seconds`` while there were
  rows to step: its step thread hangs, and the parent replaces the process).

The process ignores SIGINT and SIGTERM (a terminal's Ctrl-C or a service manager reaches
the whole process group): it stops when its parent says ``stop`` or goes away (the pipe
ends), so a draining server keeps its engine to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pickle
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any

from serve.runtime.engine import Engine, EngineStats
from serve.runtime.lanes import Lane

STATS_SECONDS = 0.1  # the engine's counters reach the parent at least this often
ALIVE_SECONDS = 1.0  # something reaches the parent at least this often: it is not hung


@dataclass(frozen=True)
class EngineConfig:
    """What the engine process is built from (``Engine``'s own arguments)."""

    model_dir: str
    threads: int = 1
    max_batch_size: int = 32
    max_queue: int = 256
    lanes: dict[str, Lane] | None = None
    stall_seconds: float = 10.0  # steps stalled this long are reported (``"stalled"``)


_LENGTH = struct.Struct(">I")


def send_message(writer: asyncio.StreamWriter, message: Any) -> None:
    """Queue one message (the stream writes it without blocking)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(data)) + data)


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message (IncompleteReadError once the other side is gone)."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


def main(fd: int) -> None:
    """The process's entry point: ``python -m serve.runtime.engine_process FD``, FD its
    end of the socket pair, whose first message is the ``EngineConfig``."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import uvloop

        uvloop.run(_serve(fd))
    except ImportError:
        asyncio.run(_serve(fd))


async def _serve(fd: int) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    config: EngineConfig = await read_message(reader)
    outbox = _Outbox(writer, asyncio.get_running_loop(), config.stall_seconds)
    try:
        engine = await _started_engine(config, outbox)
    except Exception as e:  # the parent reports it; nothing was started
        send_message(writer, [("failed", f"{type(e).__name__}: {e}")])
        await writer.drain()
        return
    sources = engine.sources  # what the parent needs to tell which replies are chosen
    outbox.put(("ready", sources.index is not None, sources.scorer is not None))
    host = _Host(engine, outbox)
    outbox.engine = engine
    stats = asyncio.get_running_loop().create_task(outbox.report_stats())
    try:
        await host.serve(reader)
    finally:
        stats.cancel()
        await host.close()
        outbox.put(("stats", dataclasses.replace(engine.stats)))  # the last, changed or not
        outbox.flush()
        with contextlib.suppress(ConnectionError):  # the parent may be gone already
            await writer.drain()


async def _started_engine(config: EngineConfig, outbox: _Outbox) -> Engine:
    from serve.runtime.model import OnnxSeq2Seq
    from serve.runtime.replies import ReplySources

    model = await asyncio.to_thread(OnnxSeq2Seq.load, config.model_dir,
                                    intra_op_num_threads=config.threads)
    sources = await asyncio.to_thread(ReplySources.load, model,
                                      intra_op_num_threads=config.threads)
    engine = Engine(model, max_batch_size=config.max_batch_size,
                    max_queue=config.max_queue, on_metric=outbox.metric,
                    sources=sources, lanes=config.lanes)
    await engine.start()
    return engine


class _Outbox:
    """Events for the parent, sent together once per event-loop pass."""

    def __init__(self, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop,
                 stall_seconds: float):
        self.writer, self.loop = writer, loop
        self.stall_seconds = stall_seconds
        self._events: list[tuple] = []
        self._loop_thread = threading.get_ident()
        self.engine: Engine | None = None  # its counters go with the events once set
        self._stats_sent: EngineStats | None = None
        self._sent_at = loop.time()

    def put(self, event: tuple) -> None:
        if not self._events:
            self.loop.call_soon(self.flush)
        self._events.append(event)

    def metric(self, name: str, seconds: float) -> None:
        """``Engine(on_metric=...)``: on the event loop (a token's latencies, as each step
        is delivered) or in the engine's threads (a wake-up of the loop only then)."""
        if threading.get_ident() == self._loop_thread:
            self.put(("metric", name, seconds))
        else:
            self.loop.call_soon_threadsafe(self.put, ("metric", name, seconds))

    async def report_stats(self) -> None:
        """The engine's counters every ``STATS_SECONDS`` when nothing else is sent (they
        change with no event too: a request queued, one being prepared)."""
        while True:
            await asyncio.sleep(STATS_SECONDS)
            self._add_stats()
            stalled = self.engine.stalled_seconds() if self.engine is not None else 0.0
            if stalled >= self.stall_seconds:  # (the parent replaces this process)
                self._events.append(("stalled", stalled))
            if not self._events and self.loop.time() - self._sent_at >= ALIVE_SECONDS:
                self._events.append(("alive",))
            self.flush()

    def _add_stats(self) -> None:
        """The engine's counters, if they changed since they were last sent."""
        if self.engine is not None:
            stats = dataclasses.replace(self.engine.stats)
            if stats != self._stats_sent:
                self._events.append(("stats", stats))
                self._stats_sent = stats

    def flush(self) -> None:
        """What this pass put, with the counters as they are after it (the parent's
        metrics then trail the engine by a pass, not by ``STATS_SECONDS``)."""
        if self._events:
            self._add_stats()
        events, self._events = self._events, []
        if events and not self.writer.is_closing():
            send_message(self.writer, events)
            self._sent_at = self.loop.time()


class _Host:
    """Runs the parent's commands against the engine, one task per request."""

    def __init__(self, engine: Engine, outbox: _Outbox):
        self.engine, self.outbox = engine, outbox
        self.tasks: dict[int, asyncio.Task] = {}  # a chosen or beam reply, generate, forward
        self.relays: dict[int, Any] = {}  # a decoded reply's cancel (Engine.relay)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """The parent's commands, until it says stop or goes away."""
        while True:
            try:
                commands = await read_message(reader)
            except (asyncio.IncompleteReadError, OSError):
                return
            for command in commands:
                if command[0] == "stop":
                    return
                self._run(command)

    def _run(self, command: tuple) -> None:
        kind = command[0]
        if kind == "cancel":
            task, cancel = self.tasks.pop(command[1], None), self.relays.pop(command[1], None)
            if task is not None:
                task.cancel()
            if cancel is not None:
                cancel()
        elif kind == "stream" and self._decoded(command[3]):
            self._relay(*command[1:])
        else:
            job = {"stream": self._stream, "generate": self._generate,
                   "forward": self._forward}[kind]
            self.tasks[command[1]] = asyncio.get_running_loop().create_task(
                job(*command[1:]))

    def _decoded(self, options: Any) -> bool:
        """Whether the reply streams token by token (else it is chosen, or a beam's)."""
        try:
            return options.beam_size == 1 and not self.engine.sources.needs_selection(options)
        except ValueError:  # e.g. hybrid without an index: the stream says so
            return False

    def _relay(self, rid: int, text: str, options: Any, lane: str | None) -> None:
        """A decoded reply: the engine's events go straight into the outbox."""
        def sink(kind: str, value: object) -> None:
            if kind != "piece":
                self.relays.pop(rid, None)
                value = _sendable(value) if kind == "error" else value
            self.outbox.put((kind, rid, value))

        try:
            self.relays[rid] = self.engine.relay(text, options, sink, lane=lane)
        except Exception as e:  # refused at once (a full queue, a stopped engine)
            self.outbox.put(("error", rid, _sendable(e)))

    async def _stream(self, rid: int, text: str, options: Any, lane: str | None) -> None:
        stream = self.engine.stream(text, options, lane=lane)
        pieces = stream.pieces()
        try:
            async for piece in pieces:
                self.outbox.put(("piece", rid, piece))
            self.outbox.put(("done", rid, stream.result))
        except Exception as e:
            self.outbox.put(("error", rid, _sendable(e)))
        finally:
            await pieces.aclose()
            self.tasks.pop(rid, None)

    async def _generate(self, rid: int, text: str, options: Any, lane: str | None) -> None:
        await self._answer(rid, self.engine.generate(text, options, lane=lane))

    async def _forward(self, rid: int, text: str, replies: list[list[int]]) -> None:
        await self._answer(rid, self.engine.forward_log_probs(text, replies))

    async def _answer(self, rid: int, work) -> None:
        try:
            self.outbox.put(("done", rid, await work))
        except Exception as e:
            self.outbox.put(("error", rid, _sendable(e)))
        finally:
            self.tasks.pop(rid, None)

    async def close(self) -> None:
        """Stop the engine (its requests end with EngineStopped, sent on)."""
        await self.engine.stop()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=5)


def _sendable(error: Exception) -> Exception:
    """``error`` if it pickles, else a RuntimeError that says what it was."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
