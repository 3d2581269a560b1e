"""Several ``python -m serve`` processes sharing one real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from serve.web.broker import parse_id
from tests.serve._helpers_server import (
    ChatStream,
    ServerProcess,
    bot_reply_to,
    login,
    running,
    send,
    wait_health,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]


@pytest.fixture
def two_servers(model_dir, redis_server, tmp_path):
    # One secret key file: a session cookie from one process is valid on the other.
    with running(*(ServerProcess(model_dir, tmp_path, redis_url=redis_server.url)
                   for _ in range(2))) as servers:
        yield servers


async def test_two_processes_see_each_others_messages(two_servers):
    a, b = two_servers
    async with a.client() as on_a, b.client() as on_b:
        await login(on_a, "amy")
        await login(on_b, "ben")
        async with ChatStream(on_a) as stream_a, ChatStream(on_b) as stream_b:
            from_b = await send(on_b, "我在B")
            from_a = await send(on_a, "我在A")
            for stream in (stream_a, stream_b):
                await stream.wait_for(bot_reply_to(from_b["id"]))
                await stream.wait_for(bot_reply_to(from_a["id"]))
        # Both processes saw the same events in the same order (their own joins aside).
        common = {e["id"] for e in stream_a.events} & {e["id"] for e in stream_b.events}
        order_a = [e["id"] for e in stream_a.events if e["id"] in common]
        order_b = [e["id"] for e in stream_b.events if e["id"] in common]
        assert order_a == order_b and from_a["id"] in common and from_b["id"] in common
        history_a = (await on_a.get("/history")).json()
        history_b = (await on_b.get("/history")).json()
        assert history_a["messages"] == history_b["messages"]
        texts = [m["text"] for m in history_a["messages"] if m["role"] == "user"]
        assert texts == ["我在B", "我在A"]
        # Cookies signed by one process are accepted by the other.
        on_b.cookies = on_a.cookies
        assert (await on_b.get("/me")).json() == {"user": "amy"}


async def test_replay_after_a_reconnect_to_another_process_is_complete_and_in_order(two_servers):
    a, b = two_servers
    async with a.client() as reader_a, b.client() as reader_b, b.client() as talker:
        await login(reader_a, "reader")
        reader_b.cookies = reader_a.cookies
        await login(talker, "talker")
        async with ChatStream(talker) as witness:
            async with ChatStream(reader_a) as before:
                first = await send(talker, "第一句")
                await before.wait_for(bot_reply_to(first["id"]))
            last_seen = before.events[-1]["id"]
            later = [await send(talker, f"第{n}句") for n in "二三四"]
            for message in later:
                await witness.wait_for(bot_reply_to(message["id"]))
            end = next(e["id"] for e in witness.events
                       if e["data"].get("reply_to") == later[-1]["id"])
            async with ChatStream(reader_b, last_event_id=last_seen) as after:
                await after.wait_for(bot_reply_to(later[-1]["id"]))
        window = (parse_id(last_seen), parse_id(end))
        missed = [e["id"] for e in witness.events if window[0] < parse_id(e["id"]) <= window[1]]
        replayed = [e["id"] for e in after.events if parse_id(e["id"]) <= window[1]]
        assert replayed == missed
        assert [e["data"]["text"] for e in after.events
                if e["event"] == "message" and e["data"]["role"] == "user"] == ["第二句", "第三句",
                                                                                  "第四句"]


async def test_redis_down_then_back_loses_no_stored_message(two_servers, redis_server):
    a, b = two_servers
    async with a.client() as on_a, b.client() as on_b:
        await login(on_a, "survivor")
        await login(on_b, "restarter")
        before = await send(on_b, "重启之前")
        async with ChatStream(on_a) as stream:
            await stream.wait_for(bot_reply_to(before["id"]))
            redis_server.stop()
            health = await wait_health(a, 503)
            assert any("redis" in p for p in health["problems"])
            refused = await on_b.post("/send", json={"message": "没有Redis"})
            assert refused.status_code == 503 and refused.json()["reason"] == "broker_unavailable"
            redis_server.start()
            await wait_health(a, 200)
            await wait_health(b, 200)
            after = await send(on_b, "重启之后")
            # The stream opened before the outage carries on.
            await stream.wait_for(bot_reply_to(after["id"]))
        history = (await on_a.get("/history")).json()["messages"]
        assert [m["text"] for m in history if m["role"] == "user"] == ["重启之前", "重启之后"]
        assert sum(1 for m in history if m["role"] == "bot") == 2


async def test_sigterm_drains_the_reply_in_flight(two_servers):
    a, b = two_servers
    async with a.client() as on_a, b.client() as on_b:
        await login(on_a, "last words")
        await login(on_b, "witness")
        async with ChatStream(on_b) as stream:
            async with ChatStream(on_a) as doomed:
                sent = await send(on_a, "再见")
                code = await asyncio.to_thread(a.terminate, 30)
                # uvicorn re-raises the SIGTERM after its graceful shutdown
                assert code in (0, -15), a.log_tail()
                assert "Traceback" not in a.log_tail() and "ERROR" not in a.log_tail()
                # sse-starlette ended the open stream instead of hanging the shutdown.
                await asyncio.wait_for(doomed._task, 5)
            await stream.wait_for(bot_reply_to(sent["id"]))
        history = (await on_b.get("/history")).json()["messages"]
        assert any(m.get("reply_to") == sent["id"] for m in history)


def test_workers_share_rooms_through_redis(model_dir, redis_server, tmp_path):
    server = ServerProcess(model_dir, tmp_path, redis_url=redis_server.url,
                           env={"XIAOX_WORKERS": "2"}).start()

    async def scenario():
        async with server.client() as c, server.client() as d:
            await login(c, "w1")
            await login(d, "w2")
            async with ChatStream(c) as stream:
                sent = [await send(d, f"多进程{i}") for i in range(4)]  # spread over workers
                for message in sent:
                    await stream.wait_for(bot_reply_to(message["id"]))

    try:
        asyncio.run(scenario())
    finally:
        assert server.terminate() in (0, -15), server.log_tail()


def test_workers_without_redis_are_refused(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path, env={"XIAOX_WORKERS": "2"}).launch()
    assert server.proc.wait(30) == 2
    assert "--redis-url" in server.log_tail()
