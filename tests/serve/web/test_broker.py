"""The broker contract, for the in-process broker and for Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from serve.web.broker import (
    MALFORMED,
    Broker,
    BrokerUnavailable,
    InProcessBroker,
    RedisBroker,
    _decode,
    parse_id,
)
from serve.web.settings import settings_from_env

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def running(broker: Broker):
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture(params=["in-process", "redis"])
def make_broker(request):
    if request.param == "in-process":
        return lambda **kw: InProcessBroker(**kw)
    url = request.getfixturevalue("redis_server").url
    return lambda **kw: RedisBroker(url, **kw)


async def take(events, n: int, timeout: float = 10.0) -> list:
    out = []

    async def collect():
        async for event in events:
            out.append(event)
            if len(out) == n:
                return

    await asyncio.wait_for(collect(), timeout)
    return out


def test_event_ids_parse_and_order():
    assert parse_id("1700000000000-2") == (1700000000000, 2)
    assert parse_id("5-10") > parse_id("5-9")
    for bad in ("", "5", "a-1", "1-b", "-1", "1--1", "1-2-3", "1" * 60 + "-0",
                "١-0", "0-١", "²-0", "１-0", " 1-0", "1-0\n", "+1-0",
                f"{2**64}-0", f"0-{2**64}", "1" * 21 + "-0", None, 5):
        with pytest.raises(ValueError):
            parse_id(bad)
    assert parse_id(f"{2**64 - 1}-{2**64 - 1}") == (2**64 - 1, 2**64 - 1)


async def test_publish_history_and_replay(make_broker):
    async with running(make_broker()) as broker:
        assert await broker.history("room", 10) == ([], "0-0")
        published = [await broker.publish("room", "message", {"role": "user", "text": "一"}),
                     await broker.publish("room", "typing", {"reply_id": "r"}),
                     await broker.publish("room", "token", {"reply_id": "r", "delta": "好"}),
                     await broker.publish("room", "message", {"role": "bot", "text": "好"}),
                     await broker.publish("other", "message", {"role": "user", "text": "別"})]
        keys = [e.key for e in published[:4]]
        assert keys == sorted(keys) and len(set(keys)) == 4
        assert all(e.data["id"] == e.id for e in published)
        assert published[0].data["room"] == "room" and isinstance(published[0].data["ts"], float)
        messages, cursor = await broker.history("room", 10)
        assert [m.data["text"] for m in messages] == ["一", "好"]  # messages only
        assert cursor == published[3].id  # the room's last id, of any type
        assert [m.id for m in (await broker.history("room", 1))[0]] == [published[3].id]
        assert (await broker.history("room", 0))[0] == []
        replayed = await broker.replay("room", published[0].id)
        assert [e.id for e in replayed] == [e.id for e in published[1:4]]
        assert [e.type for e in replayed] == ["typing", "token", "message"]
        assert await broker.replay("room", published[3].id) == []
        assert len(await broker.replay("room", "0-0")) == 4
        assert await broker.last_id("room") == published[3].id
        assert await broker.last_id("nobody-here") == "0-0"


async def test_subscribe_replays_then_goes_live_without_gaps_or_duplicates(make_broker):
    async with running(make_broker()) as broker:
        first = await broker.publish("room", "message", {"text": "0"})
        before = [await broker.publish("room", "message", {"text": str(i)}) for i in (1, 2)]
        async with broker.subscribe("room", last_id=first.id) as events:
            after = [await broker.publish("room", "token", {"delta": str(i)}) for i in (3, 4)]
            got = await take(events, 4)
        assert [e.id for e in got] == [e.id for e in before + after]


async def test_subscribe_without_last_id_starts_now(make_broker):
    async with running(make_broker()) as broker:
        await broker.publish("room", "message", {"text": "old"})
        async with broker.subscribe("room") as events:
            new = await broker.publish("room", "message", {"text": "new"})
            got = await take(events, 1)
        assert [e.id for e in got] == [new.id]


async def test_every_listener_gets_every_event_of_its_room_only(make_broker):
    async with running(make_broker()) as broker:
        async with broker.subscribe("a") as a1, broker.subscribe("a") as a2, \
                broker.subscribe("b") as b:
            sent = [await broker.publish("a", "token", {"delta": str(i)}) for i in range(20)]
            other = await broker.publish("b", "token", {"delta": "b"})
            got1, got2, got_b = await asyncio.gather(take(a1, 20), take(a2, 20), take(b, 1))
        assert [e.id for e in got1] == [e.id for e in got2] == [e.id for e in sent]
        assert [e.id for e in got_b] == [other.id]
        # Left: an ended subscription is sent nothing more, and the room (no listener
        # left, so no longer watched) is live again for the next subscriber.
        async with broker.subscribe("a") as again:
            later = await broker.publish("a", "token", {"delta": "later"})
            assert [e.id for e in await take(again, 1)] == [later.id]
        for ended in (a1, a2):
            with pytest.raises(TimeoutError):
                await take(ended, 1, timeout=0.5)


async def test_a_listener_too_slow_is_ended_not_buffered_forever(make_broker):
    broker = make_broker()
    broker.max_pending = 5
    async with running(broker):
        async with broker.subscribe("room") as events:
            published = [await broker.publish("room", "token", {"delta": "x"}) for _ in range(20)]
            deadline = time.monotonic() + 10  # the Redis reader delivers until it overflows
            while not all(listener.ended for listener in broker._listeners["room"]):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            got = [e async for e in events]  # ends by itself
        assert 0 < len(got) <= 5
        assert [e.id for e in got] == [e.id for e in published[:len(got)]]
        # What it missed is in the log: a reconnect with its last id gets the rest.
        rest = await broker.replay("room", got[-1].id)
        assert [e.id for e in got + rest] == [e.id for e in published]


async def test_closing_the_broker_ends_its_listeners(make_broker):
    broker = make_broker()
    await broker.start()
    async with broker.subscribe("room") as events:
        reader = asyncio.ensure_future(take(events, 1))
        await asyncio.sleep(0.1)
        await broker.close()
        assert await asyncio.wait_for(reader, 5) == []  # ended, not hanging
    with pytest.raises(BrokerUnavailable):
        await broker.publish("room", "message", {"text": "late"})


# --- Redis only ---------------------------------------------------------------------------

@pytest.mark.redis
async def test_two_brokers_on_one_redis_see_each_others_events(redis_server):
    async with running(RedisBroker(redis_server.url)) as one, \
            running(RedisBroker(redis_server.url)) as two:
        async with one.subscribe("lobby") as events:
            sent = await two.publish("lobby", "message", {"text": "from two"})
            got = await take(events, 1)
        assert got[0].id == sent.id and got[0].data["text"] == "from two"
        assert (await one.history("lobby", 5))[0][0].id == sent.id


@pytest.mark.redis
async def test_one_redis_reader_per_process_however_many_listeners(redis_server):
    import redis

    async with running(RedisBroker(redis_server.url)) as broker:
        async with contextlib.AsyncExitStack() as stack:
            listeners = [await stack.enter_async_context(broker.subscribe(f"room-{i % 5}"))
                         for i in range(60)]
            await broker.publish("room-0", "message", {"text": "hello"})
            await asyncio.gather(*(take(events, 1) for events in listeners[::5]))
            clients = redis.Redis.from_url(redis_server.url).client_list()
            # one blocking reader plus a command connection or two; never one per listener
            assert len(clients) <= 4, clients


@pytest.mark.redis
async def test_a_redis_restart_loses_no_stored_message_and_live_events_resume(redis_server):
    async with running(RedisBroker(redis_server.url)) as broker:
        stored = await broker.publish("lobby", "message", {"text": "before"})
        async with broker.subscribe("lobby", last_id=stored.id) as events:
            redis_server.stop()
            deadline = time.monotonic() + 10
            while broker.healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not broker.healthy and "redis" in broker.problem
            with pytest.raises(BrokerUnavailable):
                await broker.publish("lobby", "token", {"delta": "x"}, timeout=0.3)
            # A stored message is retried until Redis is back, not dropped.
            pending = asyncio.ensure_future(
                broker.publish("lobby", "message", {"text": "during"}, timeout=None))
            await asyncio.sleep(0.5)
            assert not pending.done()
            redis_server.start()
            during = await asyncio.wait_for(pending, 20)
            after = await broker.publish("lobby", "message", {"text": "after"})
            got = await take(events, 2, timeout=20)
        assert broker.healthy
        assert [e.id for e in got] == [during.id, after.id]
        messages, _ = await broker.history("lobby", 10)
        assert [m.data["text"] for m in messages] == ["before", "during", "after"]


@pytest.mark.redis
async def test_the_log_is_bounded(redis_server):
    async with running(RedisBroker(redis_server.url, log_max_events=100,
                                   history_max_messages=50)) as broker:
        for i in range(1000):
            await broker.publish("busy", "message" if i % 2 else "token", {"i": i})
        import redis

        r = redis.Redis.from_url(redis_server.url)
        assert r.xlen("xiaox:{busy}:log") < 300  # MAXLEN ~: approximately, cheaply
        assert r.xlen("xiaox:{busy}:messages") < 200
        messages, _ = await broker.history("busy", 10)
        assert [m.data["i"] for m in messages] == list(range(981, 1000, 2))


@pytest.mark.redis
async def test_the_rate_limit_is_shared_by_every_process(redis_server):
    async with running(RedisBroker(redis_server.url)) as one, \
            running(RedisBroker(redis_server.url)) as two:
        results = [await broker.rate_hit("send:ann", 3, 60) for broker in (one, two, one, two)]
        assert [allowed for allowed, _ in results] == [True, True, True, False]
        assert 0 < results[-1][1] <= 60
        assert (await two.rate_hit("send:bob", 3, 60))[0]
        assert (await one.rate_hit("send:short", 1, 0.2))[0]
        assert not (await one.rate_hit("send:short", 1, 0.2))[0]
        await asyncio.sleep(0.3)
        assert (await one.rate_hit("send:short", 1, 0.2))[0]  # a new window


# --- Replication (issue 19): a chat message is acknowledged once a replica holds it --------

# A replica's first sync starts at once (Redis waits 5 s for more replicas by default).
FAST_SYNC = ("--repl-diskless-sync-delay", "0")

@contextlib.contextmanager
def primary_and_replica(tmp_path):
    from tests.conftest import RedisServer

    primary = RedisServer(tmp_path / "primary", FAST_SYNC)
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    replica = RedisServer(tmp_path / "replica", ("--replicaof", "127.0.0.1", str(primary.port)))
    try:
        primary.start()
        replica.start()
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


async def wait_linked(replica_port: int) -> None:
    import redis.asyncio as aredis

    async with aredis.Redis(port=replica_port, decode_responses=True) as r:
        for _ in range(200):
            if (await r.info("replication")).get("master_link_status") == "up":
                return
            await asyncio.sleep(0.05)
    raise TimeoutError("the replica never linked")


async def test_a_message_no_replica_acknowledged_is_a_503_and_its_retry_writes_once(tmp_path):
    import os
    import signal

    with primary_and_replica(tmp_path) as (primary, replica):
        await wait_linked(replica.port)
        broker = RedisBroker(primary.url, wait_replicas=1, wait_ms=100)
        async with running(broker):
            first = await broker.publish("r", "message", {"text": "有副本"})
            os.kill(replica.proc.pid, signal.SIGSTOP)  # connected, but acknowledging nothing
            try:
                started = time.monotonic()
                with pytest.raises(BrokerUnavailable, match="replicas acknowledged"):
                    await broker.publish("r", "message", {"text": "没人确认"}, timeout=0.6)
                assert time.monotonic() - started < 2  # bounded by the timeout, not stuck
                # Tokens and typing are not waited for: they are not kept in the history.
                await broker.publish("r", "token", {"delta": "x"}, timeout=0.6)
                retried = asyncio.create_task(
                    broker.publish("r", "message", {"text": "恢复后"}, timeout=5))
                await asyncio.sleep(0.3)
                assert not retried.done()  # held while no replica has it
            finally:
                os.kill(replica.proc.pid, signal.SIGCONT)
            await retried
            messages, _ = await broker.history("r", 10)
            # The unacknowledged write stays on the primary (its client was told 503 and
            # resends); the held one was retried with its uid: written exactly once.
            assert [m.data["text"] for m in messages] == ["有副本", "没人确认", "恢复后"]
            assert messages[0].id == first.id


async def test_a_primary_without_replicas_still_accepts_messages(redis_server):
    broker = RedisBroker(redis_server.url, wait_replicas=1, wait_ms=200)
    async with running(broker):
        started = time.monotonic()
        for i in range(5):
            await broker.publish("alone", "message", {"text": str(i)}, timeout=2)
        # Only the first write waits the full WAIT; once alone, a short one.
        assert time.monotonic() - started < 0.6
        assert len((await broker.history("alone", 10))[0]) == 5


async def test_under_sentinel_live_events_are_read_from_the_replica(tmp_path):
    from tests.reliability._topologies import SentinelTrio

    trio = SentinelTrio(tmp_path / "redis").start()
    try:
        async with running(RedisBroker(trio.url)) as broker:
            async with broker.subscribe("r") as live:
                event = await broker.publish("r", "message", {"text": "你好"})
                assert (await take(live, 1))[0].id == event.id
            import redis as sync_redis

            with sync_redis.Redis(port=trio.replica.port, decode_responses=True) as r:
                commands = [c.get("cmd") for c in r.client_list()]
            assert "xread" in commands or "ping" in commands, commands
    finally:
        trio.stop()


class FreezableLink:
    """A TCP relay between a replica and its primary whose flow can be stopped: frozen,
    what the primary sends stays here (dropped on ``close``), as on a cut network."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.frozen = False
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FreezableLink:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pump(source, sink) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    while self.frozen:
                        await asyncio.sleep(0.01)
                    sink.write(data)
                    await sink.drain()

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()  # whatever is still held here is lost
        if self.server is not None:
            self.server.close()


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["no-wait", "wait-1"])
async def test_the_replication_gap_is_closed_by_waiting(tmp_path, wait_replicas):
    """The gap itself, made deterministic: the replication link is cut, a message
    written, the primary killed and the replica promoted. Without WAIT the message was
    acknowledged and is gone; with WAIT it was never acknowledged (the client got a 503
    and retries)."""
    import redis.asyncio as aredis

    from tests.conftest import RedisServer

    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = RedisServer(tmp_path / "primary", FAST_SYNC)
    primary.start()
    link = await FreezableLink(primary.port).start()
    replica = RedisServer(tmp_path / "replica", ("--replicaof", "127.0.0.1", str(link.port)))
    replica.start()
    try:
        await wait_linked(replica.port)
        broker = RedisBroker(primary.url, wait_replicas=wait_replicas, wait_ms=100)
        async with running(broker):
            await broker.publish("gap", "message", {"text": "复制了"})
            async with aredis.Redis(port=replica.port) as r:
                for _ in range(200):  # the first one is on the replica before the cut
                    if await r.xlen("xiaox:{gap}:messages") == 1:
                        break
                    await asyncio.sleep(0.01)
            link.frozen = True  # the replica hears nothing more, the primary does not know
            acknowledged = True
            try:
                await broker.publish("gap", "message", {"text": "可能丢"}, timeout=0.5)
            except BrokerUnavailable:
                acknowledged = False
            primary.kill()
            await link.close()
        async with aredis.Redis(port=replica.port, decode_responses=True) as r:
            await r.execute_command("REPLICAOF", "NO", "ONE")  # what Sentinel would do
            texts = [fields["data"] for _, fields in await r.xrange("xiaox:{gap}:messages")]
    finally:
        replica.kill()
        primary.kill()
    assert any("复制了" in data for data in texts)
    # The second message never reached the promoted replica: without WAIT its client was
    # told it was stored (lost after an acknowledgement), with WAIT it was told to retry.
    assert not any("可能丢" in data for data in texts)
    assert acknowledged == (wait_replicas == 0)


