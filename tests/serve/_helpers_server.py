"""Helpers for the server tests: the model, ``python -m serve`` processes, SSE clients.

"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background reader task and wait until it has really ended."""
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


class ServerDied(RuntimeError):
    """The server process exited before it was healthy."""


class ServerProcess:
    """``python -m serve`` on a free port, in its own process, stopped with SIGTERM."""

    def __init__(self, model_dir: Path, workdir: Path, *, redis_url: str | None = None,
                 env: dict[str, str] | None = None, port: int | None = None):
        self.model_dir = model_dir
        self.workdir = workdir
        self.redis_url = redis_url
        self.port = port or free_port()
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> ServerProcess:
        command = [sys.executable, "-m", "serve", "--model", str(self.model_dir),
                   "--port", str(self.port)]
        if self.redis_url:
            command += ["--redis-url", self.redis_url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOX_")}
        env.update({"XIAOX_SECRET_KEY_FILE": str(self.workdir / "secret_key"),
                    "XIAOX_LOG_LEVEL": "warning", "XIAOX_DRAIN_SECONDS": "5",
                    "XIAOX_THREADS": "1",  # several servers share two cores
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerDied(f"the server exited early ({code}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server is not healthy after {timeout}s:\n{self.log_tail()}")

    def start(self) -> ServerProcess:
        start_servers(self)
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_servers(*servers: ServerProcess) -> None:
    """Launch several at once (model loading overlaps), then wait for all.

    A server that dies while starting is relaunched once on a new port: on a shared
    machine a free port can be taken between ``free_port()`` and uvicorn's bind.
    """
    ports = set()
    for server in servers:
        while server.port in ports:
            server.port = free_port()
        ports.add(server.port)
        server.launch()
    for server in servers:
        try:
            server.wait_healthy()
        except ServerDied as first:
            server.port = free_port()
            server.log_path = server.workdir / f"server-{server.port}.log"
            try:
                server.launch().wait_healthy()
            except ServerDied as second:
                raise second from first


# --- a strict SSE parser --------------------------------------------------------------

class StrictSSEParser:
    """The SSE wire format and nothing else: ``field: value`` lines, blank-line dispatch.

    ``fields`` are the field names allowed; comments (``:`` lines, sse-starlette's pings)
    only when ``comments``. Anything else raises AssertionError.
    """

    def __init__(self, fields: tuple[str, ...] = ("id", "event", "data", "retry"),
                 comments: bool = True):
        self.fields, self.comments = fields, comments
        self.pending: dict[str, str] = {}
        self.data: list[str] = []
        self.comment_count = 0

    def feed(self, line: str) -> dict[str, str] | None:
        if line == "":
            if not self.data and not self.pending:
                return None
            event = {**self.pending, "data": "\n".join(self.data)}
            self.pending, self.data = {}, []
            return event
        if line.startswith(":"):
            assert self.comments, f"comment line where none is allowed: {line!r}"
            self.comment_count += 1
            return None
        name, colon, value = line.partition(":")
        assert colon, f"not an SSE field line: {line!r}"
        assert name in self.fields, f"unexpected SSE field {name!r} in {line!r}"
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self.data.append(value)
        else:
            assert name not in self.pending, f"field {name!r} twice in one event"
            self.pending[name] = value
        return None


def sse_lines(buffer: str) -> tuple[list[str], str]:
    """Complete SSE lines of ``buffer`` (ended by CRLF, LF or CR, nothing else) and the rest.

    Unlike ``str.splitlines`` (and httpx's ``aiter_lines``), U+2028, U+0085 or form
    feeds inside a data line are data, as the SSE specification says.
    """
    lines: list[str] = []
    start = 0
    i = 0
    n = len(buffer)
    while i < n:
        ch = buffer[i]
        if ch == "\n":
            lines.append(buffer[start:i])
            start = i = i + 1
        elif ch == "\r":
            if i + 1 == n:
                break  # a CR at the end may be the first half of a CRLF
            lines.append(buffer[start:i])
            i += 2 if buffer[i + 1] == "\n" else 1
            start = i
        else:
            i += 1
    return lines, buffer[start:]


def split_lines(raw: str) -> list[str]:
    """A whole stream's SSE lines (CRLF, LF or CR), the unterminated rest last."""
    lines, rest = sse_lines(raw)
    return [*lines, rest]


class ChatStream:
    """``GET /stream`` read in a background task; parsed events collected in order."""

    def __init__(self, client: httpx.AsyncClient, room: str = "lobby",
                 last_event_id: str | None = None, via_header: bool = True):
        self.client, self.room = client, room
        self.headers = {"Accept": "text/event-stream"}
        self.params = {"room": room}
        if last_event_id is not None:
            if via_header:
                self.headers["Last-Event-ID"] = last_event_id
            else:
                self.params["last_event_id"] = last_event_id
        self.events: list[dict] = []  # {"id", "event", "data": parsed JSON}
        self.status: int | None = None
        self.response_headers: httpx.Headers | None = None
        self.parser = StrictSSEParser()
        self._changed = asyncio.Event()
        self._opened = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.error: BaseException | None = None

    async def __aenter__(self) -> ChatStream:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._opened.wait(), 20)
        if self.error:
            raise self.error
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        try:
            async with self.client.stream("GET", "/stream", params=self.params,
                                          headers=self.headers,
                                          timeout=httpx.Timeout(10, read=None)) as response:
                self.status = response.status_code
                self.response_headers = response.headers
                self._opened.set()
                if response.status_code != 200:
                    await response.aread()
                    return
                pending = ""
                async for chunk in response.aiter_text():
                    lines, pending = sse_lines(pending + chunk)
                    for line in lines:
                        event = self.parser.feed(line)
                        if event is not None:
                            event["data"] = json.loads(event["data"])
                            self.events.append(event)
                            self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced by wait_for
            self.error = e
            self._opened.set()
            self._changed.set()

    async def wait_for(self, predicate: Callable[[list[dict]], bool],
                       timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not predicate(self.events):
            if self.error:
                raise self.error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"events so far: {self.events}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        return self.events

    def of_type(self, *types: str) -> list[dict]:
        return [e for e in self.events if e["event"] in types]


def bot_reply_to(message_id: str) -> Callable[[list[dict]], bool]:
    """Predicate: the final bot message answering ``message_id`` has arrived."""
    return lambda events: any(e["event"] == "message" and e["data"].get("reply_to") == message_id
                              for e in events)


async def login(client: httpx.AsyncClient, name: str) -> None:
    response = await client.post("/login", json={"username": name})
    assert response.status_code == 200, response.text


async def send(client: httpx.AsyncClient, text: str, room: str = "lobby") -> dict:
    response = await client.post("/send", params={"room": room}, json={"message": text})
    assert response.status_code == 202, response.text
    return response.json()


def id_key(event_id: str) -> tuple[int, int]:
    """Event ids compare as (milliseconds, sequence), not as strings."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def metric_value(text: str, name: str) -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
