"""Two-factor sign-in through the product: enrolment, the two-step login, replay and
guessing refused, policy-led enrolment, recovery codes, and an admin's reset."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import httpx
import pyotp
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

from conftest import ADMIN_PASSWORD

PASSWORD = "user-pass-123"


def code_at(secret: str, offset_steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(time.time() + 30 * offset_steps)


def attempt(cp: Any, username: str, password: str) -> httpx.Response:
    with client(cp) as anon:
        return anon.post(
            "/api/v1/auth/login",
            json={"username": username, "password": password, "refresh_token_delivery": "body"},
        )


def verify(cp: Any, mfa_token: str, code: str) -> httpx.Response:
    with client(cp) as anon:
        return anon.post("/api/v1/auth/mfa/verify", json={"mfa_token": mfa_token, "code": code})


def enrol(c: httpx.Client) -> tuple[str, list[str]]:
    r = c.post("/api/v1/auth/mfa/totp")
    assert r.status_code == 201, r.text
    start = r.json()
    assert start["otpauth_uri"].startswith("otpauth://totp/")
    assert len(start["qr"]) > 20 and set("".join(start["qr"])) == {"0", "1"}
    assert_problem(c.post("/api/v1/auth/mfa/totp/confirm", json={"code": "000000"}), 400, "wrong")
    r = c.post("/api/v1/auth/mfa/totp/confirm", json={"code": code_at(start["secret"])})
    assert r.status_code == 200, r.text
    codes: list[str] = r.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    return start["secret"], codes


def add_user(admin: httpx.Client, name: str, role: str = "user") -> str:
    r = admin.post("/api/v1/users", json={"username": name, "password": PASSWORD, "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_enrolled_user_logs_in_in_two_steps_and_codes_do_not_replay(
    make_control_plane: Any,
) -> None:
    cp = make_control_plane(**NO_LIMIT)
    admin = login(cp)
    add_user(admin, "alice")
    alice = login(cp, "alice", PASSWORD)
    secret, recovery = enrol(alice)
    assert alice.get("/api/v1/auth/mfa").json()["totp_enabled"] is True
    assert_problem(alice.post("/api/v1/auth/mfa/totp"), 409, "already set up")

    r = attempt(cp, "alice", PASSWORD)
    body = assert_problem(r, 401)
    assert body["type"].endswith("/mfa-required") and "access_token" not in body
    token = body["mfa_token"]
    # the half-finished login is no access token, and an access token is no mfa_token
    with client(cp, token) as c:
        assert c.get("/api/v1/auth/me").status_code == 401
    assert_problem(
        verify(cp, alice.headers["authorization"][7:], code_at(secret, 1)), 401, "mfa_token"
    )
    assert_problem(verify(cp, token[:-3] + "abc", code_at(secret, 1)), 401, "mfa_token")
    assert_problem(verify(cp, token, "123456"), 401, "wrong")

    # the confirmation used the current step: the next one is still accepted (clock skew)
    nxt = code_at(secret, 1)
    r = verify(cp, token, nxt)
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] and r.json()["refresh_token"]
    # the same code a second time, even with a fresh login, is refused
    again = assert_problem(attempt(cp, "alice", PASSWORD), 401)["mfa_token"]
    assert_problem(verify(cp, again, nxt), 401, "already used")
    assert_problem(verify(cp, again, code_at(secret)), 401, "already used")  # older step
    # a recovery code works once
    r = verify(cp, again, recovery[0].upper())
    assert r.status_code == 200, r.text
    third = assert_problem(attempt(cp, "alice", PASSWORD), 401)["mfa_token"]
    assert_problem(verify(cp, third, recovery[0]), 401, "already used")
    assert alice.get("/api/v1/auth/mfa").json()["recovery_codes_left"] == 9

    # new recovery codes need a fresh TOTP code; the old ones stop working
    r = alice.post("/api/v1/auth/mfa/recovery-codes", json={"code": code_at(secret, 1)})
    assert_problem(r, 400, "already used")
    # the secret is stored sealed, not as the base32 the app was given
    (db_file,) = cp.settings.data_dir.rglob("*.db")
    with sqlite3.connect(db_file) as conn:
        (sealed,) = conn.execute("SELECT secret_sealed FROM mfa_totp").fetchone()
    assert secret not in sealed and secret.lower() not in sealed.lower()

    # turning it off needs the password; then the login is one step again
    assert_problem(alice.post("/api/v1/auth/mfa/totp/disable", json={"password": "nope"}), 403)
    r = alice.post("/api/v1/auth/mfa/totp/disable", json={"password": PASSWORD})
    assert r.status_code == 204, r.text
    assert attempt(cp, "alice", PASSWORD).status_code == 200


def test_guessing_codes_is_throttled(make_control_plane: Any) -> None:
    cp = make_control_plane(login_failures_before_delay=3, login_delay_seconds=30)
    admin = login(cp)
    add_user(admin, "bob")
    secret, _ = enrol(login(cp, "bob", PASSWORD))
    token = assert_problem(attempt(cp, "bob", PASSWORD), 401)["mfa_token"]
    statuses = [verify(cp, token, f"{n:06d}").status_code for n in range(6)]
    assert statuses[:3] == [401, 401, 401] and 429 in statuses[3:], statuses
    # even the right code waits its turn
    r = verify(cp, token, code_at(secret, 1))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_policy_leads_an_admin_through_enrolment_at_login(make_control_plane: Any) -> None:
    cp = make_control_plane(
        mfa_required_roles=["admin"], mfa_required_groups=["secure"], **NO_LIMIT
    )
    r = attempt(cp, "admin", ADMIN_PASSWORD)
    body = assert_problem(r, 401, "must use a second factor")
    assert body["type"].endswith("/mfa-enrolment-required")
    token = body["mfa_token"]
    assert_problem(verify(cp, token, "123456"), 401, "mfa_token")  # not a verify token
    with client(cp) as anon:
        r = anon.post("/api/v1/auth/mfa/totp", json={"mfa_token": token})
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        r = anon.post(
            "/api/v1/auth/mfa/totp/confirm", json={"mfa_token": token, "code": code_at(secret)}
        )
    assert r.status_code == 200, r.text
    assert len(r.json()["recovery_codes"]) == 10
    admin = client(cp, r.json()["login"]["access_token"])
    assert admin.get("/api/v1/auth/me").json()["username"] == "admin"
    assert admin.get("/api/v1/auth/mfa").json() | {"totp_confirmed_at": None} == {
        "totp_enabled": True,
        "totp_confirmed_at": None,
        "recovery_codes_left": 10,
        "passkeys": 0,
        "required": True,
    }
    assert_problem(
        admin.post("/api/v1/auth/mfa/totp/disable", json={"password": ADMIN_PASSWORD}),
        409,
        "cannot be turned off",
    )
    # the enrolment token cannot start a second set-up now that one is confirmed
    with client(cp) as anon:
        r = anon.post("/api/v1/auth/mfa/totp", json={"mfa_token": token})
        assert r.status_code == 409, r.text
    assert_problem(attempt(cp, "admin", ADMIN_PASSWORD), 401, "code")

    # a group can require it too; a user outside both logs in with the password alone
    carol_id = add_user(admin, "carol")
    dave_id = add_user(admin, "dave")
    r = admin.post("/api/v1/groups", json={"name": "secure"})
    gid = r.json()["id"]
    assert admin.put(f"/api/v1/groups/{gid}/members/{carol_id}").status_code == 200
    assert_problem(attempt(cp, "carol", PASSWORD), 401, "must use a second factor")
    assert attempt(cp, "dave", PASSWORD).status_code == 200

    # lost device: the admin resets dave's factor and dave is back to one step
    dave = login(cp, "dave", PASSWORD)
    enrol(dave)
    assert attempt(cp, "dave", PASSWORD).status_code == 401
    assert admin.delete(f"/api/v1/users/{dave_id}/mfa").status_code == 204
    assert attempt(cp, "dave", PASSWORD).status_code == 200
    with client(cp, dave.headers["authorization"][7:]) as c:
        assert c.delete(f"/api/v1/users/{carol_id}/mfa").status_code == 403
