"""Rooms under abuse (issue 16): limits that hold to sessions and addresses, streams
capped, presence said once, rooms that expire, strict inputs, replay before the 200,
retried sends stored once.

Two real ``python -m serve`` processes share a real redis-server. They believe
``X-Forwarded-For`` from 127.0.0.1 (``XIAOX_TRUSTED_PROXIES``), so each test speaks from
addresses of its own, as clients behind nginx would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time

import httpx
import pytest
import redis

from tests.conftest import RedisServer
from tests.reliability._support import log_key, parse_sse, stored_events
from tests.serve._helpers_server import ChatStream, ServerProcess, bot_reply_to, login, running

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

WINDOW = 30
ENV = {"XIAOX_TRUSTED_PROXIES": "127.0.0.1", "XIAOX_RATE_LIMIT_MESSAGES": "3",
       "XIAOX_RATE_LIMIT_IP_MESSAGES": "5", "XIAOX_RATE_LIMIT_WINDOW": str(WINDOW),
       "XIAOX_MAX_STREAMS_PER_SESSION": "3", "XIAOX_MAX_STREAMS_PER_IP": "5",
       "XIAOX_PRESENCE_GRACE_SECONDS": "2", "XIAOX_ROOM_IDLE_SECONDS": "600"}
MAX_ID = "18446744073709551615-18446744073709551615"
_addresses = (f"10.16.{i // 250}.{i % 250 + 1}" for i in itertools.count())


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory):
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    work = tmp_path_factory.mktemp("rooms")
    try:
        with running(*(ServerProcess(model_dir, work, redis_url=redis_server.url, env=ENV)
                       for _ in range(2))) as servers:
            yield servers, redis_server
    finally:
        redis_server.stop()


@contextlib.asynccontextmanager
async def session(server: ServerProcess, name: str, address: str | None = None):
    """A logged-in client speaking from ``address`` (a fresh one by default)."""
    headers = {"X-Forwarded-For": address or next(_addresses)}
    async with server.client(headers=headers) as c:
        await login(c, name)
        yield c


def on(other: ServerProcess, c: httpx.AsyncClient) -> httpx.AsyncClient:
    """The same session and address, talking to the other process."""
    return other.client(headers=dict(c.headers), cookies=c.cookies)


async def post(c: httpx.AsyncClient, room: str, text: str, **headers: str) -> httpx.Response:
    return await c.post("/send", params={"room": room}, json={"message": text},
                        headers=headers)


@contextlib.asynccontextmanager
async def stream_when_free(client: httpx.AsyncClient, room: str):
    """A /stream, retried while it is a 429: the server frees a closed stream's place when
    it notices the disconnect, a moment after the client's close."""
    deadline = time.monotonic() + 10
    while True:
        async with ChatStream(client, room=room) as stream:
            if stream.status != 429 or time.monotonic() > deadline:
                yield stream
                return
        await asyncio.sleep(0.1)


