"""Chat events: a durable per-room log plus live fan-out to this process's listeners.

Every event gets its id from the room's log (``<ms>-<seq>``, increasing per room), and
that id is the SSE ``id:``. A listener subscribes first, then reads what it missed from
the log, then de-duplicates the live events by id, so nothing published in between is
lost or shown twice.

``InProcessBroker`` serves one process. ``RedisBroker`` keeps the log in a bounded Redis
Stream per room (``XADD MAXLEN ~N``) and a second stream of ``message`` events only (same
ids) for ``/history``. Live delivery is ONE ``XREAD BLOCK`` reader per process over the
rooms that have local listeners, fanned out to asyncio queues: a reader that lost Redis
resumes from its last id, so a Redis restart or a network cut loses no stored event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("xiaox.broker")

STORED_IN_HISTORY = "message"
ZERO_ID = "0-0"
EVENT_TYPES = frozenset({"message", "typing", "token", "join", "leave"})
RESET = "reset"  # sent first to a client whose Last-Event-ID predates the trimmed log
MALFORMED = "malformed"  # a log entry that cannot be read: skipped, never sent
_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # ASCII digits only, as Redis writes them
_ID_PART_MAX = 2**64 - 1


class BrokerUnavailable(Exception):
    """The event log cannot be reached (Redis down beyond the retry deadline)."""


class ReplayGap(Exception):
    """Events after the requested id were trimmed (or the room expired): reload."""


def parse_id(event_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a sortable pair, each part within 2^64-1; ValueError otherwise."""
    match = _ID.fullmatch(event_id) if isinstance(event_id, str) else None
    if match is None or max(int(match[1]), int(match[2])) > _ID_PART_MAX:
        raise ValueError(f"not an event id: {str(event_id)[:50]!r}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class Event:
    id: str
    type: str  # message, typing, token, join, leave (reset: made for one client)
    data: dict[str, Any]  # includes id, room and ts
    duplicate: bool = field(default=False, compare=False)  # a retried publish's first id

    @property
    def key(self) -> tuple[int, int]:
        return parse_id(self.id)

    def sse(self) -> dict[str, str]:
        """The keyword arguments of an SSE event (sse-starlette's dict form)."""
        return {"id": self.id, "event": self.type,
                "data": json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))}


def _make_event(event_id: str, event_type: str, payload: dict[str, Any]) -> Event:
    return Event(event_id, event_type, {"id": event_id, **payload})


@dataclass(eq=False)
class _Listener:
    room: str
    max_pending: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: bool = False

    def offer(self, event: Event | None) -> None:
        if self.ended:
            return
        if event is None or self.queue.qsize() >= self.max_pending:
            # A listener too slow to keep up is ended; its client reconnects with
            # Last-Event-ID and replays from the log instead of growing our memory.
            self.ended = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(event)


