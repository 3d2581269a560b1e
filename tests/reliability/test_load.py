"""500 concurrent SSE clients on two ``python -m serve`` processes sharing one Redis.

Every client must receive every stored event of the room from the first sent message
on, once and in order, with no error; the app processes' memory (RSS) and open file
descriptors stay bounded while the clients are there and come back near their baseline
once they have left. Only 127.0.0.1, bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time

import httpx
import pytest

from tests.reliability._support import (
    fd_count,
    parse_sse,
    rss_mb,
    stored_ids,
    tcp_ports_of_fds,
    wait_until,
)
from tests.serve._helpers_server import (
    ServerProcess,
    login,
    metric_value,
    running,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(300)]

CLIENTS = int(os.environ.get("XIAOX_LOAD_CLIENTS", "500"))
MESSAGES = 3
ROOM = "crowd"
# Generous bounds: a leak of a few KB per client-event would blow them, noise would not.
PEAK_RSS_GROWTH_MB = 400
FINAL_RSS_GROWTH_MB = 200
FINAL_FD_GROWTH = 10  # besides the Redis connections
REDIS_POOL_CAP = 100  # redis-py 8's default max_connections of an asyncio pool


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.skip(f"needs {needed} open files, the hard limit allows {soft}")


class RawClient:
    """One SSE client: the raw bytes it got (parsed strictly at the end) and its errors."""

    def __init__(self, client: httpx.AsyncClient, url: str):
        self.client, self.url = client, url
        self.raw = bytearray()
        self.status: int | None = None
        self.error: str | None = None
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        try:
            async with self.client.stream("GET", self.url + "/stream", params={"room": ROOM},
                                          headers={"Accept": "text/event-stream"}) as response:
                self.status = response.status_code
                async for chunk in response.aiter_raw():
                    self.raw += chunk
                if self.status == 200:
                    self.error = "the stream ended while the client was still there"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any transport error is a failure of the test
            self.error = f"{type(e).__name__}: {e}"


async def gauge(url: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        return metric_value((await c.get("/metrics")).text, name)


@pytest.fixture
def two_servers(model_dir, redis_server, tmp_path):
    raise_fd_limit(4 * CLIENTS + 256)  # before the servers start: they inherit it
    with running(*(ServerProcess(model_dir, tmp_path, redis_url=redis_server.url,
                                 env={"XIAOX_RATE_LIMIT_MESSAGES": "1000",
                                      "XIAOX_RATE_LIMIT_IP_MESSAGES": "100000",
                                      # one session holds every stream here
                                      "XIAOX_MAX_STREAMS_PER_SESSION": str(CLIENTS + 10),
                                      "XIAOX_MAX_STREAMS_PER_IP": str(CLIENTS + 10)})
                   for _ in range(2))) as servers:
        yield servers


async def _connect_all(http, servers) -> list:
    """CLIENTS streams over both processes, each with its 200."""
    clients = [RawClient(http, servers[i % 2].url) for i in range(CLIENTS)]
    for batch in range(0, CLIENTS, 50):  # a steady arrival, not one SYN flood
        for c in clients[batch:batch + 50]:
            c.task = asyncio.create_task(c.run())
        await asyncio.sleep(0.05)
    # Every client is subscribed once it has its 200 (the subscription and the replay
    # come first; one session's streams announce a single join, so count the 200s).
    assert await wait_until(lambda: sum(c.status == 200 for c in clients) >= CLIENTS,
                            120, 0.5), (
        sum(c.status == 200 for c in clients), [c.error for c in clients if c.error][:3])
    assert all(c.status == 200 for c in clients), {c.status for c in clients}
    return clients


def _assert_every_client_in_order(clients, stored: list[str], sent: list[dict]) -> None:
    """Each client got the log from the first message on: no gap, duplicate, reordering."""
    for c in clients:
        ids = [e["id"] for e in parse_sse(c.raw.decode("utf-8"))]
        assert sent[0]["id"] in ids
        got = ids[ids.index(sent[0]["id"]):]
        assert got == stored[:len(got)], "a gap, a duplicate or a reordering"
        assert all(m["id"] in got for m in sent)


async def _assert_all_released(clients, servers, pids, redis_port: int,
                               base_fds: list[int]) -> list[float]:
    """The clients leave: every socket is closed; what remains above the baseline is
    redis-py's pool of idle connections, which grew with the join/leave bursts and is
    capped. The processes' RSS afterwards."""
    for c in clients:
        c.task.cancel()
    await asyncio.gather(*(c.task for c in clients), return_exceptions=True)
    for server in servers:
        deadline = time.monotonic() + 60
        while await gauge(server.url, "xiaox_sse_clients") > 0:
            assert time.monotonic() < deadline, "the server still counts SSE clients"
            await asyncio.sleep(0.5)

    def sockets(i: int) -> tuple[int, int]:
        ports = tcp_ports_of_fds(pids[i])
        clients_left = sum(1 for local, remote in ports
                           if local == servers[i].port and remote != 0)
        to_redis = sum(1 for _, remote in ports if remote == redis_port)
        return clients_left, to_redis

    assert await wait_until(lambda: all(sockets(i)[0] <= 1 for i in range(2)), 30), (
        [sockets(i) for i in range(2)])
    for i in range(2):
        to_redis = sockets(i)[1]
        assert to_redis <= REDIS_POOL_CAP + 2, to_redis  # the pool and the reader
        assert fd_count(pids[i]) <= base_fds[i] + to_redis + FINAL_FD_GROWTH, (
            base_fds, fd_count(pids[i]), to_redis)
    return [rss_mb(p) for p in pids]


