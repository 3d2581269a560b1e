"""Helpers for the server tests: ``python -m serve`` processes, their health, SSE clients.

The one launcher of the app in the tests: ``ServerProcess`` (with ``running`` and
``start_servers`` for several at once). Free ports and Redis come from ``tests.conftest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port


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


def wait_healthy(url: str, proc: subprocess.Popen, describe: Callable[[], str],
                 timeout: float = 90.0) -> None:
    """Until ``GET url/healthz`` is 200; ServerDied when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerDied(f"exited early ({proc.returncode}):\n{describe()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} is not healthy after {timeout}s:\n{describe()}")


async def wait_health(server: ServerProcess, status: int, timeout: float = 30) -> dict:
    """Until ``/healthz`` answers ``status`` (an unreachable server counts as none): its body."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = await c.get("/healthz")
                if response.status_code == status:
                    return response.json()
                seen = f"{response.status_code} {response.text}"
            except httpx.HTTPError as e:
                seen = type(e).__name__
            assert time.monotonic() < deadline, f"/healthz is {seen}, not {status}"
            await asyncio.sleep(0.1)


class ServerProcess:
    """``python -m serve`` on a free port, in its own process, stopped with SIGTERM.

    Its log is ``workdir/server-<port>.log``; its secret key file ``workdir/secret_key``
    (servers sharing a workdir accept each other's session cookies), unless ``env`` sets
    ``XIAOX_SECRET_KEY``. It can be started again after ``stop`` or ``kill``.
    """

    def __init__(self, model_dir: Path, workdir: Path, *, redis_url: str | None = None,
                 env: dict[str, str] | None = None, port: int | None = None):
        self.model_dir = model_dir
        self.workdir = workdir
        self.redis_url = redis_url
        self.port = port or free_port()
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server-{self.port}.log"

    def client(self, **kwargs) -> httpx.AsyncClient:
        """An HTTP client of this server (timeout 30 s unless given)."""
        return httpx.AsyncClient(base_url=self.url, **{"timeout": 30, **kwargs})

    def launch(self) -> ServerProcess:
        command = [sys.executable, "-m", "serve", "--model", str(self.model_dir),
                   "--port", str(self.port)]
        if self.redis_url:
            command += ["--redis-url", self.redis_url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOX_")}
        env.update({"XIAOX_SECRET_KEY_FILE": str(self.workdir / "secret_key"),
                    "XIAOX_LOG_LEVEL": "warning", "XIAOX_DRAIN_SECONDS": "5",
                    "XIAOX_THREADS": "1",  # several servers share two cores
                    # many tests log in many names from 127.0.0.1: the per-address login
                    # limit is tested where it is meant (tests/reliability/test_edge.py)
                    "XIAOX_LOGIN_RATE_LIMIT": "100000",
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout: float = 90.0) -> ServerProcess:
        if self.proc is None:
            raise ServerDied("the server was never launched")
        wait_healthy(self.url, self.proc, self.log_tail, timeout)
        return self

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
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        """A crash: SIGKILL, no graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

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
            server.stop()
            server.port = free_port()
            try:
                server.launch().wait_healthy()
            except ServerDied as second:
                raise second from first


@contextlib.contextmanager
def running(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    """The servers started together, and stopped on the way out (also when one fails)."""
    try:
        start_servers(*servers)
        yield servers
    finally:
        for server in servers:
            server.stop()


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


class BackgroundStream:
    """Events that a background task reads from ``GET /stream``, in order, and a wait for
    them. Subclasses run the task (``_task``) and feed what they read to ``_feed``."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def _got(self, event: dict) -> None:
        self.events.append(event)
        self._changed.set()

    def _feed(self, parser: StrictSSEParser, pending: str, text: str,
              convert: Callable[[dict[str, str]], dict]) -> str:
        """Every complete line of ``pending + text`` to ``parser``, each event it completes
        (``convert``ed) to ``events``: the unterminated rest."""
        lines, pending = sse_lines(pending + text)
        for line in lines:
            event = parser.feed(line)
            if event is not None:
                self._got(convert(event))
        return pending

    def _failure(self) -> BaseException | None:
        """What ended the reading for good (raised by ``wait_for``), or None."""
        return None

    def _progress(self) -> str:
        return f"events so far: {self.events}"

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def wait_for(self, predicate: Callable[[list[dict]], bool],
                       timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not predicate(self.events):
            failure = self._failure()
            if failure is not None:
                raise failure
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"waited {timeout}s; {self._progress()}")
            self._changed.clear()
            try:  # in slices: a predicate may look at more than the events
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
            except TimeoutError:
                pass
        return self.events

    def of_type(self, *types: str) -> list[dict]:
        return [e for e in self.events if e["event"] in types]


class ChatStream(BackgroundStream):
    """One ``GET /stream`` connection; its events' ``data`` parsed as JSON."""

    def __init__(self, client: httpx.AsyncClient, room: str = "lobby",
                 last_event_id: str | None = None, via_header: bool = True):
        super().__init__()
        self.client, self.room = client, room
        self.headers = {"Accept": "text/event-stream"}
        self.params = {"room": room}
        if last_event_id is not None:
            if via_header:
                self.headers["Last-Event-ID"] = last_event_id
            else:
                self.params["last_event_id"] = last_event_id
        self.status: int | None = None
        self.response_headers: httpx.Headers | None = None
        self.parser = StrictSSEParser()
        self._opened = asyncio.Event()
        self.error: BaseException | None = None

    async def __aenter__(self) -> ChatStream:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._opened.wait(), 20)
        if self.error:
            raise self.error
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _failure(self) -> BaseException | None:
        return self.error

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
                    pending = self._feed(self.parser, pending, chunk, _json_data)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surfaced by wait_for
            self.error = e
            self._opened.set()
            self._changed.set()


def _json_data(event: dict[str, str]) -> dict:
    return {**event, "data": json.loads(event["data"])}


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


def metric_value(text: str, name: str) -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