def assert_retry_after_is_the_window(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after  # integer seconds
    assert WINDOW - 5 <= int(retry_after) <= WINDOW, retry_after  # the window, not "5"


async def test_send_limits_hold_to_the_session_and_the_address_not_the_name(stack):
    (a, b), _ = stack
    address = next(_addresses)
    async with session(a, "alice", address) as first, session(a, "alice2", address) as second:
        async with on(b, first) as first_on_b:
            # The session's budget (3) is shared by both processes.
            for c in (first, first_on_b, first):
                assert (await post(c, "limits", "一")).status_code == 202
            assert_retry_after_is_the_window(await post(first_on_b, "limits", "二"))
        # A new session from the same address has its own session budget, but the address
        # has 2 left of its 5: fifty names would not make fifty budgets.
        assert (await post(second, "limits", "三")).status_code == 202
        assert (await post(second, "limits", "四")).status_code == 202
        assert_retry_after_is_the_window(await post(second, "limits", "五"))
    # Another "alice" elsewhere is not stopped by the first one's spent budget.
    async with session(b, "alice") as namesake:
        assert (await post(namesake, "limits", "六")).status_code == 202


async def test_two_sessions_sharing_a_name_are_told_apart(stack):
    (a, b), _ = stack
    async with session(a, "twin") as one, session(b, "twin") as other:
        sent = [(await post(c, "twins", f"我是{i}")).json() for i, c in enumerate((one, other))]
        you = [(await c.get("/history", params={"room": "twins"})).json()["you"]
               for c in (one, other)]
        history = (await one.get("/history", params={"room": "twins"})).json()["messages"]
    by_id = {m["id"]: m for m in history}
    tags = [by_id[s["id"]]["tag"] for s in sent]
    assert [by_id[s["id"]]["user"] for s in sent] == ["twin", "twin"]
    assert tags[0] != tags[1], "two sessions named alike look alike"
    assert [y["tag"] for y in you] == tags  # each page knows which are its own


async def test_streams_are_capped_per_session_and_per_address_across_processes(stack):
    (a, b), _ = stack
    address = next(_addresses)
    async with session(a, "streamer", address) as c, on(b, c) as c_on_b:
        async with contextlib.AsyncExitStack() as held:
            for client in (c, c_on_b, c):
                stream = await held.enter_async_context(ChatStream(client, room="caps"))
                assert stream.status == 200
            async with ChatStream(c_on_b, room="caps-other") as refused:
                assert refused.status == 429  # the 4th of one session, on either process
                assert refused.response_headers["retry-after"].isdigit()
            async with session(b, "neighbour", address) as n:
                async with ChatStream(n, room="caps") as s4, ChatStream(n, room="caps") as s5:
                    assert (s4.status, s5.status) == (200, 200)
                    async with ChatStream(n, room="caps") as s6:
                        assert s6.status == 429  # the 6th of one address
        # Closed streams free their places.
        async with stream_when_free(c_on_b, "caps") as again:
            assert again.status == 200


async def test_a_reconnect_storm_says_join_once_and_pushes_nothing_out(stack):
    (a, b), redis_server = stack
    room = "storm"
    async with session(a, "watcher") as w, session(a, "stormer") as s, on(b, s) as s_on_b:
        before = (await post(w, room, "风暴之前")).json()
        async with ChatStream(w, room=room) as watcher:
            await watcher.wait_for(bot_reply_to(before["id"]))
            for i in range(50):  # 50 opens and closes, on both processes
                async with stream_when_free(s if i % 2 else s_on_b, room) as one:
                    assert one.status == 200
            await asyncio.sleep(3.5)  # past the grace: the last leave is said now
            presence = [e for e in watcher.of_type("join", "leave")
                        if e["data"]["user"] == "stormer"]
            assert [e["event"] for e in presence] == ["join", "leave"], presence
        logged = [e for e in stored_events(redis_server.url, room)
                  if e["event"] in ("join", "leave") and e["data"]["user"] == "stormer"]
        assert len(logged) == 2, logged
        history = (await w.get("/history", params={"room": room, "limit": 2})).json()
        assert before["id"] in [m["id"] for m in history["messages"]]


async def test_idle_rooms_expire_every_key_has_a_ttl(stack):
    (a, _), redis_server = stack
    rooms = [f"idle-{i}" for i in range(12)]
    async with session(a, "wanderer") as c:
        for room in rooms:  # a stream into each (a join), and a message into a few
            async with ChatStream(c, room=room) as stream:
                assert stream.status == 200
        for room in rooms[:2]:
            assert (await post(c, room, "有人吗")).status_code == 202
    await asyncio.sleep(3.0)  # the leaves, past the grace
    with redis.Redis.from_url(redis_server.url) as r:
        # The server's keys (not those other tests here wrote by hand).
        keys = [k.decode() for k in r.scan_iter("xiaox:*")
                if b"{idle-" in k or b":sse:" in k or b":rate:" in k]
        assert log_key(rooms[0]) in keys
        no_ttl = [k for k in keys if r.pttl(k) == -1]
        assert not no_ttl, no_ttl
        assert 0 < r.ttl(log_key(rooms[5])) <= 600


async def test_query_parameters_and_event_ids_are_parsed_strictly(stack):
    (a, _), _ = stack
    async with session(a, "strict") as c:
        for limit in ("²", "٣", "１", "-1", "1e3", "9" * 30):
            response = await c.get("/history", params={"limit": limit})
            assert response.status_code == 400, (limit, response.status_code)
        assert (await c.get("/history", params={"room": "lobby\n"})).status_code == 400
        for bad in ("١-0", "0-١", "18446744073709551616-0", "0-18446744073709551616",
                    "1" * 21 + "-0", "1-0-0", "0x1-0"):
            for place in ("header", "query"):
                stream = ChatStream(c, room="strict", last_event_id=bad,
                                    via_header=place == "header")
                if place == "header":  # as the bytes a client sends (httpx wants ASCII)
                    stream.headers["Last-Event-ID"] = bad.encode()  # type: ignore[assignment]
                async with stream:
                    assert stream.status == 400, (bad, place, stream.status)
        # The largest id is a valid one: Redis refuses "(" of it, which must not abort
        # the stream after its 200 (nothing can follow it: a quiet, well-formed stream).
        async with ChatStream(c, room="strict", last_event_id=MAX_ID) as top:
            assert top.status == 200
            await asyncio.sleep(0.5)
            assert top.error is None


async def test_a_replay_from_before_the_trimmed_log_gets_a_reset(stack):
    (a, _), redis_server = stack
    room = "trimmed"
    with redis.Redis.from_url(redis_server.url) as r:
        data = json.dumps({"room": room, "role": "user", "user": "x", "text": "旧", "ts": 1})
        first = r.xadd(log_key(room), {"type": "message", "data": data}).decode()
        for _ in range(400):  # trimmed as the server trims: MAXLEN ~
            r.xadd(log_key(room), {"type": "message", "data": data}, maxlen=50)
        assert r.xrange(log_key(room), count=1)[0][0].decode() != first
    async with session(a, "late") as c, ChatStream(c, room=room, last_event_id=first) as s:
        assert s.status == 200
        await s.wait_for(lambda events: bool(events), 10)
        assert s.events[0]["event"] == "reset", s.events[:2]
        assert not [e for e in s.events if e["event"] == "message"]  # no replay with a gap


async def test_a_key_redis_refuses_is_a_clean_503_not_an_aborted_stream(stack):
    (a, _), redis_server = stack
    room = "wrongtype"
    with redis.Redis.from_url(redis_server.url) as r:
        r.set(log_key(room), "not a stream")
    async with session(a, "victim") as c:
        async with ChatStream(c, room=room) as s:
            assert s.status == 503 and s.response_headers["retry-after"].isdigit()
        assert (await c.get("/history", params={"room": room})).status_code == 503
        assert (await post(c, room, "你好")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200  # one room, not the server


async def test_a_malformed_log_entry_is_skipped_and_the_reader_goes_on(stack):
    (a, b), redis_server = stack
    room = "malformed"
    async with session(a, "reader") as c, on(b, c) as c_on_b:
        before = (await post(c, room, "坏之前")).json()
        async with ChatStream(c, room=room) as live, ChatStream(c_on_b, room=room) as live_b:
            with redis.Redis.from_url(redis_server.url) as r:
                for fields in ({"type": "message", "data": "{not json"},
                               {"type": "message", "data": '"a string"'},
                               {"type": "message", "data": '{"room": "malformed", "t": "\\ud800"}'},
                               {"data": "[]"}, {"type": "message"}):
                    r.xadd(log_key(room), fields)
            after = (await post(c_on_b, room, "坏之后")).json()
            for stream in (live, live_b):  # both processes' readers went on
                await stream.wait_for(bot_reply_to(after["id"]), 60)
        replayed = ChatStream(c, room=room, last_event_id=before["id"])
        async with replayed:
            await replayed.wait_for(bot_reply_to(after["id"]), 30)
        history = (await c.get("/history", params={"room": room})).json()["messages"]
        assert after["id"] in [m["id"] for m in history]
    log = a.log_path.read_text(errors="replace") + b.log_path.read_text(errors="replace")
    assert "malformed log entry" in log


async def test_a_retried_send_with_an_idempotency_key_is_stored_and_answered_once(stack):
    (a, b), redis_server = stack
    room = "retried"
    async with session(a, "retrier") as c, on(b, c) as c_on_b:
        key = {"Idempotency-Key": "send-7f3a"}
        first = await post(c, room, "只发一次", **key)
        again = await post(c_on_b, room, "只发一次", **key)  # the retry lands elsewhere
        assert first.status_code == again.status_code == 202
        assert first.json() == again.json()
        assert (await post(c, room, "x", **{"Idempotency-Key": "bad key!"})).status_code == 400
        async with session(b, "other") as other:  # a key is scoped to its session
            assert (await post(other, room, "只发一次", **key)).json()["id"] != first.json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            events = stored_events(redis_server.url, room)
            if any(e["data"].get("reply_to") == first.json()["id"] for e in events):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a second reply would be under way by now
    events = stored_events(redis_server.url, room)
    mine = [e for e in events if e["data"].get("text") == "只发一次"
            and e["data"].get("user") == "retrier"]
    replies = [e for e in events if e["event"] == "message"
               and e["data"].get("reply_to") == first.json()["id"]]
    typing = [e for e in events if e["event"] == "typing"
              and e["data"].get("reply_id") == first.json()["reply_id"]]
    assert len(mine) == 1 and len(replies) == 1 and len(typing) == 1, (mine, replies)


def test_parse_sse_knows_the_reset_event():
    raw = 'id: 5-0\nevent: reset\ndata: {"id":"5-0","room":"r"}\n\n'
    assert parse_sse(raw)[0]["event"] == "reset"
