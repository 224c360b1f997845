"""Sliding-window counters for failed logins, per user and per client IP."""

from __future__ import annotations

import time
from collections import deque


class RateLimiter:
    """Counts failures only, so a successful login never locks anyone out."""

    def __init__(self, limit: int, window_seconds: float = 60.0) -> None:
        self.limit = limit
        self.window = window_seconds
        self._hits: dict[str, deque[float]] = {}

    def retry_after(self, key: str, limit: int | None = None) -> float:
        """Seconds until `key` may try again (0 if it may now). Does not count an attempt."""
        hits = self._hits.get(key)
        if not hits:
            return 0.0
        now = time.monotonic()
        while hits and now - hits[0] > self.window:
            hits.popleft()
        if len(hits) >= (limit or self.limit):
            return max(self.window - (now - hits[0]), 0.1)
        return 0.0

    def hit(self, key: str) -> None:
        now = time.monotonic()
        self._hits.setdefault(key, deque()).append(now)
        if len(self._hits) > 100_000:
            self._prune(now)

    def reset(self, key: str) -> None:
        self._hits.pop(key, None)

    def _prune(self, now: float) -> None:
        for key in [k for k, v in self._hits.items() if not v or now - v[-1] > self.window]:
            del self._hits[key]