async def test_500_sse_clients_on_two_processes_get_every_event(two_servers, redis_server):
    servers = two_servers
    pids = [s.proc.pid for s in servers]
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None), limits=limits) as http:
        sender = servers[0].client()
        await login(sender, "crowd")  # one session cookie, valid on both processes
        http.cookies = sender.cookies
        # Warm-up: one message answered, so the baseline includes the loaded engine.
        warm = await sender.post("/send", params={"room": "warm"}, json={"message": "热身"})
        assert warm.status_code == 202
        await asyncio.sleep(1.0)
        base_rss = [rss_mb(p) for p in pids]
        base_fds = [fd_count(p) for p in pids]

        started = time.monotonic()
        clients = await _connect_all(http, servers)
        connect_seconds = time.monotonic() - started

        sent = []
        for i in range(MESSAGES):
            response = await sender.post("/send", params={"room": ROOM},
                                         json={"message": f"大家好，第{i}次"})
            assert response.status_code == 202, response.text
            sent.append(response.json())
        markers = [f'"reply_to":"{m["id"]}"'.encode() for m in sent]
        peak_rss, peak_fds = list(base_rss), list(base_fds)

        def all_answered() -> bool:
            for i, p in enumerate(pids):
                peak_rss[i] = max(peak_rss[i], rss_mb(p))
                peak_fds[i] = max(peak_fds[i], fd_count(p))
            return all(marker in c.raw for c in clients for marker in markers)

        assert await wait_until(all_answered, 120, 0.5), (
            sum(all(m in c.raw for m in markers) for c in clients), "clients got every reply")
        deliver_seconds = time.monotonic() - started - connect_seconds
        await asyncio.sleep(0.5)
        stored = stored_ids(redis_server.url, ROOM)
        first = stored.index(sent[0]["id"])
        errors = [c.error for c in clients if c.error]
        assert not errors, errors[:5]
        _assert_every_client_in_order(clients, stored[first:], sent)
        for i in range(2):
            assert peak_rss[i] - base_rss[i] < PEAK_RSS_GROWTH_MB, (base_rss, peak_rss)
            assert peak_fds[i] >= base_fds[i] + CLIENTS // 2  # the clients were really there

        final_rss = await _assert_all_released(clients, servers, pids, redis_server.port,
                                               base_fds)
        for i in range(2):
            assert final_rss[i] - base_rss[i] < FINAL_RSS_GROWTH_MB, (base_rss, final_rss)
        # Both processes are still healthy and answer.
        for server in servers:
            async with server.client(timeout=10) as c:
                assert (await c.get("/healthz")).status_code == 200
        await sender.aclose()
        print(f"\n{CLIENTS} clients: connected in {connect_seconds:.1f}s, {MESSAGES} replies "
              f"to all in {deliver_seconds:.1f}s; RSS MB base {base_rss} peak {peak_rss} "
              f"final {final_rss}; fds base {base_fds} peak {peak_fds}")


HERD = 500


async def test_a_herd_of_simultaneous_reconnects_is_served(model_dir, redis_server, tmp_path):
    """What every client does after a restart: reconnect at once. None may be refused."""
    raise_fd_limit(2 * HERD + 256)
    # One session plays the whole herd here: lift its stream caps (the caps have tests
    # of their own in test_rooms.py).
    env = {"XIAOX_MAX_STREAMS_PER_SESSION": str(HERD + 10),
           "XIAOX_MAX_STREAMS_PER_IP": str(HERD + 10)}
    server = ServerProcess(model_dir, tmp_path, redis_url=redis_server.url, env=env).start()
    try:
        limits = httpx.Limits(max_connections=HERD + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, limits=limits,
                                     timeout=httpx.Timeout(30, read=None)) as http:
            await login(http, "herd")
            clients = [RawClient(http, server.url) for _ in range(HERD)]
            health: list[int] = []

            async def watch_health() -> None:
                async with server.client(timeout=10) as c:
                    while True:
                        health.append((await c.get("/healthz")).status_code)
                        await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch_health())
            for c in clients:
                c.task = asyncio.create_task(c.run())
            assert await wait_until(lambda: all(c.status is not None or c.error
                                                for c in clients), 60)
            await asyncio.sleep(1.0)
            watcher.cancel()
            for c in clients:
                c.task.cancel()
            await asyncio.gather(watcher, *(c.task for c in clients), return_exceptions=True)
            statuses = sorted({str(c.status) for c in clients})
            assert statuses == ["200"], [(s, sum(str(c.status) == s for c in clients))
                                         for s in statuses]
            assert set(health) == {200}, health
    finally:
        server.stop()
