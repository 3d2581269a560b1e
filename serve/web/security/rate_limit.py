"""A token bucket per key, in this process's memory (``RedisBroker.rate_hit`` shares one)."""

from __future__ import annotations

import time


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