async def test_a_password_in_the_url_is_never_logged_nor_shown(tmp_path, caplog):
    import logging

    from tests.conftest import RedisServer

    server = RedisServer(tmp_path, ("--requirepass", "hunter2-secret"))
    server.start()
    url = f"redis://:hunter2-secret@127.0.0.1:{server.port}/0"
    caplog.set_level(logging.DEBUG)
    try:
        async with running(RedisBroker(f"redis://:wrong-pass@127.0.0.1:{server.port}/0")
                           ) as wrong:
            assert not wrong.healthy  # refused by Redis: logged, without the password
            refused = wrong.problem
        async with running(RedisBroker(url)) as broker:
            await broker.publish("r", "message", {"text": "hi"})
            server.kill()
            with pytest.raises(BrokerUnavailable) as error:
                await broker.publish("r", "message", {"text": "down"}, timeout=0.3)
            problem = broker.problem
    finally:
        server.stop()
    assert "Authentication" in str(refused) or "password" in str(refused), refused
    shown = caplog.text + str(error.value) + str(problem) + str(refused) + repr(settings_from_env(
        {"XIAOX_REDIS_URL": url}))
    assert "redis" in shown and "hunter2" not in shown and "wrong-pass" not in shown
async def test_a_retried_publish_with_a_uid_is_stored_once(make_broker):
    async with running(make_broker()) as broker:
        first = await broker.publish("retry", "message", {"text": "一"}, uid="u1")
        again = await broker.publish("retry", "message", {"text": "一"}, uid="u1")
        other = await broker.publish("retry", "message", {"text": "一"}, uid="u2")
        assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
        assert again.id == first.id != other.id
        messages, _ = await broker.history("retry", 10)
        assert [m.id for m in messages] == [first.id, other.id]


