"""The password policy holds wherever a password is set: the API, the CLI and the first admin.

Each refusal is a clear message saying why (zxcvbn's warning); nothing weak is stored.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from conftest import ROOT, ControlPlane, free_port

STRONG = "alice-correct-horse-42"
COMMON = "password1234"  # 12 characters, in every list of common passwords


def weak_problem(r: httpx.Response, *fragments: str) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    for fragment in fragments:
        assert fragment in body["detail"], body
    return body


def test_api_refuses_weak_passwords_everywhere_one_is_set(make_control_plane: Any) -> None:
    cp = make_control_plane()
    with cp.login() as admin:
        body = weak_problem(
            admin.post("/api/v1/users", json={"username": "alice", "password": COMMON}),
            "password:",
            "very common password",
        )
        assert body["type"].endswith("/weak-password")
        assert body["suggestions"], body
        weak_problem(
            admin.post("/api/v1/users", json={"username": "alice", "password": "short-pw-1"}),
            "password",
            "12 characters",
        )
        # the user's own name is something zxcvbn knows to guess
        weak_problem(
            admin.post("/api/v1/users", json={"username": "alice", "password": "alicealice12"}),
            "too easy to guess",
        )
        assert admin.get("/api/v1/users/alice").status_code == 404, "nothing was created"
        r = admin.post("/api/v1/users", json={"username": "alice", "password": STRONG})
        assert r.status_code == 201, r.text
        # an admin's password reset
        weak_problem(admin.patch("/api/v1/users/alice", json={"password": COMMON}), "common")

    with httpx.Client(base_url=cp.url, timeout=30) as anon:
        assert (
            anon.post(
                "/api/v1/auth/login", json={"username": "alice", "password": COMMON}
            ).status_code
            == 401
        ), "the refused reset did not change the password"
    alice = cp.login("alice", STRONG)
    with alice:
        # the user's own password change
        weak_problem(
            alice.post(
                "/api/v1/auth/password",
                json={"current_password": STRONG, "new_password": "qwertyuiop123"},
            ),
            "new_password:",
            "common",
        )
        r = alice.post(
            "/api/v1/auth/password",
            json={"current_password": STRONG, "new_password": "violet-lantern-harbor-7"},
        )
        assert r.status_code == 200, r.text


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSPACE_")}
    return subprocess.run(
        [sys.executable, "-m", "streamspace.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**base, **(env or {}), "COLUMNS": "200"},
    )


def test_cli_create_user_refuses_weak_passwords(tmp_path: Path) -> None:
    data = tmp_path / "data"
    r = cli("admin", "create-user", "bob", "--password", COMMON, "--data-dir", str(data))
    assert r.returncode != 0
    out = " ".join((r.stdout + r.stderr).split())
    assert "password: is too easy to guess (this is a very common password)" in out, out
    r = cli("admin", "create-user", "bob", "--password", "short-1", "--data-dir", str(data))
    assert r.returncode != 0 and "12 characters" in r.stdout + r.stderr
    r = cli("admin", "create-user", "bob", "--password", STRONG, "--data-dir", str(data))
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("admin", "create-user", "BOB", "--password", STRONG, "--data-dir", str(data))
    assert r.returncode != 0 and "'bob' exists" in r.stdout + r.stderr
    # the user the CLI made logs in to the product running on that data dir
    cp = ControlPlane(data).start()
    try:
        cp.login("bob", STRONG).close()
    finally:
        cp.stop()


def test_weak_configured_admin_password_refuses_the_first_start(tmp_path: Path) -> None:
    port = free_port()
    args = ["server", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    r = cli(*args, env={"STREAMSPACE_ADMIN_PASSWORD": "admin12345678"})
    assert r.returncode != 0
    out = " ".join((r.stdout + r.stderr).split())
    assert "refusing to create the first admin: STREAMSPACE_ADMIN_PASSWORD: is too easy" in out
    assert "could not listen" not in out, out
    # and nothing was created with it: a strong one works on the same data dir
    cp = ControlPlane(tmp_path / "data")
    cp.settings.admin_password = "violet-lantern-harbor-7"
    cp.start()
    try:
        cp.login("admin", "violet-lantern-harbor-7").close()
    finally:
        cp.stop()