class Broker:
    """The shared part: local listeners and the subscribe-replay-dedupe iteration."""

    max_pending = 2_000
    # A room's log and history expire after this long without a publish (Redis EXPIRE,
    # refreshed by every publish; in-process eviction); 0: never.
    room_idle_seconds: float = 7 * 24 * 3600.0

    def __init__(self) -> None:
        self._listeners: dict[str, set[_Listener]] = {}
        self.closed = False

    # The log, implemented by subclasses.
    async def start(self) -> None: ...

    async def close(self) -> None:
        self.closed = True
        self.end_listeners()

    def end_listeners(self) -> None:
        """End every local subscription (their clients reconnect with Last-Event-ID)."""
        for listeners in self._listeners.values():
            for listener in listeners:
                listener.offer(None)

    @property
    def healthy(self) -> bool:
        return not self.closed

    @property
    def problem(self) -> str | None:
        """Why the broker is unhealthy, or None."""
        return None if self.healthy else "broker closed"

    async def publish(self, room: str, event_type: str, data: dict[str, Any], *,
                      timeout: float | None = 5.0, uid: str | None = None) -> Event:
        """Append an event to the room's log. A message with the ``uid`` of an earlier
        publish (a retry) is not stored again: the first event's id, ``duplicate`` set."""
        raise NotImplementedError

    async def claim(self, room: str, uid: str) -> bool:
        """True for the first caller only, per room and publish ``uid`` (within the hour
        the uid is remembered): the message's reply is started once, by the first attempt
        or, when that one stored the message but answered 503, by the first retry."""
        raise NotImplementedError

    async def last_id(self, room: str) -> str:
        raise NotImplementedError

    async def history(self, room: str, limit: int) -> tuple[list[Event], str]:
        """The last ``limit`` message events (oldest first) and the log's last id."""
        raise NotImplementedError

    async def replay(self, room: str, after_id: str) -> list[Event]:
        """Every logged event after ``after_id``, in order."""
        raise NotImplementedError

    async def _watch(self, room: str) -> None:
        """Make sure live delivery covers ``room`` from now on (before the log is read)."""

    def _unwatch(self, room: str) -> None:
        """Stop live delivery for a room without local listeners."""

    def _fan_out(self, event: Event) -> None:
        if event.type == MALFORMED:
            return
        for listener in tuple(self._listeners.get(event.data["room"], ())):
            listener.offer(event)

    @contextlib.asynccontextmanager
    async def subscribe(self, room: str, last_id: str | None = None
                        ) -> AsyncIterator[AsyncIterator[Event]]:
        """Live events of ``room``; with ``last_id``, first every event after it."""
        if last_id is not None:
            parse_id(last_id)
        listener = _Listener(room, self.max_pending)
        if self.closed:
            listener.offer(None)
        self._listeners.setdefault(room, set()).add(listener)
        try:
            await self._watch(room)
            # Registered before reading the log: whatever is published from now on is
            # either in what we read next or arrives in the queue (or both: de-dup by id).
            backlog: list[Event] = []
            if last_id is not None:
                try:
                    backlog = await self.replay(room, last_id)
                except ReplayGap:
                    last_id = await self.last_id(room)
                    backlog = [_make_event(last_id, RESET, {"room": room})]
            else:
                last_id = await self.last_id(room)
            yield self._iterate(listener, backlog, parse_id(last_id))
        finally:
            listeners = self._listeners.get(room)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[room]
                    self._unwatch(room)

    async def _iterate(self, listener: _Listener, backlog: list[Event],
                       cursor: tuple[int, int]) -> AsyncIterator[Event]:
        for event in backlog:
            if event.key > cursor or event.type == RESET:
                cursor = event.key
                yield event
        while True:
            event = await listener.queue.get()
            if event is None:
                return
            if event.key > cursor:
                cursor = event.key
                yield event


class InProcessBroker(Broker):
    """Rooms in this process's memory: the default for a single server process."""

    uid_seconds = 3600.0  # how long a publish's uid is remembered (as in Redis)

    def __init__(self, *, log_max_events: int = 10_000, history_max_messages: int = 1_000,
                 max_rooms: int = 10_000):
        super().__init__()
        self._logs: dict[str, deque[Event]] = {}
        self._messages: dict[str, deque[Event]] = {}
        self._trimmed: dict[str, tuple[int, int]] = {}  # room -> newest event dropped
        self._active: OrderedDict[str, float] = OrderedDict()  # room -> last publish
        self._uids: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._claims: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._log_max = log_max_events
        self._history_max = history_max_messages
        self.max_rooms = max_rooms
        self._last = (0, 0)

    def _next_id(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, last_seq = self._last
        self._last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self._last[0]}-{self._last[1]}"

    async def publish(self, room: str, event_type: str, data: dict[str, Any], *,
                      timeout: float | None = 5.0, uid: str | None = None) -> Event:
        if self.closed:
            raise BrokerUnavailable("the broker is closed")
        payload = {**data, "room": room, "ts": data.get("ts", time.time())}
        now = time.monotonic()
        if uid is not None and event_type == STORED_IN_HISTORY:
            seen = self._uids.get((room, uid))
            if seen is not None and seen[1] > now:
                return Event(seen[0], event_type, {"id": seen[0], **payload}, duplicate=True)
        event = _make_event(self._next_id(), event_type, payload)
        self._evict(now, keep=room)
        room_log = self._logs.setdefault(room, deque(maxlen=self._log_max))
        if len(room_log) == room_log.maxlen:
            self._trimmed[room] = room_log[0].key
        room_log.append(event)
        if event_type == STORED_IN_HISTORY:
            self._messages.setdefault(room, deque(maxlen=self._history_max)).append(event)
            if uid is not None:
                self._uids[(room, uid)] = (event.id, now + self.uid_seconds)
                while len(self._uids) > 10 * self._history_max or (
                        self._uids and next(iter(self._uids.values()))[1] <= now):
                    self._uids.popitem(last=False)  # bounded: oldest first
        self._fan_out(event)
        return event

    async def claim(self, room: str, uid: str) -> bool:
        if (room, uid) in self._claims:
            return False
        self._claims[(room, uid)] = None
        while len(self._claims) > 10 * self._history_max:  # bounded like the uids
            self._claims.popitem(last=False)
        return True

    def _evict(self, now: float, keep: str) -> None:
        """Forget rooms idle past ``room_idle_seconds``, and the least recently used past
        ``max_rooms``; a room with local listeners stays."""
        self._active[keep] = now
        self._active.move_to_end(keep)
        idle = self.room_idle_seconds
        for room, last in list(self._active.items()):
            crowded = len(self._active) > self.max_rooms
            if room == keep or not (crowded or (idle > 0 and now - last > idle)):
                break
            if room in self._listeners:
                self._active.move_to_end(room)
                continue
            del self._active[room]
            for store in (self._logs, self._messages, self._trimmed):
                store.pop(room, None)

    async def last_id(self, room: str) -> str:
        room_log = self._logs.get(room)
        return room_log[-1].id if room_log else ZERO_ID

    async def history(self, room: str, limit: int) -> tuple[list[Event], str]:
        messages = list(self._messages.get(room, ()))
        return messages[-limit:] if limit > 0 else [], await self.last_id(room)

    async def replay(self, room: str, after_id: str) -> list[Event]:
        after = parse_id(after_id)
        room_log = self._logs.get(room)
        if room_log is None:
            if after != (0, 0):
                raise ReplayGap(room)  # evicted (or never seen here): what it had is gone
            return []
        if after < self._trimmed.get(room, (0, 0)):
            raise ReplayGap(room)
        return [e for e in room_log if e.key > after]


