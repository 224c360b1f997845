"""Auth API against a real control plane: login, rotating refresh tokens with replay detection,
logout, /me, password change, login rate limits, disabled users and the first-start admin."""

from __future__ import annotations

from typing import Any

import httpx
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

from conftest import ADMIN_PASSWORD


def attempt(cp: Any, username: str, password: str, delivery: str = "cookie") -> httpx.Response:
    body = {"username": username, "password": password, "refresh_token_delivery": delivery}
    with client(cp) as c:
        return c.post("/api/v1/auth/login", json=body)


def cli_tokens(cp: Any, username: str = "admin", password: str = ADMIN_PASSWORD) -> Any:
    """Log in as a non-browser client does: the refresh token comes in the body."""
    r = attempt(cp, username, password, "body")
    assert r.status_code == 200, r.text
    return r.json()


def test_first_start_admin_login_and_me(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    r = attempt(cp, "admin", ADMIN_PASSWORD)
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] > 0
    assert tokens["access_token"]
    # a browser login: the refresh token is a cookie, never in the JSON a page script reads
    assert "refresh_token" not in tokens
    refresh_cookie = r.cookies["streamspace_refresh"]
    assert refresh_cookie and refresh_cookie not in r.text
    assert tokens["user"]["username"] == "admin"
    assert tokens["user"]["role"] == "admin"
    assert tokens["user"]["is_active"] is True
    assert "password_hash" not in tokens["user"]

    with client(cp, tokens["access_token"]) as admin:
        me = admin.get("/api/v1/auth/me")
        assert me.status_code == 200, me.text
        assert me.json()["username"] == "admin"
        assert me.json()["id"] == tokens["user"]["id"]
        # exactly one user exists after the first start: the bootstrap admin
        users = admin.get("/api/v1/users").json()
        assert [u["username"] for u in users["items"]] == ["admin"]

    # wrong password, unknown user: 401 problem JSON, same message (no user enumeration)
    wrong = assert_problem(attempt(cp, "admin", "not-the-password"), 401)
    ghost = assert_problem(attempt(cp, "nobody-here", "whatever-123"), 401)
    assert wrong["detail"] == ghost["detail"]

    # /me without or with a garbage token
    with client(cp) as anon:
        assert_problem(anon.get("/api/v1/auth/me"), 401)
    with client(cp, "not.a.jwt") as bogus:
        assert_problem(bogus.get("/api/v1/auth/me"), 401)
    # the refresh token is not an access token
    with client(cp, refresh_cookie) as wrong_kind:
        assert_problem(wrong_kind.get("/api/v1/auth/me"), 401)


