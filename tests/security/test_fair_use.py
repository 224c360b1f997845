"""Fair use (issue 12, part 7): one user can no longer stall the API.

Replayed as found: on the embedded SQLite, 30 parallel `POST /api/v1/sessions` by one user made
everyone's `GET /api/v1/auth/me` wait 25-30 s (each create held a pooled connection while it
waited for the writer lock, which the placement loop held while it waited for a connection).
The control planes here read the user on every request (auth cache off), so the other user's
requests really need the database. Bounds are generous: they fail at 25 s, not at 100 ms.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import Counter
from typing import Any

import httpx
from api_support import assert_problem

from conftest import ControlPlane

BURST = 30
ROOMY = {"max_sessions": 1000, "max_cpu_millis": 1_000_000, "max_memory_mb": 10_000_000}
ANSWER_WITHIN = 5.0


class Watcher(threading.Thread):
    """Another user calling GET /auth/me back to back; records each answer and its latency."""

    def __init__(self, client: httpx.Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.samples: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                r = self.client.get("/api/v1/auth/me", timeout=60)
                self.samples.append((r.status_code, time.monotonic() - started))
                self.stop.wait(0.05)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> list[tuple[int, float]]:
        self.stop.set()
        self.join(70)
        assert self.error is None, f"the other user's request failed: {self.error!r}"
        return self.samples


def burst(cp: ControlPlane, token: str, n: int = BURST) -> list[httpx.Response]:
    """`n` POST /sessions at the same moment, each on its own connection."""
    gate = threading.Barrier(n)

    def one(_: int) -> httpx.Response:
        with cp.client(token) as c:
            gate.wait(10)
            return c.post("/api/v1/sessions", json={"template": "xterm"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def setup(make_control_plane: Any, tmp_path: Any, **settings: Any) -> tuple[ControlPlane, Any]:
    cp = make_control_plane(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fair.db'}",
        auth_cache_seconds=0,
        login_rate_per_minute=10_000,
        **settings,
    )
    cp.start_full_agent()  # templates available; sessions stay pending
    abuser = cp.create_user("abuser", quota=ROOMY)
    victim = cp.create_user("victim")
    return cp, (abuser, victim)


def assert_answered_quickly(samples: list[tuple[int, float]]) -> None:
    assert samples, "the other user got no answer at all"
    slowest = max(s for _, s in samples)
    assert slowest <= ANSWER_WITHIN, f"GET /auth/me took {slowest:.1f} s during the burst"
    assert {code for code, _ in samples} == {200}, samples


def test_a_burst_of_creates_gets_429s_and_others_keep_being_answered(
    make_control_plane: Any, tmp_path: Any
) -> None:
    cp, (abuser, victim) = setup(make_control_plane, tmp_path)
    token = abuser.headers["Authorization"].split(" ", 1)[1]
    watcher = Watcher(victim)
    watcher.start()
    answers = burst(cp, token)
    assert_answered_quickly(watcher.finish())

    codes = Counter(r.status_code for r in answers)
    assert codes[201] >= 1 and codes[429] >= 1, codes
    assert set(codes) <= {201, 429}, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert_problem(refused, 429, "session creations under way")
    assert int(refused.headers["Retry-After"]) >= 1
    # The limit is per user: the other user creates at once.
    assert victim.post("/api/v1/sessions", json={"template": "xterm"}).status_code == 201


def test_waiting_for_the_sqlite_writer_holds_no_connection(
    make_control_plane: Any, tmp_path: Any
) -> None:
    """With the per-user limit off, all 30 creates wait for the writer at once: they must not
    hold the pooled connections the placement loop and the other user need."""
    cp, (abuser, victim) = setup(make_control_plane, tmp_path, user_concurrent_creates=0)
    token = abuser.headers["Authorization"].split(" ", 1)[1]
    watcher = Watcher(victim)
    watcher.start()
    started = time.monotonic()
    answers = burst(cp, token)
    took = time.monotonic() - started
    assert_answered_quickly(watcher.finish())
    assert Counter(r.status_code for r in answers) == {201: BURST}
    assert took <= 20, f"{BURST} creates took {took:.1f} s"


def test_request_rate_is_limited_per_user(make_control_plane: Any, tmp_path: Any) -> None:
    _, (abuser, victim) = setup(
        make_control_plane, tmp_path, user_requests_per_second=2, user_request_burst=10
    )
    answers = [abuser.get("/api/v1/sessions") for _ in range(30)]
    codes = Counter(r.status_code for r in answers)
    assert codes[200] >= 10 and codes[429] >= 1, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert_problem(refused, 429, "too many requests from this account")
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 5, wait
    assert victim.get("/api/v1/sessions").status_code == 200
    time.sleep(wait)
    assert abuser.get("/api/v1/sessions").status_code == 200
