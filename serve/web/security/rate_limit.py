"""A token bucket per key, in this process's memory (``RedisBroker.rate_hit`` shares one),
and ``SharedRateLimiter``: through Redis when there is one, else this process's buckets."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class RateLimiter:
    """A token bucket per key: ``rate`` events per ``per`` seconds, bursts up to ``rate``."""

    def __init__(self, rate: int, per: float, *, max_keys: int = 100_000):
        self.rate, self.per, self.max_keys = rate, per, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float | None = None) -> tuple[bool, float]:
        """(allowed, seconds until the next token when not)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (float(self.rate), now))
        tokens = min(float(self.rate), tokens + (now - last) * self.rate / self.per)
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()  # bounded memory: forgetting everyone is the safe side
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return True, 0.0
        self._buckets[key] = (tokens, now)
        return False, (1.0 - tokens) * self.per / self.rate


class SharedRateLimiter:
    """``rate`` events per ``per`` seconds per key, counted in Redis when the broker is a
    healthy Redis one (every process shares the count), else in this process (bounded)."""

    def __init__(self, name: str, rate: int, per: float, broker_of: Callable[[], Any],
                 *, max_keys: int = 100_000):
        self.name, self.rate, self.per = name, rate, per
        self._broker_of = broker_of
        self.local = RateLimiter(rate, per, max_keys=max_keys)

    async def allow(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds until the next try may succeed)."""
        broker = self._broker_of()
        if broker is not None and hasattr(broker, "rate_hit") and broker.healthy:
            try:
                return await broker.rate_hit(f"{self.name}:{key}", self.rate, self.per)
            except Exception:  # noqa: BLE001 - Redis unreachable: this process's count
                pass
        return self.local.allow(key)
