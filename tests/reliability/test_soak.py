"""The long soak: only with XIAOX_SOAK=1 (minutes; XIAOX_SOAK_SECONDS, default 600).

Two app processes share Redis; 100 reconnecting SSE clients listen while a message is
sent every half second; every minute Redis is SIGKILLed and restarted, or process B is
SIGTERMed and restarted. At the end every client got exactly the stored events, once
and in order, and process A's memory and file descriptors did not grow.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import pytest

from tests.reliability._support import ReconnectingStream, fd_count, rss_mb, tcp_ports_of_fds
from tests.reliability.test_faults import assert_exactly_the_stored_events, settle
from tests.serve._helpers_server import (
    ServerProcess,
    login,
    start_servers,
    wait_health,
)

SOAK_SECONDS = float(os.environ.get("XIAOX_SOAK_SECONDS", "600"))
pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(os.environ.get("XIAOX_SOAK") != "1",
                       reason="the soak runs for minutes: set XIAOX_SOAK=1 to run it"),
    pytest.mark.timeout(int(SOAK_SECONDS) + 600),
]
ENV = {"XIAOX_RATE_LIMIT_MESSAGES": "1000000", "XIAOX_RATE_LIMIT_IP_MESSAGES": "1000000",
       "XIAOX_LOG_MAX_EVENTS": "1000000"}
CLIENTS = 100
ROOM = "soak"


def other_fds(server: ServerProcess, redis_port: int) -> int:
    """Open files besides the clients' sockets and the (capped) Redis pool's."""
    ports = tcp_ports_of_fds(server.proc.pid)
    clients = sum(1 for local, remote in ports if local == server.port and remote != 0)
    to_redis = sum(1 for _, remote in ports if remote == redis_port)
    return fd_count(server.proc.pid) - clients - to_redis


async def test_soak(model_dir, redis_server, tmp_path):
    a, b = (ServerProcess(model_dir, tmp_path, redis_url=redis_server.url, env=ENV)
            for _ in range(2))
    start_servers(a, b)
    sender = a.client()
    streams: list[ReconnectingStream] = []
    try:
        await login(sender, "soaker")
        urls = [a.url, b.url]
        streams = [ReconnectingStream(sender.cookies, urls[i % 2:] + urls[:i % 2], ROOM)
                   for i in range(CLIENTS)]
        for stream in streams:
            await stream.start()
        await asyncio.sleep(2)
        base_rss, base_fds = rss_mb(a.proc.pid), other_fds(a, redis_server.port)
        refused, sent = 0, 0
        faults = itertools.cycle(["redis", "sigterm"])
        started = next_fault = time.monotonic()
        while time.monotonic() - started < SOAK_SECONDS:
            if time.monotonic() >= next_fault + 60:
                next_fault = time.monotonic()
                if next(faults) == "redis":
                    redis_server.kill()
                    await asyncio.sleep(1)
                    redis_server.start()
                else:
                    await asyncio.to_thread(b.terminate, 30)
                    b = ServerProcess(model_dir, tmp_path, redis_url=redis_server.url, env=ENV,
                                      port=b.port)
                    await asyncio.to_thread(b.start)
            response = await sender.post("/send", params={"room": ROOM},
                                         json={"message": f"第{sent}条：你好"})
            if response.status_code == 202:
                sent += 1
            else:
                assert response.status_code == 503, response.text  # only during an outage
                refused += 1
            await asyncio.sleep(0.5)
        await wait_health(a, 200)
        stored = await settle(streams, redis_server.url, ROOM, timeout=120)
        for stream in streams:
            assert stream.protocol_error is None
            assert_exactly_the_stored_events(stream, stored)
        assert other_fds(a, redis_server.port) <= base_fds + 10
        assert rss_mb(a.proc.pid) - base_rss < 150
        print(f"\nsoak {SOAK_SECONDS:.0f}s: {sent} messages, {refused} refused during outages, "
              f"{len(stored)} events, RSS {base_rss:.0f} -> {rss_mb(a.proc.pid):.0f} MB")
    finally:
        for stream in streams:
            await stream.close()
        await sender.aclose()
        a.stop()
        b.stop()