async def test_a_replay_past_the_trimmed_log_starts_with_a_reset(make_broker):
    async with running(make_broker(log_max_events=10)) as broker:
        first = await broker.publish("trim", "token", {"i": 0})
        for i in range(1, 400):  # Redis trims whole nodes (MAXLEN ~): well past 10
            await broker.publish("trim", "token", {"i": i})
        async with broker.subscribe("trim", first.id) as live:
            reset = (await take(live, 1))[0]
        assert reset.type == "reset" and reset.id == await broker.last_id("trim")
        recent = await broker.last_id("trim")
        async with broker.subscribe("trim", recent) as live:  # no gap: no reset
            later = await broker.publish("trim", "token", {"i": "late"})
            assert [e.id for e in await take(live, 1)] == [later.id]


async def test_a_replay_into_a_room_without_a_log(make_broker):
    async with running(make_broker()) as broker:
        assert await broker.replay("never", "0-0") == []
        async with broker.subscribe("gone", "1700000000000-0") as live:  # it expired
            assert (await take(live, 1))[0].type == "reset"


async def test_the_largest_id_replays_nothing(make_broker):
    async with running(make_broker()) as broker:
        await broker.publish("top", "token", {"i": 1})
        assert await broker.replay("top", f"{2**64 - 1}-{2**64 - 1}") == []


