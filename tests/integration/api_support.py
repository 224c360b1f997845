"""Helpers shared by the API test modules: clients, problem checks, cheap password hashing."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from conftest import ADMIN_PASSWORD
from streamspace.controlplane import security

PROBLEM_KEYS = {"type", "title", "status", "detail"}


NO_LIMIT = {"login_failures_before_delay": 10_000, "login_ip_failures_per_minute": 10_000}


_TLS = ssl.create_default_context()  # shared: building one per client costs ~50 ms


def client(cp: Any, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=cp.url, headers=headers, timeout=30, verify=_TLS)


def login(cp: Any, username: str = "admin", password: str = ADMIN_PASSWORD) -> httpx.Client:
    with client(cp) as anon:
        r = anon.post("/api/v1/auth/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return client(cp, r.json()["access_token"])


@pytest.fixture(autouse=True)
def _cheap_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Production-cost argon2 would dominate the runtime; the API logic under test is the same."""
    monkeypatch.setattr(
        security, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )


def assert_problem(r: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status, body
    assert body["detail"], body
    for fragment in fragments:
        assert fragment.lower() in body["detail"].lower(), (fragment, body)
    return body
