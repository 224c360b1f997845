"""The shipped nginx recipe (deploy/replicas/nginx.conf.template) with a control plane that
trusts it, as deploy/replicas/run.sh sets them up: clients behind the proxy are told apart by
their own address, a forged X-Forwarded-For does not get through, and browser origins match.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import ControlPlane, require

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from replicas_support import NGINX_MISSING, Nginx

PASSWORD = "alice-correct-horse-42"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, Nginx]]:
    require(NGINX_MISSING)
    root = tmp_path_factory.mktemp("nginx-recipe")
    cp = ControlPlane(
        root / "cp",
        trusted_proxies=["127.0.0.1"],
        login_failures_before_delay=3,
        login_delay_seconds=30,
    ).start()
    nginx = None
    try:
        cp.create_user("alice", password=PASSWORD).close()
        nginx = Nginx(root, [cp]).start()  # type: ignore[list-item]
        yield cp, nginx
    finally:
        if nginx is not None:
            nginx.stop()
        cp.stop()


def via(nginx: Nginx, ip: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=ip)
    return httpx.Client(base_url=nginx.url, transport=transport, timeout=30)


def login(c: httpx.Client, password: str, **headers: str) -> int:
    body = {"username": "alice", "password": password}
    return c.post("/api/v1/auth/login", json=body, headers=headers).status_code


def test_clients_behind_the_proxy_are_throttled_apart(stack: tuple[ControlPlane, Nginx]) -> None:
    cp, nginx = stack
    with via(nginx, "127.0.0.7") as attacker, via(nginx, "127.0.0.8") as alice:
        # The attacker forges a new X-Forwarded-For each time; nginx replaces it.
        codes = [
            login(attacker, f"guess-{i}", **{"X-Forwarded-For": f"198.51.100.{i}"})
            for i in range(4)
        ]
        assert codes == [401, 401, 401, 429], codes
        # Every request reaches the control plane from nginx (127.0.0.1), yet alice, another
        # client of the same proxy, logs in.
        assert login(alice, PASSWORD) == 200
    with cp.login() as admin:
        rows = admin.get("/api/v1/audit", params={"action": "auth.login_failed"}).json()["items"]
    assert {row["ip"] for row in rows} == {"127.0.0.7"}


def test_browser_origin_matches_through_the_proxy(stack: tuple[ControlPlane, Nginx]) -> None:
    """nginx passes the Host with its port, so the UI's own origin is recognised."""
    cp, nginx = stack
    with cp.login() as admin:
        token = admin.headers["Authorization"]
    with httpx.Client(base_url=nginx.url, timeout=30, headers={"Authorization": token}) as c:
        for origin, expected in ((nginx.url, 200), ("https://evil.example", 403)):
            with c.stream("GET", "/api/v1/events", headers={"Origin": origin}) as r:
                assert r.status_code == expected, (origin, r.status_code)