def test_a_malformed_entry_decodes_as_a_placeholder():
    good = ("1-0", {"type": "message", "data": '{"room":"r","text":"好","id":"9-9"}'})
    assert _decode(good).data == {"id": "1-0", "room": "r", "text": "好"}
    for fields in ({"type": "message", "data": "{"}, {"type": "message", "data": "[1]"},
                   {"type": "message", "data": '{"text":"no room"}'},
                   {"type": "bogus", "data": '{"room":"r"}'}, {"type": "message"},
                   {"type": "message", "data": '{"room":"r","t":"\\ud800"}'},
                   {"type": "message", "data": "[" * 100_000}):
        event = _decode(("2-0", fields))
        assert event.type == MALFORMED and event.id == "2-0"


@pytest.mark.redis
async def test_redis_skips_malformed_entries_live_and_in_replays(redis_server):
    import redis

    async with running(RedisBroker(redis_server.url)) as broker:
        before = await broker.publish("bad", "message", {"text": "一"})
        async with broker.subscribe("bad") as live:
            with redis.Redis.from_url(redis_server.url) as r:
                # Under the log entry's id, as the publish script writes (an id of its own
                # could be the next publish's and refuse it).
                bad_id = r.xadd("xiaox:{bad}:log", {"type": "message", "data": "{oops"})
                r.xadd("xiaox:{bad}:messages", {"type": "message", "data": "{oops"}, id=bad_id)
            after = await broker.publish("bad", "message", {"text": "二"})
            assert [e.id for e in await take(live, 1)] == [after.id]  # the reader went on
        assert [e.id for e in await broker.replay("bad", before.id)] == [after.id]
        messages, _ = await broker.history("bad", 10)
        assert [m.id for m in messages] == [before.id, after.id]


