"""Who is connected: SSE streams capped per session and per IP, and presence announced once.

Every ``/stream`` holds three leases (``serve.web.leases``): one under its session, one
under its client IP (both capped: past the cap the stream is a 429) and one under
(room, session). The room one carries the announcement: ``join`` is published only by a
session's first stream in a room, ``leave`` only once its last one has been gone for
``grace`` seconds, so a reconnect (or fifty) announces nothing and pushes nothing out of
the room's log. With Redis the counts are shared by every process; a process that dies
leaves leases that run out after ``LEASE_SECONDS`` (its sessions' ``leave`` is then never
said: the next ``join`` is).

Names are chosen freely, so two live sessions may share one: every message and notice
also carries ``tag``, a short public digest of the session id, and the page shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from serve.web.broker import BrokerUnavailable
from serve.web.leases import Leases

log = logging.getLogger("xiaox.app")

LEASE_SECONDS = 60.0  # a stream's claims outlive its crashed process by at most this
REFRESH_SECONDS = 20.0  # how often a live stream renews them


def public_tag(sid: str) -> str:
    """Six hex digits derived from the session id: tells two "alice"s apart and reveals
    nothing of the id itself (a one-way digest)."""
    return hashlib.sha256(b"xiaox-tag:" + sid.encode("utf-8")).hexdigest()[:6]


class TooManyStreams(Exception):
    """The session or the address already holds its cap of open streams."""

    def __init__(self, which: str):
        super().__init__(f"too many open streams for this {which}")
        self.which = which


@dataclass(eq=False)
class Ticket:
    """One open stream's claims."""

    room: str
    user: str
    tag: str
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    caps: list[str] = field(default_factory=list)  # the session and IP keys it holds
    presence_key: str = ""
    first: bool = False  # this stream's session was not in the room: announce the join


Announce = Callable[[str, str, dict], Awaitable[None]]  # (room, event type, data)


class StreamGate:
    """Admits streams under the caps and announces presence (see the module's doc)."""

    def __init__(self, leases: Leases, announce: Announce, *, per_session: int, per_ip: int,
                 grace: float, prefix: str = "xiaox"):
        self.leases, self.announce = leases, announce
        self.per_session, self.per_ip, self.grace = per_session, per_ip, grace
        self.prefix = prefix
        self._open: set[Ticket] = set()
        self._later: set[asyncio.Task] = set()
        self._refresher: asyncio.Task | None = None

    def start(self) -> None:
        self._refresher = asyncio.create_task(self._refresh_forever(), name="xiaox-leases")

    async def stop(self) -> None:
        for task in (self._refresher, *self._later):
            if task is not None:
                task.cancel()
        for task in (self._refresher, *self._later):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def open(self, sid: str, ip: str, room: str, user: str) -> Ticket:
        """Claim a stream for session ``sid`` from ``ip`` in ``room``; TooManyStreams past
        a cap, BrokerUnavailable when the counts cannot be reached."""
        ticket = Ticket(room, user, public_tag(sid))
        caps = ((f"{self.prefix}:sse:session:{sid}", self.per_session, "session"),
                (f"{self.prefix}:sse:ip:{ip}", self.per_ip, "address"))
        try:
            for key, cap, which in caps:
                admitted, _ = await self.leases.acquire(key, ticket.token, lease=LEASE_SECONDS,
                                                        cap=cap)
                if not admitted:
                    raise TooManyStreams(which)
                ticket.caps.append(key)
            ticket.presence_key = f"{self.prefix}:{{{room}}}:here:{sid}"  # the room's slot
            _, ticket.first = await self.leases.acquire(
                ticket.presence_key, ticket.token, lease=LEASE_SECONDS, announce=True)
        except BaseException:
            await self._release_caps(ticket)
            raise
        self._open.add(ticket)
        return ticket

    async def close(self, ticket: Ticket) -> None:
        """The stream ended: free its caps now, its presence after the grace period."""
        if ticket not in self._open:
            return
        self._open.discard(ticket)
        await self._release_caps(ticket)
        with contextlib.suppress(BrokerUnavailable):
            await self.leases.release(ticket.presence_key, ticket.token, linger=self.grace,
                                      lease=LEASE_SECONDS)
        task = asyncio.create_task(self._leave_later(ticket), name="xiaox-leave")
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _release_caps(self, ticket: Ticket) -> None:
        for key in ticket.caps:
            with contextlib.suppress(BrokerUnavailable):
                await self.leases.release(key, ticket.token)
        ticket.caps = []

    async def _leave_later(self, ticket: Ticket) -> None:
        await asyncio.sleep(self.grace + 0.05)
        try:
            if await self.leases.settle(ticket.presence_key):
                await self.announce(ticket.room, "leave", {"user": ticket.user,
                                                           "tag": ticket.tag})
        except BrokerUnavailable:
            pass  # the key runs out by itself; the next join is announced

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            for ticket in tuple(self._open):
                for key in (*ticket.caps, ticket.presence_key):
                    try:
                        await self.leases.refresh(key, ticket.token, lease=LEASE_SECONDS)
                    except BrokerUnavailable as e:
                        log.debug("lease refresh failed: %s", e)

    @property
    def open_streams(self) -> int:
        return len(self._open)
