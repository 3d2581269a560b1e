"""Live reads in a Redis Cluster: one ``XREAD BLOCK`` per hash slot with watched rooms.

A cluster refuses a command whose keys lie in different slots (CROSSSLOT), even on one
node, so the single reader of one Redis becomes one task per slot that this process
watches rooms in, each blocking on its node for the rooms of its slot. A slot moved to
another node (resharding, failover) answers MOVED: redis-py refreshes its slot map and
the task's next read goes to the new owner, from the same cursors.

The cost is one connection per watched slot and process (a room is one slot: rooms
spread over slots as their names hash), held only while the slot has listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any


class SlotReaders:
    """Runs until cancelled; ``deliver`` gets each XREAD response, ``mark`` the health."""

    def __init__(self, client: Any, cursors: dict[str, str], key_of: Callable[[str], str],
                 deliver: Callable[[Any], None], mark: Callable[..., None],
                 changed: asyncio.Event, *, block_ms: int, page: int):
        self.client, self.cursors, self.key_of = client, cursors, key_of
        self.deliver, self.mark, self.changed = deliver, mark, changed
        self.block_ms, self.page = block_ms, page
        self._slots: dict[str, int] = {}  # room -> its log's hash slot (never changes)
        self._tasks: dict[int, asyncio.Task] = {}

    def slot_of(self, room: str) -> int:
        slot = self._slots.get(room)
        if slot is None:
            slot = self._slots[room] = self.client.keyslot(self.key_of(room))
        return slot

    def rooms_of(self, slot: int) -> list[str]:
        return [room for room in tuple(self.cursors) if self.slot_of(room) == slot]

    async def run(self) -> None:
        try:
            while True:
                for room in [r for r in self._slots if r not in self.cursors]:
                    del self._slots[room]
                for slot in {self.slot_of(room) for room in tuple(self.cursors)}:
                    task = self._tasks.get(slot)
                    if task is None or task.done():
                        self._tasks[slot] = asyncio.create_task(
                            self._read_slot(slot), name=f"xiaox-redis-slot-{slot}")
                if not self.cursors:
                    await self._ping()
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 1.0)
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _ping(self) -> None:
        # Nobody listens here: keep the health signal fresh.
        try:
            await self.client.ping()
            self.mark(True)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.mark(False, f"{type(e).__name__}: {e}"[:200])

    async def _read_slot(self, slot: int) -> None:
        delay = 0.1
        while True:
            rooms = self.rooms_of(slot)
            if not rooms:
                return  # run() starts a new task if a room of this slot is watched again
            streams = {self.key_of(room): self.cursors[room] for room in rooms}
            try:
                response = await self.client.xread(streams, count=self.page,
                                                   block=self.block_ms)
                self.mark(True)
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.mark(False, f"{type(e).__name__}: {e}"[:200])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.deliver(response)
