"""Leases, in this process and in a real redis-server: the same contract."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from serve.web.broker import RedisBroker
from serve.web.leases import LocalLeases, RedisLeases

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["local", "redis"])
def make_leases(request):
    """An async context of leases (the broker's Redis connection, on this test's loop)."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    @contextlib.asynccontextmanager
    async def make():
        if url is None:
            yield LocalLeases()
            return
        broker = RedisBroker(url)
        await broker.start()
        try:
            yield RedisLeases(broker)
        finally:
            await broker.close()

    return make


async def test_a_cap_admits_that_many_live_leases(make_leases):
    async with make_leases() as leases:
        got = [await leases.acquire("k", f"t{i}", lease=5, cap=2) for i in range(3)]
        assert [admitted for admitted, _ in got] == [True, True, False]
        await leases.release("k", "t0")
        assert (await leases.acquire("k", "t3", lease=5, cap=2))[0]  # a freed place


async def test_an_unrefreshed_lease_runs_out(make_leases):
    async with make_leases() as leases:
        assert (await leases.acquire("k", "crashed", lease=0.2, cap=1))[0]
        assert not (await leases.acquire("k", "next", lease=0.2, cap=1))[0]
        await asyncio.sleep(0.3)
        assert (await leases.acquire("k", "next", lease=0.2, cap=1))[0]
        await leases.refresh("k", "next", lease=5)
        await asyncio.sleep(0.3)
        assert not (await leases.acquire("k", "third", lease=5, cap=1))[0]  # refreshed: held


async def test_the_first_lease_announces_and_the_last_settles_once(make_leases):
    async with make_leases() as leases:
        assert await leases.acquire("p", "a", lease=5, announce=True) == (True, True)
        assert await leases.acquire("p", "b", lease=5, announce=True) == (True, False)
        await leases.release("p", "a")
        assert not await leases.settle("p")  # b is still there
        await leases.release("p", "b", linger=0.2, lease=5)
        assert not await leases.settle("p")  # lingering: a reconnect would find it held
        await asyncio.sleep(0.3)
        assert [await leases.settle("p") for _ in range(3)] == [True, False, False]
        assert await leases.acquire("p", "c", lease=5, announce=True) == (True, True)


async def test_a_reconnect_within_the_linger_announces_nothing(make_leases):
    async with make_leases() as leases:
        assert (await leases.acquire("p", "a", lease=5, announce=True))[1]
        await leases.release("p", "a", linger=0.3, lease=5)
        assert await leases.acquire("p", "b", lease=5, announce=True) == (True, False)
        await asyncio.sleep(0.4)
        assert not await leases.settle("p")


async def test_local_leases_forget_empty_keys():
    leases = LocalLeases()
    for i in range(100):
        await leases.acquire(f"k{i}", "t", lease=5, cap=1)
        await leases.release(f"k{i}", "t")
    assert len(leases) == 0
