"""StreamGate: caps per session and address, join and leave once per session and room."""

from __future__ import annotations

import asyncio

import pytest

from serve.web.leases import LocalLeases
from serve.web.presence import StreamGate, TooManyStreams, public_tag

pytestmark = pytest.mark.timeout(30)


def gate(**kw) -> tuple[StreamGate, list]:
    said: list = []

    async def announce(room: str, kind: str, data: dict) -> None:
        said.append((room, kind, data["user"]))

    options = {"per_session": 2, "per_ip": 3, "grace": 0.1, **kw}
    return StreamGate(LocalLeases(), announce, **options), said


def test_the_public_tag_is_short_stable_and_differs_per_session():
    assert public_tag("abc") == public_tag("abc") != public_tag("abd")
    assert len(public_tag("abc")) == 6 and "abc" not in public_tag("abc")


async def test_streams_are_capped_per_session_and_per_address():
    g, _ = gate()
    one = await g.open("s1", "1.1.1.1", "r", "ann")
    await g.open("s1", "1.1.1.1", "r", "ann")
    with pytest.raises(TooManyStreams, match="session"):
        await g.open("s1", "1.1.1.1", "r2", "ann")
    await g.open("s2", "1.1.1.1", "r", "bob")
    with pytest.raises(TooManyStreams, match="address"):
        await g.open("s3", "1.1.1.1", "r", "cat")
    assert g.open_streams == 3  # the refused ones hold nothing
    await g.close(one)
    await g.open("s3", "1.1.1.1", "r", "cat")
    await g.stop()


async def test_join_and_leave_once_per_session_and_room_across_reconnects():
    g, said = gate()
    tickets = [await g.open("s1", "1.1.1.1", "r", "ann") for _ in range(2)]
    assert [t.first for t in tickets] == [True, False]
    for _ in range(20):  # a reconnect storm: each closes and reopens at once
        await g.close(tickets.pop(0))
        tickets.append(await g.open("s1", "1.1.1.1", "r", "ann"))
        assert not tickets[-1].first
    await asyncio.sleep(0.3)
    assert said == []  # nothing to say: ann never left
    for t in tickets:
        await g.close(t)
    await asyncio.sleep(0.3)
    assert said == [("r", "leave", "ann")]
    await g.stop()
