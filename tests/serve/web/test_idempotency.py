"""``Idempotency-Key`` on ``/send``: a resent message is stored and answered once."""

from __future__ import annotations

import asyncio

import pytest

from serve.web.idempotency import send_uid
from serve.web.security.text import InvalidInput
from tests.serve._helpers_server import ServerProcess, login, running


def test_a_key_is_scoped_to_its_user_and_room():
    uid = send_uid("a1b2c3d4e5f60718", "amy", "lobby")
    assert uid == send_uid("a1b2c3d4e5f60718", "amy", "lobby")
    assert uid != send_uid("a1b2c3d4e5f60718", "ben", "lobby")
    assert uid != send_uid("a1b2c3d4e5f60718", "amy", "other")
    assert send_uid(None, "amy", "lobby") is None


@pytest.mark.parametrize("key", ["", "short", "x" * 65, "has space", "中文中文中文中文",
                                 "a\nbcdefghi", "../../etc/pa"])
def test_a_malformed_key_is_refused(key):
    with pytest.raises(InvalidInput):
        send_uid(key, "amy", "lobby")


@pytest.mark.parametrize("broker", ["in-process", "redis"])
async def test_a_resend_with_the_same_key_is_stored_and_answered_once(broker, model_dir,
                                                                      tmp_path, request):
    url = request.getfixturevalue("redis_server").url if broker == "redis" else None
    with running(ServerProcess(model_dir, tmp_path, redis_url=url)) as (server,):
        async with server.client() as client:
            await login(client, "amy")
            headers = {"Idempotency-Key": "resend-0001"}
            first = await client.post("/send", params={"room": "r"}, headers=headers,
                                      json={"message": "你好"})
            again = await client.post("/send", params={"room": "r"}, headers=headers,
                                      json={"message": "你好"})
            other = await client.post("/send", params={"room": "r"},
                                      headers={"Idempotency-Key": "resend-0002"},
                                      json={"message": "你好"})
            bad = await client.post("/send", params={"room": "r"},
                                    headers={"Idempotency-Key": "no"}, json={"message": "x"})
            assert [r.status_code for r in (first, again, other, bad)] == [202, 202, 202, 400]
            assert again.json() == {"id": first.json()["id"], "room": "r", "reply_id": None,
                                    "duplicate": True}
            assert other.json()["id"] != first.json()["id"]
            for _ in range(100):  # both replies finished
                messages = (await client.get("/history", params={"room": "r"})).json()[
                    "messages"]
                if sum(m["role"] == "bot" for m in messages) >= 2:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            messages = (await client.get("/history", params={"room": "r"})).json()["messages"]
            assert [m["id"] for m in messages if m["role"] == "user"] == [
                first.json()["id"], other.json()["id"]]
            assert sorted(m["reply_to"] for m in messages if m["role"] == "bot") == sorted(
                [first.json()["id"], other.json()["id"]])


async def test_a_message_stored_before_its_503_is_answered_on_its_resend(model_dir, tmp_path,
                                                                         redis_server):
    from serve.web.broker import RedisBroker

    # The first attempt's write reached Redis, its answer was a 503: no reply was started.
    uid = send_uid("stored-then-503", "amy", "r")
    broker = RedisBroker(redis_server.url)
    await broker.start()
    try:
        stored = await broker.publish("r", "message", {"role": "user", "user": "amy",
                                                       "text": "在吗"}, uid=uid)
        assert await broker.published_id("r", uid) == stored.id
    finally:
        await broker.close()
    with running(ServerProcess(model_dir, tmp_path, redis_url=redis_server.url)) as (server,):
        async with server.client() as client:
            await login(client, "amy")
            resends = [await client.post("/send", params={"room": "r"}, json={"message": "在吗"},
                                         headers={"Idempotency-Key": "stored-then-503"})
                       for _ in range(2)]
            assert [r.json()["id"] for r in resends] == [stored.id, stored.id]
            assert resends[0].json()["reply_id"] is not None  # the first resend answers it
            assert resends[1].json()["reply_id"] is None  # and only the first
            for _ in range(100):
                messages = (await client.get("/history", params={"room": "r"})).json()[
                    "messages"]
                if any(m["role"] == "bot" for m in messages):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            messages = (await client.get("/history", params={"room": "r"})).json()["messages"]
            assert [m["id"] for m in messages if m["role"] == "user"] == [stored.id]
            assert [m["reply_to"] for m in messages if m["role"] == "bot"] == [stored.id]
