"""No timing oracle at login: an unknown username costs the same as a wrong password.

Before, a login for an unknown username returned without hashing (~1 ms) while a wrong
password for a real one paid a full argon2 verify (tens of ms), so response times told which
usernames exist. Statistical, with a generous bound (medians within 20 %), hence `slow`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from conftest import ControlPlane

pytestmark = pytest.mark.slow

ROUNDS = 40
WARMUP = 5


def test_unknown_username_costs_the_same_as_a_wrong_password(tmp_path: Any) -> None:
    cp = ControlPlane(
        tmp_path / "cp", login_failures_before_delay=10_000, login_ip_failures_per_minute=10_000
    ).start()
    try:
        cp.create_user("alice", password="alice-correct-horse-42").close()
        unknown: list[float] = []
        wrong: list[float] = []
        with cp.client() as c:

            def timed(username: str) -> float:
                body = {"username": username, "password": "not-the-password-1"}
                started = time.perf_counter()
                r = c.post("/api/v1/auth/login", json=body)
                elapsed = time.perf_counter() - started
                assert r.status_code == 401, r.text
                return elapsed

            for i in range(WARMUP):
                timed("alice")
                timed(f"warmup-ghost-{i}")
            for i in range(ROUNDS):  # interleaved, so drift in machine load hits both alike
                wrong.append(timed("alice"))
                unknown.append(timed(f"ghost-{i}"))
        m_wrong, m_unknown = statistics.median(wrong), statistics.median(unknown)
        print(
            f"\nlogin medians over {ROUNDS} rounds: wrong password {m_wrong * 1000:.1f} ms, "
            f"unknown username {m_unknown * 1000:.1f} ms "
            f"(difference {abs(m_unknown - m_wrong) / m_wrong:.1%})"
        )
        assert abs(m_unknown - m_wrong) <= 0.20 * m_wrong, (m_unknown, m_wrong)
    finally:
        cp.stop()