# Atomic publish: append to the room's log, copy a message into the history stream
# under the same id, and remember the publish's uid so a retried publish (the reply
# was lost, not the write; or a client's Idempotency-Key) returns the first id instead
# of writing twice. Every publish pushes the room's expiry back (ARGV[8] ms, 0: none):
# an idle room's keys go. All keys carry the {room} tag: one slot.
_PUBLISH_SCRIPT = """
if ARGV[7] == '1' then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {seen, 1} end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',
                      'type', ARGV[1], 'data', ARGV[2])
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], id, 'type', ARGV[1], 'data', ARGV[2])
end
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], id, 'EX', ARGV[6])
end
if ARGV[8] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
end
return {id, 0}
"""


# A fixed-window counter shared by every process: the window starts with the first hit.
_RATE_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""


class RedisBroker(Broker):
    """Rooms in Redis, shared by every process and host that uses the same Redis."""

    block_ms = 300  # XREAD BLOCK: well under socket_timeout; also the wait for a new room
    page = 1_000

    def __init__(self, url: str, *, prefix: str = "xiaox", log_max_events: int = 10_000,
                 history_max_messages: int = 1_000, wait_replicas: int = -1,
                 wait_ms: int = 500):
        super().__init__()
        from serve.web.redis_clients import connect
        from serve.web.redis_replication import Replication
        from serve.web.redis_url import SENTINEL, parse_redis_url

        self.url = url
        self.target = parse_redis_url(url)  # one Redis, a Sentinel service or a Cluster
        self._clients = connect(self.target)
        self._redis, self._reader_redis = self._clients.commands, self._clients.delivery
        # -1: wait for one replica under Sentinel (the one it would promote), else none.
        if wait_replicas < 0:
            wait_replicas = 1 if self.target.kind == SENTINEL else 0
        self._replication = Replication(wait_replicas, wait_ms)
        self._prefix = prefix
        self._log_max = log_max_events
        self._history_max = history_max_messages
        self._cursors: dict[str, str] = {}  # watched room -> last id delivered
        self._reader: asyncio.Task | None = None
        self._rooms_changed = asyncio.Event()
        self._watch_lock = asyncio.Lock()
        self._healthy = False
        self._problem: str | None = "not connected yet"
        self._script = self._redis.register_script(_PUBLISH_SCRIPT)
        self._rate_script = self._redis.register_script(_RATE_SCRIPT)

    def _log_key(self, room: str) -> str:
        return f"{self._prefix}:{{{room}}}:log"  # {room}: one hash slot per room

    def _messages_key(self, room: str) -> str:
        return f"{self._prefix}:{{{room}}}:messages"

    def _uid_key(self, room: str, uid: str) -> str:
        return f"{self._prefix}:{{{room}}}:uid:{uid}"

    def _room_of(self, key: str) -> str:
        return key[len(self._prefix) + 2: key.rindex("}")]

    @property
    def redis(self) -> Any:
        """The commands client (a primary, a Sentinel-followed primary or a cluster), for
        the web server's other shared state (leases, revocations)."""
        return self._redis

    @property
    def healthy(self) -> bool:
        return self._healthy and not self.closed

    @property
    def problem(self) -> str | None:
        if self.closed:
            return "broker closed"
        return None if self._healthy else f"redis: {self._problem}"

    def _mark(self, ok: bool, problem: str | None = None) -> None:
        if ok != self._healthy:
            if ok:
                log.info("redis reachable: %s", self.target.describe())
            else:
                log.warning("redis unreachable (%s); retrying with backoff", problem)
        self._healthy, self._problem = ok, (None if ok else problem)

    async def start(self) -> None:
        try:
            await self._redis.ping()
            self._mark(True)
        except Exception as e:  # the reader keeps trying: the server starts anyway
            self._mark(False, _describe(e))
        self._reader = asyncio.create_task(self._read_forever(), name="xiaox-redis-reader")

    async def close(self) -> None:
        await super().close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._clients.aclose()

    async def _call(self, what: str, coro_factory, timeout: float | None):
        """Run a Redis command, retrying transient errors (Redis down, a failover or a
        resharding in progress, a write no replica acknowledged) with backoff until
        ``timeout``; then BrokerUnavailable (a 503 with Retry-After, never a 500)."""
        from serve.web.redis_clients import is_transient

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            if self.closed:
                raise BrokerUnavailable(f"{what}: the broker is closed")
            try:
                result = await coro_factory()
                self._mark(True)
                return result
            except Exception as e:
                if not is_transient(e):
                    raise
                self._mark(False, _describe(e))
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise BrokerUnavailable(f"{what}: redis unreachable ({_describe(e)})") from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def publish(self, room: str, event_type: str, data: dict[str, Any], *,
                      timeout: float | None = 5.0, uid: str | None = None) -> Event:
        payload = {**data, "room": room, "ts": data.get("ts", time.time())}
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        uid = uid or secrets.token_hex(12)
        is_message = event_type == STORED_IN_HISTORY
        # Only messages need exactly-once; a doubled typing/token is harmless and cheap.
        keys = [self._log_key(room), self._messages_key(room), self._uid_key(room, uid)]
        args = [event_type, body, self._log_max, self._history_max,
                "1" if is_message else "0", 3600, "1" if is_message else "0",
                max(0, int(self.room_idle_seconds * 1000))]
        # A message is acknowledged once a replica holds it (redis_replication); a retry
        # after a failover carries the same uid, so it cannot write the message twice.
        run = self._replication.run_script if is_message else _run_plain
        event_id, seen = await self._refused("publish", lambda: self._call(
            "publish", lambda: run(self._redis, self._script, keys, args), timeout))
        return Event(event_id, event_type, {"id": event_id, **payload}, duplicate=seen == 1)

    async def _refused(self, what: str, call):
        """``call()``, with Redis refusing the command (a ``ResponseError``: a key of the
        wrong type, an id out of range) as ``BrokerUnavailable``: a clean 503."""
        from redis.exceptions import ResponseError

        try:
            return await call()
        except ResponseError as e:
            log.warning("redis refused %s: %s", what, _describe(e))
            raise BrokerUnavailable(f"{what}: redis refused the command") from e

    async def claim(self, room: str, uid: str) -> bool:
        key = f"{self._uid_key(room, uid)}:reply"  # in the room's slot, like its other keys
        return bool(await self._call(
            "claim", lambda: self._redis.set(key, "1", nx=True, ex=3600), 2.0))

    async def rate_hit(self, key: str, limit: int, window: float) -> tuple[bool, float]:
        """Count one event for ``key`` across all processes: (allowed, seconds to wait)."""
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
        count, ttl_ms = await self._call("rate limit", lambda: self._rate_script(
            keys=[f"{self._prefix}:rate:{digest}"], args=[max(1, int(window * 1000))]), 1.0)
        return int(count) <= limit, 0.0 if int(count) <= limit else max(0, int(ttl_ms)) / 1000

    async def last_id(self, room: str) -> str:
        entries = await self._refused("last id", lambda: self._call(
            "last id", lambda: self._redis.xrevrange(self._log_key(room), count=1), 5.0))
        return entries[0][0] if entries else ZERO_ID

    async def history(self, room: str, limit: int) -> tuple[list[Event], str]:
        # The cursor first, then messages up to it: a message published in between is
        # neither missed (it comes after the cursor) nor shown twice.
        cursor = await self.last_id(room)
        if limit <= 0 or cursor == ZERO_ID:
            return [], cursor
        entries = await self._refused("history", lambda: self._call(
            "history", lambda: self._redis.xrevrange(
                self._messages_key(room), max=cursor, min="-", count=limit), 5.0))
        return _readable(_decode(e) for e in reversed(entries)), cursor

    async def replay(self, room: str, after_id: str) -> list[Event]:
        after = parse_id(after_id)
        if after == (_ID_PART_MAX, _ID_PART_MAX):
            return []  # nothing can follow it (and Redis refuses "(" of it)
        # Trimmed past the client's id, or expired with the room: the client must reload.
        # XINFO first: whatever is trimmed after this point is after what we read.
        kept_from = await self._trimmed_through(room)
        if kept_from is None:  # no log: the room expired (or never was)
            if after != (0, 0):
                raise ReplayGap(room)
            return []
        if after < kept_from:
            raise ReplayGap(room)
        events: list[Event] = []
        start = "(" + after_id
        while True:
            entries = await self._refused("replay", lambda s=start: self._call(
                "replay", lambda: self._redis.xrange(
                    self._log_key(room), min=s, max="+", count=self.page), 5.0))
            events.extend(_readable(map(_decode, entries)))
            if len(entries) < self.page:
                return events
            start = "(" + entries[-1][0]

    async def _trimmed_through(self, room: str) -> tuple[int, int] | None:
        """An id before which events may have been dropped (the first kept), (0, 0) when
        none were; None when the room has no log."""
        from redis.exceptions import ResponseError

        async def info():
            try:
                return await self._redis.xinfo_stream(self._log_key(room))
            except ResponseError as e:
                if "no such key" in str(e).lower():
                    return None
                raise

        found = await self._refused("replay", lambda: self._call("replay", info, 5.0))
        if found is None:
            return None
        if int(found.get("entries-added", 0)) <= int(found.get("length", 0)):
            return (0, 0)  # nothing dropped yet
        # XADD's trimming does not record what it dropped (Redis 7.0): everything before
        # the first entry may be gone. A client whose last id is the very last one dropped
        # reloads without need; none misses an event.
        first = found.get("first-entry")
        return parse_id(first[0]) if first else (_ID_PART_MAX, _ID_PART_MAX)

    async def _watch(self, room: str) -> None:
        async with self._watch_lock:  # a second listener waits until the room is covered
            if room not in self._cursors:
                self._cursors[room] = await self.last_id(room)
                self._rooms_changed.set()

    def _unwatch(self, room: str) -> None:
        self._cursors.pop(room, None)

    async def _read_forever(self) -> None:
        if self._clients.cluster:  # rooms in different slots: one reader per slot
            from serve.web.redis_reader import SlotReaders

            await SlotReaders(self._reader_redis, self._cursors, self._log_key,
                              self._deliver, self._mark, self._rooms_changed,
                              block_ms=self.block_ms, page=self.page).run()
            return
        delay = 0.1
        while not self.closed:
            try:
                if not self._cursors:
                    # Nobody listens here: keep the health signal fresh and wait.
                    await self._reader_redis.ping()
                    self._mark(True)
                    self._rooms_changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._rooms_changed.wait(), 1.0)
                    continue
                streams = {self._log_key(room): cursor for room, cursor in self._cursors.items()}
                response = await self._reader_redis.xread(
                    streams, count=self.page, block=self.block_ms)
                self._mark(True)
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._mark(False, _describe(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._deliver(response)

    def _deliver(self, response) -> None:
        """Fan out one XREAD response and move the rooms' cursors past it."""
        for key, entries in response or ():
            room = self._room_of(key)
            for entry in entries:
                event = _decode(entry)
                if room in self._cursors:
                    self._cursors[room] = event.id
                self._fan_out(event)


async def _run_plain(client, script, keys: list, args: list):
    return await script(keys=keys, args=args)


malformed_entries = 0  # log entries skipped as unreadable, since this process started


def _decode(entry: tuple[str, dict[str, str]]) -> Event:
    """A log entry as an Event; one that cannot be read (written by hand, by another
    version) comes back as a ``MALFORMED`` placeholder with its id, so the reader's cursor
    moves past it, and is never sent."""
    global malformed_entries
    event_id, fields = entry
    try:
        event_type, raw = fields.get("type", STORED_IN_HISTORY), fields["data"]
        data = json.loads(raw)
        if event_type not in EVENT_TYPES or not isinstance(data, dict) or not isinstance(
                data.get("room"), str):
            raise ValueError("not an event of this server")
        if "\\u" in raw:  # an escaped lone surrogate would break the SSE encoder later
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        data.pop("id", None)  # the entry's own id is the event's id
        return _make_event(event_id, event_type, data)
    except (KeyError, ValueError, TypeError, RecursionError, UnicodeEncodeError) as e:
        malformed_entries += 1
        log.warning("skipped malformed log entry %s (%d so far): %s", str(event_id)[:48],
                    malformed_entries, _describe(e))
        return Event(str(event_id), MALFORMED, {"id": str(event_id)})


def _readable(events) -> list[Event]:
    return [e for e in events if e.type != MALFORMED]


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:200]
