"""A stranger cannot lock anyone out, and cannot dodge the throttle by forging headers.

Clients really come from different addresses: Linux routes all of 127.0.0.0/8 to the loopback
interface, so an httpx client bound to 127.0.0.3 reaches the control plane (on 127.0.0.1) as
peer 127.0.0.3, with no header involved.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import ADMIN_PASSWORD, ControlPlane

ALICE_PASSWORD = "alice-correct-horse-42"
THROTTLE = {
    "login_failures_before_delay": 3,
    "login_delay_seconds": 1.0,
    "login_max_delay_seconds": 60.0,
}


def from_ip(cp: ControlPlane, ip: str, **headers: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=ip)
    return httpx.Client(base_url=cp.url, transport=transport, headers=headers, timeout=30)


def login(c: httpx.Client, username: str, password: str, **headers: str) -> httpx.Response:
    return c.post(
        "/api/v1/auth/login", json={"username": username, "password": password}, headers=headers
    )


@pytest.fixture
def cp(tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    extra = getattr(request, "param", {})
    plane = ControlPlane(tmp_path / "cp", **THROTTLE, **extra).start()
    try:
        plane.create_user("alice", password=ALICE_PASSWORD).close()
        yield plane
    finally:
        plane.stop()


def retry_after(r: httpx.Response) -> int:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "try again" in r.json()["detail"]
    value = r.headers.get("retry-after", "")
    assert value.isdigit(), r.headers
    return int(value)


def test_attacker_flood_does_not_lock_alice_out(cp: ControlPlane) -> None:
    with from_ip(cp, "127.0.0.3") as attacker, from_ip(cp, "127.0.0.2") as alice:
        codes = [login(attacker, "alice", f"guess-{i}").status_code for i in range(3)]
        assert codes == [401, 401, 401]
        # The attacker is throttled now, with waits that grow after every further failure.
        waits = [retry_after(login(attacker, "alice", "guess-x"))]
        for _ in range(2):
            time.sleep(waits[-1])
            r = login(attacker, "alice", "guess-after-wait")
            assert r.status_code == 401, r.text  # the wait was enough for one more try
            waits.append(retry_after(login(attacker, "alice", "guess-again")))
        assert waits[0] < waits[1] < waits[2], waits
        # ... also for the right password (the attacker might have found it meanwhile).
        assert login(attacker, "alice", ALICE_PASSWORD).status_code == 429
        # The username is case-folded, so no other spelling gets around it.
        assert login(attacker, "ALICE", "guess-y").status_code == 429

        # Alice, from her own address, logs in at once while the attacker is locked.
        r = login(alice, "alice", ALICE_PASSWORD)
        assert r.status_code == 200, r.text
        assert r.json()["user"]["username"] == "alice"
        # Even after a typo of her own.
        assert login(alice, "alice", "typo-typo-typo").status_code == 401
        assert login(alice, "Alice", ALICE_PASSWORD).status_code == 200


def test_one_address_cannot_guess_across_many_usernames(tmp_path: Any) -> None:
    cp = ControlPlane(tmp_path / "cp", login_ip_failures_per_minute=5, **THROTTLE).start()
    try:
        with from_ip(cp, "127.0.0.3") as attacker, from_ip(cp, "127.0.0.2") as other:
            # Two failures per username stay under the per-pair threshold; the per-IP cap
            # stops the spray after five.
            codes = [login(attacker, f"user{i // 2}", "Winter2024!").status_code for i in range(5)]
            assert codes == [401] * 5
            r = login(attacker, "user9", "Winter2024!")
            assert 1 <= retry_after(r) <= 60
            assert login(attacker, "admin", ADMIN_PASSWORD).status_code == 429
            # Another address is not affected.
            assert login(other, "admin", ADMIN_PASSWORD).status_code == 200
    finally:
        cp.stop()


def test_spoofed_forwarded_headers_from_an_untrusted_peer_change_nothing(
    cp: ControlPlane,
) -> None:
    """With no trusted proxy, rotating X-Forwarded-For / Forwarded does not give the attacker
    a fresh throttling key per request, and the audit log records the real peer. The attacker
    is on 127.0.0.1, the one address uvicorn itself would believe by default."""
    with from_ip(cp, "127.0.0.1") as attacker:
        for i in range(3):
            r = login(
                attacker,
                "alice",
                f"guess-{i}",
                **{"X-Forwarded-For": f"198.51.100.{i}", "Forwarded": f"for=198.51.100.{i}"},
            )
            assert r.status_code == 401, r.text
        spoofed = {"X-Forwarded-For": "198.51.100.77", "Forwarded": "for=198.51.100.77"}
        assert login(attacker, "alice", "guess-3", **spoofed).status_code == 429
    with cp.login() as admin:
        rows = admin.get("/api/v1/audit", params={"action": "auth.login_failed"}).json()["items"]
    assert {row["ip"] for row in rows} == {"127.0.0.1"}


@pytest.mark.parametrize("cp", [{"trusted_proxies": ["127.0.0.5"]}], indirect=True)
def test_forwarded_for_is_honoured_from_a_trusted_proxy(cp: ControlPlane) -> None:
    """Behind a trusted proxy the throttle keys on the client it forwards: one client behind
    the proxy is throttled, another behind the same proxy is not, and a peer that is not the
    proxy still cannot choose its key."""
    with from_ip(cp, "127.0.0.5") as proxy, from_ip(cp, "127.0.0.6") as stranger:
        attacker = {"X-Forwarded-For": "203.0.113.7"}
        for i in range(3):
            assert login(proxy, "alice", f"guess-{i}", **attacker).status_code == 401
        assert login(proxy, "alice", "guess-3", **attacker).status_code == 429
        # alice, behind the same proxy (so the same TCP peer), is another client
        r = login(proxy, "alice", ALICE_PASSWORD, **{"X-Forwarded-For": "203.0.113.8"})
        assert r.status_code == 200, r.text
        # a forged header from a peer that is not the proxy is ignored: its key is its own
        # address, which has no failures, even though it claims to be the throttled client
        r = login(stranger, "alice", ALICE_PASSWORD, **attacker)
        assert r.status_code == 200, r.text
    with cp.login() as admin:
        rows = admin.get("/api/v1/audit", params={"action": "auth.login_failed"}).json()["items"]
        logins = admin.get("/api/v1/audit", params={"action": "auth.login"}).json()["items"]
    assert {row["ip"] for row in rows} == {"203.0.113.7"}
    assert {"203.0.113.8", "127.0.0.6"} <= {row["ip"] for row in logins}


def test_trusted_proxies_setting_refuses_what_is_not_an_address() -> None:
    from pydantic import ValidationError

    from streamspace.config import Settings

    assert Settings(trusted_proxies="10.0.0.0/8, 127.0.0.1").trusted_proxies == [
        "10.0.0.0/8",
        "127.0.0.1",
    ]
    with pytest.raises(ValidationError, match="not an IP address or CIDR"):
        Settings(trusted_proxies="proxy.example")
