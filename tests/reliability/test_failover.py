"""A Sentinel failover mid-chat: the primary ``kill -9``ed, nothing accepted is lost.

A primary, a replica and three sentinels (tests/reliability/_topologies.py); two
``python -m serve`` processes on the ``redis+sentinel://`` URL; SSE clients on both; a
sender posting continuously through both. The primary is SIGKILLed mid-chat. Then every
message ``/send`` answered 202 must be in ``/history`` once and have reached every SSE
client once, no request may have answered anything but 202 or 503 (with Retry-After),
and the longest run of 503s the sender met is printed (the README's figure).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.reliability._support import ReconnectingStream, wait_until
from tests.reliability._topologies import SentinelTrio
from tests.serve._helpers_server import ServerProcess, login, running

pytestmark = [pytest.mark.redis, pytest.mark.timeout(150)]

ENV = {"XIAOX_RATE_LIMIT_MESSAGES": "10000", "XIAOX_REPLY_MAX_TOKENS": "8"}
ROOM = "failover"


@dataclass
class Sender:
    """Posts numbered messages in turn to each server until ``stop``; on a 503 it waits
    as ``Retry-After`` would have it (shortened) and sends the same text again, with the
    same ``Idempotency-Key`` (as the browser chat does)."""

    clients: list[httpx.AsyncClient]
    name: str
    accepted: dict[str, str] = field(default_factory=dict)  # text -> id
    statuses: list[int] = field(default_factory=list)
    missing_retry_after: int = 0
    longest_503_window: float = 0.0  # first 503 to the next 202, seconds
    longest_send: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    key_prefix: str = field(default_factory=lambda: secrets.token_hex(6))

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            text = f"{self.name}的第{n}条消息"
            first_503 = None
            while True:
                client = self.clients[len(self.statuses) % len(self.clients)]
                started = time.monotonic()
                try:
                    response = await client.post(
                        "/send", params={"room": ROOM}, json={"message": text},
                        headers={"Idempotency-Key": f"{self.key_prefix}-{n:06d}"})
                except httpx.HTTPError:  # the app servers stay up: this would be a bug
                    self.statuses.append(-1)
                    continue
                self.longest_send = max(self.longest_send, time.monotonic() - started)
                self.statuses.append(response.status_code)
                if response.status_code == 202:
                    self.accepted[text] = response.json()["id"]
                    if first_503 is not None:
                        self.longest_503_window = max(self.longest_503_window,
                                                      time.monotonic() - first_503)
                    break
                if response.status_code != 503:
                    break  # counted as a failure by the test
                first_503 = first_503 or started
                self.missing_retry_after += "retry-after" not in response.headers
                await asyncio.sleep(0.2)
            n += 1
            await asyncio.sleep(0.15)


def user_messages(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["data"]["text"], e["id"]) for e in events
            if e["event"] == "message" and e["data"].get("role") == "user"]


@pytest.fixture
def trio(tmp_path):
    topology = SentinelTrio(tmp_path / "redis")
    try:
        yield topology.start()
    finally:
        topology.stop()


# The default: /send holds a message through the failover (about 2 s) and answers 202;
# with a shorter wait it answers 503 meanwhile, and the sender's retry goes through.
@pytest.mark.parametrize("send_wait", ["5", "0.5"], ids=["send-waits-5s", "send-waits-0.5s"])
async def test_primary_killed_mid_chat_loses_and_doubles_nothing(trio, model_dir, tmp_path,
                                                                 send_wait):
    env = {**ENV, "XIAOX_SEND_WAIT_SECONDS": send_wait}
    servers = [ServerProcess(model_dir, tmp_path, redis_url=trio.url, env=env)
               for _ in range(2)]
    with running(*servers):
        clients = [s.client() for s in servers]
        streams: list[ReconnectingStream] = []
        try:
            for client in clients:
                await login(client, "sender")
            for server, client in list(zip(servers, clients, strict=True)) * 2:
                streams.append(await ReconnectingStream(client.cookies, [server.url],
                                                        ROOM).start())
            # Two senders, each through both servers in turn: several messages are in
            # flight when the primary dies.
            senders = [Sender(clients, "甲"), Sender(clients[::-1], "乙")]
            sending = [asyncio.create_task(s.run()) for s in senders]
            await wait_until(lambda: accepted_count(senders) >= 8, 30)
            old_primary = trio.primary.port
            killed = time.monotonic()
            trio.primary.kill()  # SIGKILL: no shutdown, the replica's copy is all there is
            assert await wait_until(lambda: trio.primary_port() not in (None, old_primary),
                                    30), "the sentinels promoted no replica"
            promoted = time.monotonic() - killed
            before = accepted_count(senders)
            await wait_until(lambda: accepted_count(senders) >= before + 10, 30)
            for sender in senders:
                sender.stop.set()
            await asyncio.gather(*sending)
            await check_everything_arrived_once(senders, streams, clients)
            statuses = [status for s in senders for status in s.statuses]
            print(f"\nFAILOVER (send wait {send_wait} s): accepted {accepted_count(senders)} "
                  f"messages, lost 0, duplicated 0; replica promoted {promoted:.1f} s "
                  "after the kill; "
                  f"{statuses.count(503)} answers 503, longest 503 window "
                  f"{max(s.longest_503_window for s in senders):.1f} s, longest /send "
                  f"{max(s.longest_send for s in senders):.1f} s")
        finally:
            for stream in streams:
                await stream.close()
            for client in clients:
                await client.aclose()
    for server in servers:
        assert "unhandled error" not in server.log_tail(200_000)


def accepted_count(senders: list[Sender]) -> int:
    return sum(len(s.accepted) for s in senders)


async def check_everything_arrived_once(senders: list[Sender],
                                        streams: list[ReconnectingStream],
                                        clients: list[httpx.AsyncClient]) -> None:
    statuses = {status for s in senders for status in s.statuses}
    assert statuses <= {202, 503}, f"statuses other than 202/503: {statuses}"
    assert sum(s.missing_retry_after for s in senders) == 0, "a 503 without Retry-After"
    accepted = {item for s in senders for item in s.accepted.items()}
    for stream in streams:
        await stream.wait_for(lambda ev: accepted <= set(user_messages(ev)), 30)
    await asyncio.sleep(0.5)  # nothing more trickles in afterwards
    for stream in streams:
        got = user_messages(stream.events)
        texts = [text for text, _ in got]
        assert len(texts) == len(set(texts)), "a message reached an SSE client twice"
        assert len(stream.ids) == len(set(stream.ids)), "an event reached a client twice"
        assert accepted <= set(got), f"lost on a stream: {sorted(accepted - set(got))[:5]}"
    for client in clients:  # each process's view of the room, after the failover
        response = await client.get("/history", params={"room": ROOM, "limit": 1000})
        assert response.status_code == 200, response.text
        messages = response.json()["messages"]
        stored = [(m["text"], m["id"]) for m in messages if m["role"] == "user"]
        texts = [text for text, _ in stored]
        assert len(texts) == len(set(texts)), "a message is in the history twice"
        assert accepted <= set(stored), f"lost from history: {sorted(accepted - set(stored))[:5]}"
        replies = [m["reply_to"] for m in messages if m["role"] == "bot"]
        assert len(replies) == len(set(replies)), "a message was answered twice"


async def test_a_message_stored_before_its_503_is_answered_once_when_resent(trio, model_dir,
                                                                          tmp_path):
    """A write no replica acknowledged is stored on the primary yet answered 503; the
    client's resend (same Idempotency-Key) finds it stored. 小X must still answer it, and
    only once: the first attempt never got as far as starting a reply."""
    import os
    import signal

    env = {**ENV, "XIAOX_SEND_WAIT_SECONDS": "0.5", "XIAOX_REDIS_WAIT_MS": "100"}
    room, key = "resent", {"Idempotency-Key": "resend-0001"}
    with running(ServerProcess(model_dir, tmp_path, redis_url=trio.url, env=env)) as (app,):
        async with app.client() as c:
            await login(c, "resender")
            os.kill(trio.replica.proc.pid, signal.SIGSTOP)  # linked, acknowledging nothing
            try:
                refused = await c.post("/send", params={"room": room},
                                       json={"message": "你好呀"}, headers=key)
            finally:
                os.kill(trio.replica.proc.pid, signal.SIGCONT)
            assert refused.status_code == 503 and "retry-after" in refused.headers
            accepted = await c.post("/send", params={"room": room},
                                    json={"message": "你好呀"}, headers=key)
            assert accepted.status_code == 202, accepted.text
            again = await c.post("/send", params={"room": room},
                                 json={"message": "你好呀"}, headers=key)
            assert again.json()["id"] == accepted.json()["id"]
            message_id = accepted.json()["id"]

            async def replies() -> list[dict]:
                got = (await c.get("/history", params={"room": room})).json()["messages"]
                return [m for m in got if m.get("reply_to") == message_id]

            deadline = time.monotonic() + 60
            while not await replies() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # a second reply would be under way by now
            assert len(await replies()) == 1, "the resent message was not answered once"
