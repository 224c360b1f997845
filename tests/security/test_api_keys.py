"""API keys through the product: scopes hold, revocation is immediate, a key never exceeds its
owner, and the key is stored and logged nowhere in the clear."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

PASSWORD = "user-pass-123"


def add_user(admin: httpx.Client, name: str, role: str = "user") -> str:
    r = admin.post("/api/v1/users", json={"username": name, "password": PASSWORD, "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def new_key(c: httpx.Client, *scopes: str, **extra: Any) -> dict[str, Any]:
    r = c.post("/api/v1/auth/api-keys", json={"name": "script", "scopes": list(scopes), **extra})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def test_scopes_limit_what_a_key_may_do(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # xterm is runnable: creates are accepted and stay pending
    admin = login(cp)
    add_user(admin, "alice")
    alice = login(cp, "alice", PASSWORD)
    reader = new_key(alice, "sessions:read")
    assert reader["key"].startswith("ssk_") and reader["prefix"] == reader["key"][:12]
    writer = new_key(alice, "sessions:write", "templates:read")

    with client(cp, reader["key"]) as c:
        assert c.get("/api/v1/sessions").status_code == 200
        assert c.get("/api/v1/auth/me").json()["username"] == "alice"
        assert_problem(
            c.post("/api/v1/sessions", json={"template": "xterm"}), 403, "sessions:write"
        )
        assert_problem(c.get("/api/v1/templates"), 403, "templates:read")
    with client(cp, writer["key"]) as c:
        r = c.post("/api/v1/sessions", json={"template": "xterm"})
        assert r.status_code == 201, r.text
        assert r.json()["owner"] == "alice"
        assert c.get("/api/v1/templates").status_code == 200
        # the owner still comes from the credential, never from the body
        assert (
            c.post("/api/v1/sessions", json={"template": "xterm", "owner": "admin"}).status_code
            == 422
        )
        # keys cannot mint keys, sign out, or change the password
        assert_problem(
            c.post("/api/v1/auth/api-keys", json={"name": "x", "scopes": ["admin"]}),
            403,
            "api keys cannot",
        )
        assert_problem(c.post("/api/v1/auth/logout"), 403, "api keys cannot")
        assert_problem(
            c.post(
                "/api/v1/auth/password",
                json={"current_password": PASSWORD, "new_password": "x" * 16},
            ),
            403,
            "api keys cannot",
        )
        # everything not named needs `admin`
        assert_problem(c.get("/api/v1/agents"), 403, "'admin'")

    listed = alice.get("/api/v1/auth/api-keys").json()
    assert listed["total"] == 2
    assert all("key" not in k for k in listed["items"])
    assert {k["prefix"] for k in listed["items"]} == {reader["prefix"], writer["prefix"]}
    used = {k["id"]: k["last_used_at"] for k in listed["items"]}
    assert used[reader["id"]] is not None and used[writer["id"]] is not None


def test_a_key_never_exceeds_its_owner(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    admin = login(cp)
    add_user(admin, "alice")
    alice = login(cp, "alice", PASSWORD)
    assert_problem(
        alice.post("/api/v1/auth/api-keys", json={"name": "x", "scopes": ["admin"]}),
        403,
        "never exceeds",
    )
    boss_id = add_user(admin, "boss", role="admin")
    boss = login(cp, "boss", PASSWORD)
    full = new_key(boss, "admin")
    narrow = new_key(boss, "sessions:read")
    with client(cp, full["key"]) as c:
        assert c.get("/api/v1/users").status_code == 200
        assert c.get("/api/v1/sessions").status_code == 200  # admin covers every scope
    with client(cp, narrow["key"]) as c:
        assert_problem(c.get("/api/v1/users"), 403, "'admin'")
    # demoted: the admin-scoped key is now only as strong as the user role
    r = admin.patch(f"/api/v1/users/{boss_id}", json={"role": "user"})
    assert r.status_code == 200, r.text
    with client(cp, full["key"]) as c:
        assert_problem(c.get("/api/v1/users"), 403, "admin role")
        assert c.get("/api/v1/sessions").status_code == 200


def test_revoked_expired_forged_and_orphaned_keys_fail(
    make_control_plane: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cp = make_control_plane(**NO_LIMIT)
    admin = login(cp)
    alice_id = add_user(admin, "alice")
    alice = login(cp, "alice", PASSWORD)
    key = new_key(alice, "sessions:read")
    with client(cp, key["key"]) as c:
        assert c.get("/api/v1/sessions").status_code == 200  # now cached
        assert alice.delete(f"/api/v1/auth/api-keys/{key['id']}").status_code == 204
        assert_problem(c.get("/api/v1/sessions"), 401, "revoked")
    assert alice.delete(f"/api/v1/auth/api-keys/{key['id']}").status_code == 404

    forged = new_key(alice, "sessions:read")["key"]
    key_id = forged[4:36]
    for token in (f"ssk_{key_id}_wrong-secret", forged + "x", "ssk_", "ssk_" + "0" * 32 + "_x"):
        with client(cp, token) as c:
            assert_problem(c.get("/api/v1/sessions"), 401, "API key")

    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    expiring = new_key(alice, "sessions:read", expires_at=soon)
    with client(cp, expiring["key"]) as c:
        assert c.get("/api/v1/sessions").status_code == 200
        time.sleep(2.5)
        assert_problem(c.get("/api/v1/sessions"), 401, "expired")
    for bad, why in (
        ((datetime.now(UTC) - timedelta(days=1)).isoformat(), "future"),
        ("2030-01-01T00:00:00", "time zone"),
    ):
        r = alice.post(
            "/api/v1/auth/api-keys",
            json={"name": "x", "scopes": ["sessions:read"], "expires_at": bad},
        )
        assert_problem(r, 400, why)
    assert_problem(
        alice.post("/api/v1/auth/api-keys", json={"name": "x", "scopes": ["root"]}), 422, "scopes"
    )
    assert_problem(
        alice.post("/api/v1/auth/api-keys", json={"name": "x", "scopes": []}), 422, "scopes"
    )

    alive = new_key(alice, "sessions:read")
    with client(cp, alive["key"]) as c:
        assert c.get("/api/v1/sessions").status_code == 200
        assert (
            admin.patch(f"/api/v1/users/{alice_id}", json={"is_active": False}).status_code == 200
        )
        assert_problem(c.get("/api/v1/sessions"), 401, "disabled")
        assert admin.patch(f"/api/v1/users/{alice_id}", json={"is_active": True}).status_code == 200
        assert c.get("/api/v1/sessions").status_code == 200
        assert admin.delete(f"/api/v1/users/{alice_id}").status_code == 204
        assert_problem(c.get("/api/v1/sessions"), 401)

    # stored only as a hash, and never written to the log
    (db_file,) = cp.settings.data_dir.rglob("*.db")
    with sqlite3.connect(db_file) as conn:
        rows = conn.execute("SELECT id, secret_hash FROM api_keys").fetchall()
    dump = repr(rows)
    for token in (forged, expiring["key"]):
        assert token.split("_", 2)[2] not in dump
    log = caplog.text
    assert "/api/v1/auth/api-keys" in log, "the requests were not logged: nothing checked"
    for token in (key["key"], forged, expiring["key"], alive["key"]):
        assert token.split("_", 2)[2] not in log


def test_service_accounts_act_only_through_keys(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()
    admin = login(cp)
    r = admin.post("/api/v1/users", json={"username": "robot", "service_account": True})
    assert r.status_code == 201, r.text
    assert r.json()["service_account"] is True
    robot_id = r.json()["id"]
    assert_problem(
        admin.post(
            "/api/v1/users", json={"username": "r2", "service_account": True, "password": PASSWORD}
        ),
        422,
        "service account has none",
    )
    assert_problem(admin.post("/api/v1/users", json={"username": "r3"}), 422, "password")
    with client(cp) as anon:
        for password in ("", "!", PASSWORD):
            r = anon.post(
                "/api/v1/auth/login", json={"username": "robot", "password": password or "x"}
            )
            assert_problem(r, 401, "wrong username or password")
    assert_problem(
        admin.patch(f"/api/v1/users/{robot_id}", json={"password": "a-new-pass-123"}),
        400,
        "service account",
    )

    add_user(admin, "alice")
    assert_problem(
        admin.post("/api/v1/users/alice/api-keys", json={"name": "x", "scopes": ["sessions:read"]}),
        409,
        "not a service account",
    )
    key = admin.post(
        "/api/v1/users/robot/api-keys", json={"name": "ci", "scopes": ["sessions:write"]}
    )
    assert key.status_code == 201, key.text
    assert key.json()["created_by"] != robot_id
    with client(cp, key.json()["key"]) as c:
        r = c.post("/api/v1/sessions", json={"template": "xterm"})
        assert r.status_code == 201, r.text
        assert r.json()["owner"] == "robot"
    listed = admin.get(f"/api/v1/users/{robot_id}/api-keys").json()
    assert [k["id"] for k in listed["items"]] == [key.json()["id"]]
    # the admin revokes it through the ordinary route
    assert admin.delete(f"/api/v1/auth/api-keys/{key.json()['id']}").status_code == 204
    with client(cp, key.json()["key"]) as c:
        assert_problem(c.get("/api/v1/sessions"), 401, "revoked")


def test_cli_logs_in_with_a_key_from_the_environment(
    make_control_plane: Any, tmp_path: Path
) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # users see only templates an agent can run
    admin = login(cp)
    add_user(admin, "alice")
    alice = login(cp, "alice", PASSWORD)
    key = new_key(alice, "sessions:read", "templates:read")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSPACE_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamspace.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, **extra},
        )

    r = cli("login", "--server", cp.url, "--api-key", STREAMSPACE_API_KEY="ssk_" + "0" * 32 + "_x")
    assert r.returncode != 0 and "refused" in r.stdout + r.stderr
    r = cli("login", "--server", cp.url, "--api-key", STREAMSPACE_API_KEY=key["key"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "alice" in r.stdout
    path = tmp_path / "config" / "streamspace" / "cli.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {"server": cp.url, "api_key": key["key"]}
    r = cli("templates", "ls")
    assert r.returncode == 0 and "xterm" in r.stdout, r.stdout + r.stderr
    r = cli("sessions", "create", "xterm")
    assert r.returncode != 0 and "sessions:write" in r.stdout + r.stderr
    assert alice.delete(f"/api/v1/auth/api-keys/{key['id']}").status_code == 204
    r = cli("templates", "ls")
    assert r.returncode != 0 and "API key was refused" in r.stdout + r.stderr