def test_refresh_rotation_and_reuse_revokes_the_family(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    first = cli_tokens(cp)
    # an unrelated login (another family) must survive the replay below
    other = cli_tokens(cp)

    with client(cp) as anon:
        r1 = anon.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
        assert r1.status_code == 200, r1.text
        second = r1.json()
        assert second["refresh_token"] != first["refresh_token"]
        assert second["access_token"]
        with client(cp, second["access_token"]) as c:
            assert c.get("/api/v1/auth/me").status_code == 200

        # replaying the already-used token: 401, and the whole family is revoked
        replay = anon.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
        assert_problem(replay, 401, "already used")
        after = anon.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
        assert_problem(after, 401)

        # the other family is untouched
        r3 = anon.post("/api/v1/auth/refresh", json={"refresh_token": other["refresh_token"]})
        assert r3.status_code == 200, r3.text

        # garbage refresh tokens
        assert_problem(anon.post("/api/v1/auth/refresh", json={"refresh_token": "x" * 40}), 401)


def test_logout_revokes_refresh_and_access_tokens(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    tokens = cli_tokens(cp)
    second = cli_tokens(cp)
    with client(cp, tokens["access_token"]) as c:
        assert c.get("/api/v1/auth/me").status_code == 200
        r = c.post("/api/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]})
        assert r.status_code == 204, r.text
        # the access token is dead (token_version bump), and so is every other one
        assert_problem(c.get("/api/v1/auth/me"), 401, "revoked")
    with client(cp, second["access_token"]) as c2:
        assert_problem(c2.get("/api/v1/auth/me"), 401)
    with client(cp) as anon:
        for refresh in (tokens["refresh_token"], second["refresh_token"]):
            r = anon.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
            assert_problem(r, 401)
        # logging out anonymously is a 401
        assert_problem(anon.post("/api/v1/auth/logout", json={}), 401)
    # logging in again works
    assert attempt(cp, "admin", ADMIN_PASSWORD).status_code == 200


def test_password_change(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    with login(cp) as admin:
        r = admin.post("/api/v1/users", json={"username": "carol", "password": "carol-pass-1"})
        assert r.status_code == 201, r.text
    tokens = cli_tokens(cp, "carol", "carol-pass-1")
    with client(cp, tokens["access_token"]) as c:
        wrong = c.post(
            "/api/v1/auth/password",
            json={"current_password": "not-it-123", "new_password": "carol-pass-2"},
        )
        assert_problem(wrong, 403, "current password")
        # still logged in after a failed attempt
        assert c.get("/api/v1/auth/me").status_code == 200
        too_short = c.post(
            "/api/v1/auth/password",
            json={"current_password": "carol-pass-1", "new_password": "short"},
        )
        assert_problem(too_short, 422, "new_password")
        ok = c.post(
            "/api/v1/auth/password",
            json={
                "current_password": "carol-pass-1",
                "new_password": "carol-pass-2",
                "refresh_token_delivery": "body",
            },
        )
        assert ok.status_code == 200, ok.text
        fresh = ok.json()
        assert fresh["refresh_token"]
        # the old access token is rejected right away
        assert_problem(c.get("/api/v1/auth/me"), 401)
    # the old refresh token too
    with client(cp) as anon:
        r = anon.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert_problem(r, 401)
    # the tokens returned by the change work
    with client(cp, fresh["access_token"]) as c:
        assert c.get("/api/v1/auth/me").json()["username"] == "carol"
    assert_problem(attempt(cp, "carol", "carol-pass-1"), 401)
    assert attempt(cp, "carol", "carol-pass-2").status_code == 200


def test_disabled_user_cannot_log_in(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    with login(cp) as admin:
        r = admin.post("/api/v1/users", json={"username": "dave", "password": "dave-pass-12"})
        assert r.status_code == 201, r.text
        tokens = cli_tokens(cp, "dave", "dave-pass-12")
        dave = client(cp, tokens["access_token"])
        assert dave.get("/api/v1/auth/me").status_code == 200
        r = admin.patch("/api/v1/users/dave", json={"is_active": False})
        assert r.status_code == 200, r.text
        assert r.json()["is_active"] is False
        # an existing access token stops working at once, and so does the refresh token
        assert_problem(dave.get("/api/v1/auth/me"), 401)
        with client(cp) as anon:
            r = anon.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
            assert_problem(r, 401)
        assert_problem(attempt(cp, "dave", "dave-pass-12"), 401, "disabled")
        r = admin.patch("/api/v1/users/dave", json={"is_active": True})
        assert r.status_code == 200, r.text
    assert attempt(cp, "dave", "dave-pass-12").status_code == 200
    dave.close()


THROTTLE = {"login_failures_before_delay": 3, "login_delay_seconds": 30}


def test_login_throttle_per_username_and_client(make_control_plane: Any) -> None:
    cp = make_control_plane(**THROTTLE)
    # an account that does not exist, so no admin login is needed to set it up
    for _ in range(3):
        assert_problem(attempt(cp, "mallory", "guess-123"), 401)
    limited = assert_problem(attempt(cp, "mallory", "guess-123"), 429)
    assert "try again" in limited["detail"]
    retry_after = attempt(cp, "mallory", "guess-123").headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= 30
    # the username is case-folded for the limit
    assert_problem(attempt(cp, "MALLORY", "guess-123"), 429)
    # another username from the same client is judged on its own failures
    assert_problem(attempt(cp, "trudy", "guess-123"), 401)


def test_login_throttle_does_not_lock_out_other_users(make_control_plane: Any) -> None:
    """One user's failed attempts must not lock everyone else (same IP) out of logging in."""
    cp = make_control_plane(**THROTTLE)
    for _ in range(3):
        assert_problem(attempt(cp, "mallory", "guess-123"), 401)
    assert_problem(attempt(cp, "mallory", "guess-123"), 429)
    r = attempt(cp, "admin", ADMIN_PASSWORD)
    assert r.status_code == 200, f"admin locked out by mallory's failures: {r.text}"


def test_successful_logins_are_not_throttled(make_control_plane: Any) -> None:
    """The throttle counts failures: many correct logins in a row all succeed, even with a
    per-IP cap of 3 failures a minute."""
    cp = make_control_plane(login_ip_failures_per_minute=3, **THROTTLE)
    codes = [attempt(cp, "admin", ADMIN_PASSWORD).status_code for _ in range(6)]
    assert codes == [200] * 6, codes
