"""Rooms spread over a 3-node Redis Cluster, served by two processes.

A cluster made with ``redis-cli --cluster create`` (tests/reliability/_topologies.py);
six rooms whose logs hash to slots on all three nodes; two ``python -m serve``
processes on the ``redis+cluster://`` URL, an SSE client of every room on each; messages
sent to every room through both. Every client must receive exactly its room's stored
events (so every message once), ``/history`` must be right on both processes, and every
key of a room must live in that room's one slot.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from redis.crc import key_slot

from tests.reliability._support import ReconnectingStream, log_key
from tests.reliability._topologies import Cluster
from tests.serve._helpers_server import ServerProcess, bot_reply_to, login, running, send

pytestmark = [pytest.mark.redis, pytest.mark.timeout(150)]

ENV = {"XIAOX_RATE_LIMIT_MESSAGES": "10000", "XIAOX_REPLY_MAX_TOKENS": "8"}


@pytest.fixture
def cluster(tmp_path):
    topology = Cluster(tmp_path / "redis")
    try:
        yield topology.start()
    finally:
        topology.stop()


def rooms_on_every_node(cluster: Cluster, per_node: int = 2) -> dict[str, int]:
    """Room names, ``per_node`` on each node: room -> the port of its node."""
    chosen: dict[str, int] = {}
    counts: dict[int, int] = defaultdict(int)
    for i in range(1000):
        room = f"room{i}"
        port = cluster.port_of_slot(key_slot(log_key(room).encode()))
        if counts[port] < per_node:
            counts[port] += 1
            chosen[room] = port
        if len(chosen) == per_node * len(cluster.nodes):
            break
    return chosen


def stored_ids(cluster: Cluster, room: str) -> list[str]:
    with cluster.client() as r:
        return [entry_id for entry_id, _ in r.xrange(log_key(room))]


async def test_six_rooms_on_three_nodes_two_processes_every_event_once(cluster, model_dir,
                                                                       tmp_path):
    rooms = rooms_on_every_node(cluster)
    assert len(rooms) == 6 and set(rooms.values()) == {n.port for n in cluster.nodes}
    servers = [ServerProcess(model_dir, tmp_path, redis_url=cluster.url, env=ENV)
               for _ in range(2)]
    with running(*servers):
        clients = [s.client() for s in servers]
        streams: dict[tuple[str, int], ReconnectingStream] = {}
        try:
            for client in clients:
                await login(client, "alice")
            for room in rooms:
                for i, (server, client) in enumerate(zip(servers, clients, strict=True)):
                    streams[room, i] = await ReconnectingStream(client.cookies, [server.url],
                                                                room).start()
            sent = await asyncio.gather(*(send(client, f"{room}里有人吗？{i}", room)
                                          for room in rooms
                                          for i, client in enumerate(clients)))
            for message in sent:
                for i in range(len(clients)):
                    await streams[message["room"], i].wait_for(bot_reply_to(message["id"]), 60)
            for (room, _), stream in streams.items():
                await check_stream(cluster, room, stream)
            for client in clients:
                for room in rooms:
                    await check_history(client, room, [m for m in sent if m["room"] == room])
        finally:
            for stream in streams.values():
                await stream.close()
            for client in clients:
                await client.aclose()
    check_keys_stay_in_their_room_slot(cluster, rooms)
    for server in servers:  # a CROSSSLOT script or command would be a 500 logged here
        assert "unhandled error" not in server.log_tail(200_000)


async def check_stream(cluster: Cluster, room: str, stream: ReconnectingStream) -> None:
    """The client got exactly the room's log from its first event on: no gap, no double."""
    stored = stored_ids(cluster, room)
    for _ in range(50):  # until the log's last event has arrived too (a join or leave)
        if stream.ids and stream.ids[-1] == stored[-1]:
            break
        await asyncio.sleep(0.1)
        stored = stored_ids(cluster, room)
    assert {e["data"]["room"] for e in stream.events} == {room}, "another room's event"
    assert stream.ids[0] in stored
    assert stream.ids == stored[stored.index(stream.ids[0]):], f"room {room}: gap or double"


async def check_history(client, room: str, sent: list[dict]) -> None:
    response = await client.get("/history", params={"room": room, "limit": 100})
    assert response.status_code == 200, response.text
    messages = response.json()["messages"]
    assert sorted(m["id"] for m in messages if m["role"] == "user") == sorted(
        m["id"] for m in sent)
    replies = sorted(m["reply_to"] for m in messages if m["role"] == "bot")
    assert replies == sorted(m["id"] for m in sent), "each message answered once"


def check_keys_stay_in_their_room_slot(cluster: Cluster, rooms: dict[str, int]) -> None:
    """Every key that names a room (log, history, publish uids, ...) is in its slot."""
    with cluster.client() as r:
        keys = list(r.scan_iter(match="xiaox:*", target_nodes=r.ALL_NODES))
    room_keys = [k for k in keys if "{" in k]
    assert {k.split("{", 1)[1].split("}")[0] for k in room_keys} >= set(rooms)
    for key in room_keys:
        room = key.split("{", 1)[1].split("}")[0]
        assert key_slot(key.encode()) == key_slot(log_key(room).encode()), key


def move_slot(cluster: Cluster, slot: int, to_port: int) -> None:
    """Reshard one slot by hand (IMPORTING, MIGRATING, MIGRATE, SETSLOT NODE everywhere)."""
    import redis

    from_port = cluster.port_of_slot(slot)
    nodes = {n.port: redis.Redis(port=n.port, decode_responses=True) for n in cluster.nodes}
    try:
        ids = {port: r.execute_command("CLUSTER", "MYID") for port, r in nodes.items()}
        nodes[to_port].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[from_port])
        nodes[from_port].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[to_port])
        keys = nodes[from_port].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            nodes[from_port].execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000,
                                             "KEYS", *keys)
        for r in nodes.values():
            r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[to_port])
    finally:
        for r in nodes.values():
            r.close()


async def test_a_room_whose_slot_moves_keeps_its_listeners_and_history(cluster, model_dir,
                                                                        tmp_path):
    room = "moving"
    slot = key_slot(log_key(room).encode())
    server = ServerProcess(model_dir, tmp_path, redis_url=cluster.url, env=ENV)
    with running(server):
        async with server.client() as client:
            await login(client, "mover")
            stream = await ReconnectingStream(client.cookies, [server.url], room).start()
            try:
                before = await send(client, "搬家前", room)
                await stream.wait_for(bot_reply_to(before["id"]), 60)
                old_port = cluster.port_of_slot(slot)
                new_port = next(n.port for n in cluster.nodes if n.port != old_port)
                move_slot(cluster, slot, new_port)  # the reader's next XREAD meets MOVED
                assert cluster.port_of_slot(slot) == new_port
                after = await send(client, "搬家后", room)
                await stream.wait_for(bot_reply_to(after["id"]), 60)
                await check_stream(cluster, room, stream)
                await check_history(client, room, [before, after])
            finally:
                await stream.close()
    assert "unhandled error" not in server.log_tail(200_000)
