"""Leases: counted, expiring claims on a key (open streams per session, per IP, per room).

A lease is a token with an expiry under a key. Its holder refreshes it while it lives, so
a crashed process's leases run out by themselves instead of counting forever. A key may
also carry an *announcement* mark: the first lease on an unmarked key sets it (``join``)
and ``settle`` clears it once no lease is left (``leave``), each exactly once even with
several processes racing.

``LocalLeases`` keeps them in this process; ``RedisLeases`` in Redis, one key per claim
(a sorted set: token -> expiry in ms), every operation one Lua script on that one key, so
it is cluster-safe wherever the key's hash tag puts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

MARK = "!"  # the announcement mark's member (scored +inf, so it never expires by score)

# KEYS[1]: the lease key. ARGV: op, token, lease ms, cap (0: none), key ms, announce (1/0).
# Returns {ok, flag}: acquire -> {admitted, first (the mark was set)}; settle -> {1, last}.
_LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, op, token = KEYS[1], ARGV[1], ARGV[2]
local lease, cap, keep = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local live = redis.call('ZCOUNT', key, '-inf', '(+inf')
if op == 'acquire' then
  if cap > 0 and live >= cap then return {0, live} end
  redis.call('ZADD', key, now + lease, token)
  local first = 0
  if ARGV[6] == '1' then first = redis.call('ZADD', key, 'NX', '+inf', '!') end
  redis.call('PEXPIRE', key, keep)
  return {1, first}
elseif op == 'refresh' then
  if redis.call('ZADD', key, 'XX', 'CH', now + lease, token) == 1 then
    redis.call('PEXPIRE', key, keep)
  end
  return {1, 0}
elseif op == 'release' then
  if lease > 0 then
    redis.call('ZADD', key, 'XX', now + lease, token)
    redis.call('PEXPIRE', key, keep)
  else
    redis.call('ZREM', key, token)
  end
  return {1, 0}
elseif op == 'settle' then
  if live == 0 and redis.call('ZREM', key, '!') == 1 then
    redis.call('DEL', key)
    return {1, 1}
  end
  return {1, 0}
end
return redis.error_reply('unknown lease op')
"""


class Leases(Protocol):
    async def acquire(self, key: str, token: str, *, lease: float, cap: int = 0,
                      announce: bool = False) -> tuple[bool, bool]:
        """(admitted, first): admitted unless ``cap`` live leases hold ``key``; first when
        this lease set the announcement mark."""

    async def refresh(self, key: str, token: str, *, lease: float) -> None: ...

    async def release(self, key: str, token: str, *, linger: float = 0.0,
                      lease: float = 0.0) -> None:
        """End the lease now, or after ``linger`` seconds (a reconnect meanwhile finds
        the key still held and announces nothing)."""

    async def settle(self, key: str) -> bool:
        """True exactly once when the key's last lease has ended: announce the leave."""


@dataclass
class _Claims:
    leases: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    marked: bool = False

    def live(self, now: float) -> int:
        for token in [t for t, expiry in self.leases.items() if expiry <= now]:
            del self.leases[token]
        return len(self.leases)


class LocalLeases:
    """Leases in this process (no Redis): the same semantics, for one process."""

    def __init__(self) -> None:
        # Bounded by the leases alive: a key goes when its last lease and mark go.
        self._keys: dict[str, _Claims] = {}

    def _forget_if_empty(self, key: str, claims: _Claims, now: float) -> None:
        if not claims.live(now) and not claims.marked:
            self._keys.pop(key, None)

    async def acquire(self, key: str, token: str, *, lease: float, cap: int = 0,
                      announce: bool = False) -> tuple[bool, bool]:
        now = time.monotonic()
        claims = self._keys.setdefault(key, _Claims())
        if cap > 0 and claims.live(now) >= cap:
            return False, False
        claims.leases[token] = now + lease
        first = announce and not claims.marked
        claims.marked = claims.marked or announce
        return True, first

    async def refresh(self, key: str, token: str, *, lease: float) -> None:
        claims = self._keys.get(key)
        if claims is not None and token in claims.leases:
            claims.leases[token] = time.monotonic() + lease

    async def release(self, key: str, token: str, *, linger: float = 0.0,
                      lease: float = 0.0) -> None:
        claims = self._keys.get(key)
        if claims is None or token not in claims.leases:
            return
        now = time.monotonic()
        if linger > 0:
            claims.leases[token] = now + linger
        else:
            del claims.leases[token]
            self._forget_if_empty(key, claims, now)

    async def settle(self, key: str) -> bool:
        claims = self._keys.get(key)
        if claims is None or claims.live(time.monotonic()) or not claims.marked:
            return False
        del self._keys[key]
        return True

    def __len__(self) -> int:
        return len(self._keys)


class RedisLeases:
    """Leases in Redis, shared by every process: ``broker`` is the ``RedisBroker``."""

    def __init__(self, broker: Any):
        self._broker = broker
        self._script = broker.redis.register_script(_LEASE_SCRIPT)

    async def _run(self, key: str, *args: object) -> list:
        return await self._broker._refused("lease", lambda: self._broker._call(
            "lease", lambda: self._script(keys=[key], args=list(args)), 2.0))

    async def acquire(self, key: str, token: str, *, lease: float, cap: int = 0,
                      announce: bool = False) -> tuple[bool, bool]:
        ms = _ms(lease)
        ok, first = await self._run(key, "acquire", token, ms, cap, ms, int(announce))
        return bool(ok), bool(ok) and bool(first)

    async def refresh(self, key: str, token: str, *, lease: float) -> None:
        await self._run(key, "refresh", token, _ms(lease), 0, _ms(lease), 0)

    async def release(self, key: str, token: str, *, linger: float = 0.0,
                      lease: float = 0.0) -> None:
        keep = _ms(max(linger, lease)) if linger > 0 else 0
        await self._run(key, "release", token, _ms(linger) if linger > 0 else 0, 0, keep, 0)

    async def settle(self, key: str) -> bool:
        _, last = await self._run(key, "settle", "", 0, 0, 0, 0)
        return bool(last)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
