"""Helpers of the reliability suite: a spec-exact SSE reader that reconnects, Redis and
/proc counters. Servers are started with ``tests.serve._helpers_server``.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import time
from collections.abc import Callable

import httpx
import redis

from serve.web.broker import parse_id
from tests.serve._helpers_server import (
    BackgroundStream,
    StrictSSEParser,
    sse_lines,
)

EVENT_TYPES = {"message", "typing", "token", "join", "leave", "reset"}


def parse_sse(raw: str) -> list[dict]:
    """A whole chat stream, strictly: every event a known type with a JSON object whose
    ``id`` equals the SSE ``id:``. AssertionError on anything else."""
    parser = StrictSSEParser()
    lines, rest = sse_lines(raw)
    events = []
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            events.append(check_event(event))
    assert rest == "" or rest == "\r", f"a partial line at the end: {rest[:80]!r}"
    return events


def check_event(event: dict[str, str]) -> dict:
    assert event.get("event") in EVENT_TYPES, f"unknown event type: {event}"
    data = json.loads(event["data"])
    assert isinstance(data, dict) and data.get("id") == event.get("id"), event
    return {"id": event["id"], "event": event["event"], "data": data}


class ReconnectingStream(BackgroundStream):
    """``GET /stream`` read in a background task like a browser's EventSource would: on
    any end or error it reconnects (to ``base_urls`` in turn) with ``Last-Event-ID``.

    Nothing is de-duplicated here: ``events`` is exactly what the server sent, so the
    tests can check that a replay repeats nothing and misses nothing.
    """

    def __init__(self, cookies: httpx.Cookies, base_urls: list[str], room: str,
                 last_event_id: str | None = None, retry_seconds: float = 0.2):
        super().__init__()
        self.cookies, self.base_urls, self.room = cookies, base_urls, room
        self.last_event_id = last_event_id
        self.retry_seconds = retry_seconds
        self.connections = 0  # 200 responses
        self.refusals: list[int] = []  # non-200 statuses met while reconnecting
        self.failures: list[str] = []  # transport errors met while reconnecting
        self.protocol_error: AssertionError | None = None

    async def start(self, wait_subscribed: bool = True) -> ReconnectingStream:
        """Begin reading; by default wait for the first 200 (the server subscribes and
        replays before it answers: what follows cannot be missed)."""
        self._task = asyncio.create_task(self._run())
        if wait_subscribed:
            await self.wait_for(lambda events: self.connections > 0, 20)
        return self

    def _got(self, event: dict) -> None:
        self.last_event_id = event["id"]
        super()._got(event)

    def _failure(self) -> BaseException | None:
        return self.protocol_error

    def _progress(self) -> str:
        return (f"{len(self.events)} events, refusals {self.refusals[-5:]}, "
                f"failures {self.failures[-5:]}")

    async def _run(self) -> None:
        attempt = 0
        async with httpx.AsyncClient(cookies=self.cookies,
                                     timeout=httpx.Timeout(10, read=None)) as client:
            while True:
                url = self.base_urls[attempt % len(self.base_urls)] + "/stream"
                attempt += 1
                headers = {"Accept": "text/event-stream"}
                if self.last_event_id is not None:
                    headers["Last-Event-ID"] = self.last_event_id
                try:
                    async with client.stream("GET", url, params={"room": self.room},
                                             headers=headers) as response:
                        if response.status_code != 200:
                            self.refusals.append(response.status_code)
                            await response.aread()
                        else:
                            self.connections += 1
                            self._changed.set()
                            await self._read(response)
                except AssertionError as e:  # the stream broke the protocol: stop here
                    self.protocol_error = e
                    self._changed.set()
                    return
                except (httpx.HTTPError, OSError) as e:
                    self.failures.append(type(e).__name__)
                await asyncio.sleep(self.retry_seconds)

    async def _read(self, response: httpx.Response) -> None:
        parser = StrictSSEParser()
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        pending = ""
        async for chunk in response.aiter_bytes():
            pending = self._feed(parser, pending, decoder.decode(chunk), check_event)

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.events]


# --- Redis ---------------------------------------------------------------------------------

def log_key(room: str) -> str:
    """The broker's event log of a room (serve/web/broker.py ``RedisBroker._log_key``)."""
    return f"xiaox:{{{room}}}:log"


def stored_ids(redis_url: str, room: str) -> list[str]:
    with redis.Redis.from_url(redis_url) as r:
        return [entry_id.decode() for entry_id, _ in r.xrange(log_key(room))]


def stored_events(redis_url: str, room: str) -> list[dict]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        return [{"id": entry_id, "event": fields["type"], "data": json.loads(fields["data"])}
                for entry_id, fields in r.xrange(log_key(room))]


def redis_client_count(redis_url: str) -> int:
    """Connections to Redis, not counting the one asking."""
    with redis.Redis.from_url(redis_url) as r:
        me = r.client_id()
        return sum(1 for c in r.client_list() if int(c["id"]) != me)


def ids_after(ids: list[str], after: str | None) -> list[str]:
    if after is None:
        return list(ids)
    return [i for i in ids if parse_id(i) > parse_id(after)]


# --- /proc ---------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def tcp_ports_of_fds(pid: int) -> list[tuple[int, int]]:
    """(local port, remote port) of each TCP socket the process holds open (IPv4 and v6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[9] in inodes:
                ports.append((int(cols[1].rsplit(":", 1)[1], 16),
                              int(cols[2].rsplit(":", 1)[1], 16)))
    return ports


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return predicate()