@pytest.mark.redis
async def test_redis_refusing_a_command_is_broker_unavailable(redis_server):
    import redis

    async with running(RedisBroker(redis_server.url)) as broker:
        with redis.Redis.from_url(redis_server.url) as r:
            r.set("xiaox:{typo}:log", "a string")
        for call in (lambda: broker.publish("typo", "message", {"text": "x"}),
                     lambda: broker.history("typo", 5), lambda: broker.replay("typo", "1-0"),
                     lambda: broker.last_id("typo")):
            with pytest.raises(BrokerUnavailable):
                await call()
        assert broker.healthy  # one bad key, not an outage


@pytest.mark.redis
async def test_every_publish_pushes_the_rooms_expiry_back(redis_server):
    import redis

    async with running(RedisBroker(redis_server.url)) as broker:
        broker.room_idle_seconds = 100
        await broker.publish("idle", "message", {"text": "x"})
        with redis.Redis.from_url(redis_server.url) as r:
            assert 90 < r.ttl("xiaox:{idle}:log") <= 100
            assert 90 < r.ttl("xiaox:{idle}:messages") <= 100
            broker.room_idle_seconds = 0  # never
            await broker.publish("kept", "token", {"i": 1})
            assert r.ttl("xiaox:{kept}:log") == -1


async def test_the_in_process_broker_forgets_idle_and_surplus_rooms():
    async with running(InProcessBroker(max_rooms=3)) as broker:
        async with broker.subscribe("watched"):
            await broker.publish("watched", "token", {"i": 0})
            for i in range(6):
                await broker.publish(f"r{i}", "message", {"text": str(i)})
            assert set(broker._logs) == {"watched", "r4", "r5"}  # listened to: kept
        assert (await broker.history("r0", 5))[0] == []
        broker.room_idle_seconds = 0.05
        await asyncio.sleep(0.1)
        await broker.publish("new", "token", {"i": 1})
        assert set(broker._logs) == {"new"}


async def test_a_publish_uid_is_claimed_once(make_broker):
    """The first claim of a uid starts the message's reply; every later one does not."""
    async with running(make_broker()) as broker:
        assert await broker.claim("claims", "u1") is True
        assert await broker.claim("claims", "u1") is False
        assert await broker.claim("claims", "u2") is True
        assert await broker.claim("other-room", "u1") is True
