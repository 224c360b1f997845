"""Per-user limits: request rate (token buckets) and operations under way at once.
Failed logins are throttled by controlplane/loginthrottle.py."""

from __future__ import annotations

import time


class TokenBuckets:
    """Per-key request rate: `rate` per second on average, bursts of up to `burst` at once.

    Kept per replica, in memory: a check costs no round trip, which every API request would pay
    otherwise. With N replicas behind a balancer a user gets at most N times the rate.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Spend one token: 0 if there was one, else the seconds until there is (none spent)."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def _prune(self, now: float) -> None:
        """Drop buckets that have refilled completely: they carry no information."""
        full = self.burst / self.rate
        for key in [k for k, (_, at) in self._buckets.items() if now - at >= full]:
            del self._buckets[key]


class InFlight:
    """Per-key count of operations under way, at most `limit` at once per key (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[str, int] = {}

    def try_enter(self, key: str) -> bool:
        running = self._running.get(key, 0)
        if self.limit and running >= self.limit:
            return False
        self._running[key] = running + 1
        return True

    def leave(self, key: str) -> None:
        running = self._running.get(key, 0) - 1
        if running > 0:
            self._running[key] = running
        else:
            self._running.pop(key, None)
