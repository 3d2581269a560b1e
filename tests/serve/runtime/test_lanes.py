"""serve.runtime.lanes: which waiting requests join the batch, lane by lane."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from serve.runtime.lanes import Lane, LaneQueues

_clock = itertools.count()


@dataclass(eq=False)
class Req:
    lane: str
    submitted: float = field(default_factory=lambda: next(_clock))


def queues(chat_rows: int = 4, api_rows: int = 4, queue: int = 100) -> LaneQueues:
    return LaneQueues({"chat": Lane(rows=chat_rows, queue=queue),
                       "api": Lane(rows=api_rows, queue=queue)})


def fill(q: LaneQueues, lane: str, n: int) -> list[Req]:
    made = [Req(lane) for _ in range(n)]
    for r in made:
        q.append(r)
    return made


def lanes_of(requests) -> list[str]:
    return [r.lane for r in requests]


def test_a_flood_in_one_lane_leaves_the_other_its_reserve():
    q = queues()
    fill(q, "api", 20)
    first = q.admit([], free=8)
    # its own 4 rows, then 2 of chat's 4 lent: chat's reserve (half, 2) stays free
    assert lanes_of(first) == ["api"] * 6
    fill(q, "chat", 3)
    second = q.admit(first, free=2)
    assert lanes_of(second) == ["chat", "chat"]  # at once, ahead of 14 older api ones


def test_a_lane_under_its_share_comes_first_then_the_oldest():
    q = queues()
    api = fill(q, "api", 6)
    chat = fill(q, "chat", 6)
    chosen = q.admit([], free=8)
    assert sorted(lanes_of(chosen)) == ["api"] * 4 + ["chat"] * 4
    more = q.admit(chosen, free=2)
    assert more == [api[4], api[5]]  # beyond the shares: the oldest
    assert q.admit(chosen + more, free=2) == [chat[4], chat[5]]
    assert len(q) == 0 and q.admit([], free=4) == []


def test_lent_rows_never_eat_a_reserve_even_when_the_batch_is_small():
    q = queues(chat_rows=1, api_rows=1)  # reserve 1 each: nothing to lend
    fill(q, "api", 5)
    assert lanes_of(q.admit([], free=2)) == ["api"]


def test_queue_caps_are_per_lane():
    q = queues(queue=2)
    fill(q, "api", 2)
    assert q.full("api") and not q.full("chat")
    q.hold("chat")  # a request being prepared holds its place
    q.hold("chat")
    assert q.full("chat")
    q.release("chat")
    assert not q.full("chat")
    assert q.sizes() == {"chat": 1, "api": 2}


def test_a_cancelled_request_leaves_its_queue():
    q = queues()
    a, b = fill(q, "chat", 2)
    q.remove(a)
    q.remove(a)  # twice: nothing
    assert q.admit([], free=4) == [b]


def test_names_and_bounds():
    q = queues()
    assert q.name(None) == "chat" and q.name("api") == "api"
    with pytest.raises(ValueError, match="unknown lane 'web'; known: chat, api"):
        q.name("web")
    with pytest.raises(ValueError, match="rows and queue must be >= 1"):
        LaneQueues({"chat": Lane(rows=0, queue=1)})
    with pytest.raises(ValueError, match="at least one lane"):
        LaneQueues({})
