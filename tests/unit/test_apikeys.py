"""The pure parts of API keys: the token's shape and the scope each route needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from streamspace.controlplane import apikeys
from streamspace.controlplane.security import sha256


def test_a_made_key_parses_back_to_its_id_and_hash() -> None:
    new = apikeys.make_key()
    parsed = apikeys.parse(new.token)
    assert parsed is not None
    key_id, secret = parsed
    assert key_id == new.id
    assert sha256(secret) == new.secret_hash
    assert secret not in new.secret_hash
    assert apikeys.display_prefix(new.id) == new.token[:12]


@pytest.mark.parametrize(
    "token",
    [
        "",
        "ssk_",
        "ssk_abc_def",
        "Bearer ssk_x",
        "ssk_" + "a" * 32,
        "ssk_" + "a" * 32 + "_",
        "x" * 300,
    ],
)
def test_malformed_keys_do_not_parse(token: str) -> None:
    assert apikeys.parse(token) is None


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/api/v1/sessions", "sessions:read"),
        ("GET", "/api/v1/sessions/abc", "sessions:read"),
        ("POST", "/api/v1/sessions", "sessions:write"),
        ("POST", "/api/v1/sessions/abc/connect", "sessions:write"),
        ("DELETE", "/api/v1/sessions/abc", "sessions:write"),
        ("GET", "/api/v1/templates", "templates:read"),
        ("PUT", "/api/v1/templates/x", "admin"),
        ("GET", "/api/v1/me/quota", "sessions:read"),
        ("GET", "/api/v1/auth/me", apikeys.ANY_SCOPE),
        ("POST", "/api/v1/auth/api-keys", None),
        ("DELETE", "/api/v1/auth/api-keys/x", None),
        ("POST", "/api/v1/auth/logout", None),
        ("GET", "/api/v1/users", "admin"),
        ("GET", "/api/v1/sessionsX", "admin"),
        ("GET", "/api/v1/agents", "admin"),
        ("GET", "/api/v1/something-new", "admin"),
    ],
)
def test_each_route_needs_a_scope_and_unknown_ones_need_admin(
    method: str, path: str, scope: str | None
) -> None:
    assert apikeys.required_scope(method, path) == scope


def test_admin_covers_every_scope_and_expiry_is_checked() -> None:
    now = datetime.now(UTC)
    grant = apikeys.Grant("k", "u", frozenset({"admin"}), now + timedelta(seconds=1))
    assert all(grant.allows(s) for s in apikeys.SCOPES)
    assert not grant.expired(now) and grant.expired(now + timedelta(seconds=2))
    reader = apikeys.Grant("k", "u", frozenset({"sessions:read"}), None)
    assert reader.allows("sessions:read") and reader.allows(apikeys.ANY_SCOPE)
    assert not reader.allows("sessions:write") and not reader.expired(now + timedelta(days=9999))
