"""Active sign-ins through the product: each login is listed with its device, address and
times; "sign out this one" and "sign out everywhere" end refresh and access tokens at once and
close open event streams; another user's sign-in is a 404; bad ids are problems."""

from __future__ import annotations

import threading
from typing import Any

import httpx
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
)

from conftest import ADMIN_PASSWORD, wait_for

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
CLI = "streamspace-cli/2.0 python-httpx/0.28"
USER_PASSWORD = "user-pass-12345"


def sign_in(cp: Any, agent: str, username: str = "admin", password: str = ADMIN_PASSWORD) -> Any:
    with client(cp) as c:
        r = c.post(
            "/api/v1/auth/login",
            json={"username": username, "password": password, "refresh_token_delivery": "body"},
            headers={"User-Agent": agent},
        )
    assert r.status_code == 200, r.text
    return r.json()


def refresh(cp: Any, token: str) -> httpx.Response:
    with client(cp) as c:
        return c.post("/api/v1/auth/refresh", json={"refresh_token": token})


def test_sign_ins_are_listed_and_end_one_at_a_time(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    laptop = sign_in(cp, FIREFOX)
    script = sign_in(cp, CLI)
    renewed = refresh(cp, script["refresh_token"])
    assert renewed.status_code == 200, renewed.text
    script = renewed.json()

    with client(cp, laptop["access_token"]) as c:
        listed = c.get("/api/v1/auth/sessions")
    assert listed.status_code == 200, listed.text
    rows = listed.json()
    assert len(rows) == 2
    by_device = {r["device"]: r for r in rows}
    assert set(by_device) == {"Firefox 133 on Linux", "streamspace-cli"}, rows
    firefox, cli = by_device["Firefox 133 on Linux"], by_device["streamspace-cli"]
    assert firefox["current"] is True and cli["current"] is False
    assert firefox["ip"] == "127.0.0.1" and firefox["method"] == "password"
    assert cli["user_agent"] == CLI
    assert cli["last_used_at"] > cli["created_at"]  # the refresh moved it on
    assert rows[0]["id"] == cli["id"]  # most recently used first

    # sign out the script's sign-in from the laptop: its tokens stop working at once
    with client(cp, laptop["access_token"]) as c:
        assert c.delete(f"/api/v1/auth/sessions/{cli['id']}").status_code == 204
    assert_problem(refresh(cp, script["refresh_token"]), 401)
    with client(cp, script["access_token"]) as c:
        assert_problem(c.get("/api/v1/auth/me"), 401)
    # the laptop's access token ended too, and its refresh token renews it
    with client(cp, laptop["access_token"]) as c:
        assert_problem(c.get("/api/v1/auth/me"), 401)
    again = refresh(cp, laptop["refresh_token"])
    assert again.status_code == 200, again.text
    with client(cp, again.json()["access_token"]) as c:
        rows = c.get("/api/v1/auth/sessions").json()
        assert [r["id"] for r in rows] == [firefox["id"]] and rows[0]["current"]
        # ended already, unknown, too long: problems
        assert_problem(c.delete(f"/api/v1/auth/sessions/{cli['id']}"), 404, "sign-in")
        assert_problem(c.delete("/api/v1/auth/sessions/nope"), 404)
        assert_problem(c.delete("/api/v1/auth/sessions/" + "x" * 65), 400, "too long")
        assert_problem(c.put(f"/api/v1/auth/sessions/{firefox['id']}"), 405)
        audit = c.get("/api/v1/audit", params={"action": "auth.sign_in_ended"}).json()
    assert audit["total"] == 1 and audit["items"][0]["resource_id"] == cli["id"]


def test_another_users_sign_in_is_a_404(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    admin = sign_in(cp, FIREFOX)
    with client(cp, admin["access_token"]) as c:
        r = c.post(
            "/api/v1/users", json={"username": "mallory", "password": USER_PASSWORD, "role": "user"}
        )
        assert r.status_code == 201, r.text
        admin_sign_in = c.get("/api/v1/auth/sessions").json()[0]["id"]
    mallory = sign_in(cp, CLI, "mallory", USER_PASSWORD)
    with client(cp, mallory["access_token"]) as c:
        assert [r["device"] for r in c.get("/api/v1/auth/sessions").json()] == ["streamspace-cli"]
        assert_problem(c.delete(f"/api/v1/auth/sessions/{admin_sign_in}"), 404)
    assert refresh(cp, admin["refresh_token"]).status_code == 200  # untouched
    with client(cp) as anon:
        assert_problem(anon.get("/api/v1/auth/sessions"), 401)
        assert_problem(anon.post("/api/v1/auth/sessions/revoke-all"), 401)


def test_sign_out_everywhere_ends_every_token_and_closes_streams(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    one, two = sign_in(cp, FIREFOX), sign_in(cp, CLI)
    user_id = one["user"]["id"]
    ended = threading.Event()

    def watch_events() -> None:
        with client(cp, two["access_token"]) as c, c.stream("GET", "/api/v1/events") as r:
            assert r.status_code == 200
            for _ in r.iter_bytes():
                pass
        ended.set()

    watcher = threading.Thread(target=watch_events, daemon=True)
    watcher.start()
    wait_for(lambda: cp.state.revocations.open_count(user_id) == 1, 10, what="stream open")
    with client(cp, one["access_token"]) as c:
        r = c.post("/api/v1/auth/sessions/revoke-all")
    assert r.status_code == 204, r.text
    assert ended.wait(10), "the event stream stayed open"
    for tokens in (one, two):
        assert_problem(refresh(cp, tokens["refresh_token"]), 401)
        with client(cp, tokens["access_token"]) as c:
            assert_problem(c.get("/api/v1/auth/me"), 401)
    fresh = sign_in(cp, FIREFOX)
    with client(cp, fresh["access_token"]) as c:
        assert len(c.get("/api/v1/auth/sessions").json()) == 1
        audit = c.get("/api/v1/audit", params={"action": "auth.sign_out_everywhere"}).json()
    assert audit["total"] == 1
