"""The probes: ``/livez`` (the process answers), ``/readyz`` (ready to serve) and
``/healthz`` (readiness with its problems), through a Redis outage."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest

from serve.web.health import readiness
from tests.serve._helpers_server import ServerProcess, running

pytestmark = pytest.mark.timeout(180)


async def wait_status(client: httpx.AsyncClient, path: str, status: int,
                      timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(path)
        if response.status_code == status:
            return response
        assert time.monotonic() < deadline, f"{path} is {response.status_code}: {response.text}"
        await asyncio.sleep(0.1)


async def test_a_redis_outage_makes_the_server_unready_but_alive(model_dir, redis_server,
                                                                 tmp_path):
    server = ServerProcess(model_dir, tmp_path, redis_url=redis_server.url)
    with running(server):
        async with server.client() as c:
            live = await c.get("/livez")
            assert (live.status_code, live.json()) == (200, {"status": "alive"})
            ready = await c.get("/readyz")
            assert ready.status_code == 200
            assert ready.json() == {"status": "ready", "failed": [], "checks": {
                "model": "ok", "broker": "ok", "draining": "ok"}}
            assert ready.headers["cache-control"] == "no-store"

            redis_server.kill()
            unready = await wait_status(c, "/readyz", 503)
            assert unready.json() == {"status": "not ready", "failed": ["broker"], "checks": {
                "model": "ok", "broker": "unreachable", "draining": "ok"}}
            # Which Redis it is stays in the log: no host, no port, no error text.
            assert "127.0.0.1" not in unready.text and str(redis_server.port) not in unready.text
            assert (await c.get("/livez")).status_code == 200
            health = await c.get("/healthz")  # as before: 503 with its problems
            assert health.status_code == 503 and health.json()["status"] == "unhealthy"
            assert any(p.startswith("redis:") for p in health.json()["problems"])

            redis_server.start()  # the same port
            back = await wait_status(c, "/readyz", 200)
            assert back.json()["failed"] == []
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/livez")).status_code == 200


def fake_chat(*, engine_running: bool | None = True, broker_healthy: bool | None = True,
              closing: bool = False, stalled: float = 0.0) -> SimpleNamespace:
    engine = None if engine_running is None else SimpleNamespace(
        running=engine_running, stalled_seconds=lambda: stalled)
    broker = None if broker_healthy is None else SimpleNamespace(healthy=broker_healthy)
    return SimpleNamespace(engine=engine, broker=broker, closing=closing)


@pytest.mark.parametrize(("chat", "failed", "checks"), [
    (fake_chat(), [], {"model": "ok", "broker": "ok", "draining": "ok"}),
    (fake_chat(engine_running=None, broker_healthy=None), ["model", "broker"],
     {"model": "loading", "broker": "not started", "draining": "ok"}),
    (fake_chat(engine_running=False), ["model"],
     {"model": "stopped", "broker": "ok", "draining": "ok"}),
    (fake_chat(closing=True), ["draining"], {"model": "ok", "broker": "ok", "draining": "yes"}),
    (fake_chat(stalled=9.0), [], {"model": "ok", "broker": "ok", "draining": "ok"}),
    (fake_chat(stalled=10.0), ["model"], {"model": "stalled", "broker": "ok",
                                          "draining": "ok"}),
])
def test_readiness_names_each_failed_check(chat, failed, checks):
    # Loading and draining cannot be seen over HTTP (uvicorn listens only once the
    # lifespan has started, and stops listening when it drains): the checks themselves.
    body = readiness(chat)
    assert body["failed"] == failed and body["checks"] == checks
    assert body["status"] == ("ready" if not failed else "not ready")


def test_metrics_are_for_the_allowed_addresses_only():
    from serve.web.health import metrics_allowed

    loopback = ("127.0.0.1", "::1")
    assert metrics_allowed("127.0.0.1", loopback) and metrics_allowed("::1", loopback)
    assert not metrics_allowed("203.0.113.5", loopback)
    assert not metrics_allowed("unknown", loopback)  # no address: nobody's
    assert metrics_allowed("10.1.2.3", ("10.0.0.0/8",))
    assert not metrics_allowed("::ffff:10.1.2.3", ("10.0.0.0/8",))
