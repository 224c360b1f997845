"""Failed-login throttling that a stranger cannot use to lock anyone out.

Failures are counted per (username, client IP): after a few, each further attempt of that pair
waits, twice as long after every failure. The victim's own client has no failures, so it logs
in whatever an attacker elsewhere does with the same username. Each client IP also has a cap on
failures per minute over all usernames, so one address cannot guess across many accounts.

An attempt counts as a failure from the moment it is admitted until `succeeded` says otherwise:
parallel guesses cannot all slip in before the first wrong password is recorded.

State is per process: with several replicas each keeps its own counts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

PRUNE_ABOVE = 100_000
IP_WINDOW_SECONDS = 60.0


class TooManyFailures(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:.1f} s")
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> int:
        """Whole seconds, rounded up: waiting that long is always enough."""
        return max(1, math.ceil(self.retry_after))


@dataclass
class _Pair:
    failures: int = 0
    blocked_until: float = 0.0
    last: float = 0.0


@dataclass(frozen=True)
class Attempt:
    pair: tuple[str, str]
    ip: str
    at: float


def ip_key(ip: str) -> str:
    """IPv6 clients are keyed by their /64: one host commonly holds the whole prefix."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class LoginThrottle:
    def __init__(
        self,
        *,
        failures_before_delay: int,
        delay_seconds: float,
        max_delay_seconds: float,
        ip_failures_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_before_delay = failures_before_delay
        self.delay = delay_seconds
        self.max_delay = max_delay_seconds
        self.ip_limit = ip_failures_per_minute
        self.forget_after = 2 * max_delay_seconds
        self._clock = clock
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._ips: dict[str, deque[float]] = {}

    def admit(self, username: str, ip: str) -> Attempt:
        """Let one attempt through, counted as a failure, or raise `TooManyFailures`."""
        now = self._clock()
        key = (username.casefold(), ip_key(ip))
        pair = self._pairs.get(key)
        if pair is not None and now - pair.last > self.forget_after:
            pair = None
            del self._pairs[key]
        if pair is not None and now < pair.blocked_until:
            raise TooManyFailures(pair.blocked_until - now)
        hits = self._ips.get(key[1])
        if hits is not None:
            while hits and now - hits[0] >= IP_WINDOW_SECONDS:
                hits.popleft()
            if len(hits) >= self.ip_limit:
                raise TooManyFailures(IP_WINDOW_SECONDS - (now - hits[0]))
        if pair is None:
            pair = self._pairs[key] = _Pair()
        pair.failures += 1
        pair.last = now
        beyond = pair.failures - self.failures_before_delay
        if beyond >= 0:
            pair.blocked_until = now + min(self.delay * 2**beyond, self.max_delay)
        self._ips.setdefault(key[1], deque()).append(now)
        if len(self._pairs) > PRUNE_ABOVE or len(self._ips) > PRUNE_ABOVE:
            self._prune(now)
        return Attempt(key, key[1], now)

    def succeeded(self, attempt: Attempt) -> None:
        """The password was right: forget the pair's failures and un-count this attempt."""
        self._pairs.pop(attempt.pair, None)
        hits = self._ips.get(attempt.ip)
        if hits is not None:
            with contextlib.suppress(ValueError):
                hits.remove(attempt.at)

    def _prune(self, now: float) -> None:
        for key in [k for k, p in self._pairs.items() if now - p.last > self.forget_after]:
            del self._pairs[key]
        for ip in [i for i, h in self._ips.items() if not h or now - h[-1] >= IP_WINDOW_SECONDS]:
            del self._ips[ip]
