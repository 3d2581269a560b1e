"""Logout revokes the session on the server, and ends the session's open streams.

A signed cookie stays valid until it expires, wherever a copy of it lives: logging out
only asked the browser to forget it. ``Revocations`` remembers each logged-out session id
for as long as its cookie could still be valid (``SESSION_MAX_AGE``):

- in Redis when there is one (shared by every process): one key per session id,
  ``SET key 1 EX ttl`` and ``EXISTS key``, single-key commands only (cluster-safe);
- always in this process as well (a bounded map, oldest forgotten first), so the process
  that logged a session out refuses it at once even while Redis is unreachable.

Reading Redis fails open (a Redis outage must not log everyone out); this process's own
logouts still hold. ``RevocationMiddleware`` (inside the session middleware) empties a
revoked session before any route sees it, and turns a revocation into an
``http.disconnect`` for a streaming request of that session: the SSE response then ends
as if the client had gone (its cleanup, ``leave``, runs as usual). Other processes'
logouts reach this process's streams by polling Redis every ``poll_seconds`` for the
session ids that have a stream open here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.web.security.session import SESSION_MAX_AGE

log = logging.getLogger("xiaox.app")
REDIS_TIMEOUT = 1.0  # a revocation read may not hold a request longer


class Revocations:
    """The revoked session ids: in Redis (if any) and in this process (bounded)."""

    def __init__(self, broker_of: Callable[[], Any] = lambda: None, *,
                 ttl: float = SESSION_MAX_AGE, max_local: int = 100_000,
                 poll_seconds: float = 1.0, prefix: str = "xiaox"):
        self._broker_of = broker_of
        self.ttl, self.max_local, self.poll_seconds = ttl, max_local, poll_seconds
        self._prefix = prefix
        self._local: OrderedDict[str, float] = OrderedDict()  # sid -> expiry (monotonic)
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._poller: asyncio.Task | None = None

    def key(self, sid: str) -> str:
        digest = hashlib.sha256(sid.encode("utf-8")).hexdigest()[:32]
        return f"{self._prefix}:revoked:{digest}"

    def _redis(self) -> Any:
        """The broker's Redis client, when the broker is a healthy Redis one."""
        broker = self._broker_of()
        if broker is None or not hasattr(broker, "rate_hit") or not broker.healthy:
            return None
        return broker.redis

    def _remember(self, sid: str) -> None:
        self._local.pop(sid, None)
        self._local[sid] = time.monotonic() + self.ttl
        while len(self._local) > self.max_local:  # bounded: the oldest logout goes first
            self._local.popitem(last=False)
        for event in self._watchers.get(sid, ()):
            event.set()

    def _known_locally(self, sid: str) -> bool:
        expiry = self._local.get(sid)
        if expiry is not None and expiry < time.monotonic():
            del self._local[sid]
            return False
        return expiry is not None

    async def revoke(self, sid: str) -> None:
        """Log ``sid`` out everywhere (here at once; elsewhere through Redis)."""
        self._remember(sid)
        redis = self._redis()
        if redis is None:
            return
        try:
            await asyncio.wait_for(redis.set(self.key(sid), "1", ex=int(self.ttl)),
                                   REDIS_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - any Redis failure: this process still knows
            log.warning("could not store a logout in redis (%s); other processes may "
                        "accept that session until it expires", type(e).__name__)

    async def is_revoked(self, sid: str) -> bool:
        if self._known_locally(sid):
            return True
        redis = self._redis()
        if redis is None:
            return False
        try:
            found = await asyncio.wait_for(redis.exists(self.key(sid)), REDIS_TIMEOUT)
        except Exception:  # noqa: BLE001 - fail open: an outage must not log everyone out
            return False
        if found:
            self._remember(sid)
        return bool(found)

    @contextlib.contextmanager
    def watch(self, sid: str) -> Iterator[asyncio.Event]:
        """An event set when ``sid`` is revoked (here, or by another process)."""
        event = asyncio.Event()
        if self._known_locally(sid):
            event.set()
        self._watchers.setdefault(sid, set()).add(event)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="xiaox-revocation-poll")
        try:
            yield event
        finally:
            watchers = self._watchers.get(sid)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._watchers[sid]

    async def _poll(self) -> None:
        """While streams are open here: ask Redis about their sessions every poll, in one
        round trip (a pipeline of single-key EXISTS, which a cluster splits by slot)."""
        while self._watchers:
            await asyncio.sleep(self.poll_seconds)
            sids = [sid for sid in list(self._watchers) if not self._known_locally(sid)]
            redis = self._redis()
            if not sids or redis is None:
                continue
            try:
                pipe = redis.pipeline(transaction=False)
                for sid in sids:
                    pipe.exists(self.key(sid))
                found = await asyncio.wait_for(pipe.execute(), REDIS_TIMEOUT)
            except Exception:  # noqa: BLE001 - unreachable: try again at the next poll
                continue
            for sid, hit in zip(sids, found, strict=True):
                if hit:
                    self._remember(sid)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller


class RevocationMiddleware:
    """A revoked session is empty to every route; its streams end (``stream_paths``)."""

    def __init__(self, app: ASGIApp, revocations: Revocations,
                 stream_paths: tuple[str, ...] = ("/stream",)):
        self.app, self.revocations, self.stream_paths = app, revocations, stream_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = scope.get("session") if scope["type"] == "http" else None
        sid = session.get("sid") if session else None
        if not isinstance(sid, str) or not sid:
            await self.app(scope, receive, send)
            return
        if await self.revocations.is_revoked(sid):
            session.clear()  # the routes see no login; the cookie is cleared
            await self.app(scope, receive, send)
            return
        if scope["path"] not in self.stream_paths:
            await self.app(scope, receive, send)
            return
        with self.revocations.watch(sid) as revoked:
            await self.app(scope, _until(receive, revoked), send)


def _until(receive: Receive, revoked: asyncio.Event) -> Receive:
    """``receive``, answering ``http.disconnect`` once ``revoked`` is set."""

    async def receiving() -> Message:
        if revoked.is_set():
            return {"type": "http.disconnect"}
        message = asyncio.ensure_future(receive())
        waiter = asyncio.ensure_future(revoked.wait())
        try:
            await asyncio.wait({message, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (message, waiter):
                if not task.done():
                    task.cancel()
        if message.done() and not message.cancelled():
            return message.result()
        return {"type": "http.disconnect"}

    return receiving
