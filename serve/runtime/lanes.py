"""Lanes: the engine's waiting requests kept apart by who sent them, each lane with a
queue cap of its own and a guaranteed share of the decoder batch's rows.

A server gives the chat room and its API a lane each, so that neither can starve the
other: a flood of API requests fills the API's queue (then 429), not the room's, and
never holds more than the API's rows while room replies wait.

Half of each lane's share (rounded up) is its reserve, never lent: a lane's newcomer
finds a free row at once unless the lane itself keeps its reserve busy. The other half
is lent while idle: a lane may take more rows than its share, oldest request first, as
long as every other lane's unused reserve stays free. Lending is not preemptive (a row,
once decoding, runs to its end), so a lent row comes back when its request ends: within
that request's ``max_length`` steps. Among the waiting, a lane under its share is served
first.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

DEFAULT_LANE = "default"


@dataclass(frozen=True)
class Lane:
    """One lane's bounds: ``rows`` of the batch guaranteed, ``queue`` requests waiting
    at most (requests being prepared and beam searches waiting included)."""

    rows: int
    queue: int


class Queued(Protocol):
    lane: str
    submitted: float


class LaneQueues:
    """The waiting requests of every lane, and which of them join the batch next."""

    def reserve(self, lane: str) -> int:
        """Rows of the lane's share never lent: half of it, rounded up."""
        return (self.lanes[lane].rows + 1) // 2

    def __init__(self, lanes: Mapping[str, Lane]):
        if not lanes:
            raise ValueError("at least one lane is needed")
        for name, lane in lanes.items():
            if lane.rows < 1 or lane.queue < 1:
                raise ValueError(f"lane {name!r}: rows and queue must be >= 1, got {lane}")
        self.lanes = dict(lanes)
        self.default = next(iter(self.lanes))
        self._waiting: dict[str, deque] = {name: deque() for name in self.lanes}
        self._held: Counter[str] = Counter()  # counted, not yet queued: prepared, beams

    def name(self, lane: str | None) -> str:
        """The lane a submission goes to (None: the first); ValueError when unknown."""
        if lane is None:
            return self.default
        if lane not in self.lanes:
            raise ValueError(f"unknown lane {lane!r}; known: {', '.join(self.lanes)}")
        return lane

    def full(self, lane: str) -> bool:
        return len(self._waiting[lane]) + self._held[lane] >= self.lanes[lane].queue

    def hold(self, lane: str) -> None:
        self._held[lane] += 1

    def release(self, lane: str) -> None:
        self._held[lane] -= 1

    def append(self, request: Queued) -> None:
        self._waiting[request.lane].append(request)

    def remove(self, request: Queued) -> None:
        queue = self._waiting.get(request.lane)
        if queue is not None and request in queue:
            queue.remove(request)

    def __len__(self) -> int:
        return sum(map(len, self._waiting.values()))

    def __iter__(self) -> Iterator:
        for queue in self._waiting.values():
            yield from queue

    def sizes(self) -> dict[str, int]:
        """Each lane's waiting requests (prepared and beams included)."""
        return {name: len(q) + self._held[name] for name, q in self._waiting.items()}

    def clear(self) -> None:
        for queue in self._waiting.values():
            queue.clear()

    def admit(self, active: Sequence[Queued], free: int) -> list:
        """Up to ``free`` waiting requests to join a batch whose rows are ``active``:
        first every lane up to its share (in turn, one each), then idle rows lent, the
        oldest request first, while the other lanes' unused reserves stay free."""
        if free <= 0 or not any(self._waiting.values()):  # (most steps of a full batch)
            return []
        count = Counter(r.lane for r in active)
        chosen: list = []
        progress = True
        while free > 0 and progress:
            progress = False
            for name, lane in self.lanes.items():
                queue = self._waiting[name]
                if free > 0 and queue and count[name] < lane.rows:
                    chosen.append(queue.popleft())
                    count[name] += 1
                    free -= 1
                    progress = True
        unused = {name: max(0, self.reserve(name) - count[name]) for name in self.lanes}
        while free > 0:  # idle rows lent, oldest request first
            heads = [(q[0].submitted, name) for name, q in self._waiting.items()
                     if q and free > sum(unused.values()) - unused[name]]
            if not heads:
                break
            name = min(heads)[1]
            chosen.append(self._waiting[name].popleft())
            unused[name] = max(0, unused[name] - 1)
            free -= 1
        return chosen
