"""The per-replica cache of authenticated users (controlplane/authcache.py): repeat requests skip
the user read, changes made through this replica apply at once, changes made elsewhere within the
configured number of seconds. Both databases: GETs run in autocommit on PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

from api_support import NO_LIMIT, assert_problem, client, login
from sqlalchemy import text

PASSWORD = "cache-user-pass"


def _user(cp: Any, name: str) -> tuple[str, str]:
    with login(cp) as admin:
        r = admin.post("/api/v1/users", json={"username": name, "password": PASSWORD})
        assert r.status_code == 201, r.text
        user_id = r.json()["id"]
    with client(cp) as anon:
        r = anon.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
    return user_id, r.json()["access_token"]


def _set_inactive_behind_the_orm(cp: Any, user_id: str) -> None:
    """What another replica's change looks like from here: a write no mapper event of this
    process sees."""

    async def apply() -> None:
        async with cp.state.engine.begin() as conn:
            await conn.execute(
                text("UPDATE users SET is_active = false WHERE id = :id"), {"id": user_id}
            )

    cp.run(apply())


def test_repeat_requests_hit_the_cache_and_api_changes_apply_at_once(
    db_url: str, make_control_plane: Any
) -> None:
    cp = make_control_plane(database_url=db_url, **NO_LIMIT)
    cache = cp.state.auth_cache
    user_id, token = _user(cp, "cached")
    with client(cp, token) as c:
        assert c.get("/api/v1/auth/me").json()["id"] == user_id
        hits = cache.hits
        for _ in range(5):
            assert c.get("/api/v1/sessions").status_code == 200
        assert cache.hits == hits + 5

        # A write through the cached row lands in the database (merge, not a stale copy) ...
        r = c.post(
            "/api/v1/auth/password",
            json={"current_password": PASSWORD, "new_password": "another-pass-123"},
        )
        assert r.status_code == 200, r.text
        # ... and revokes the old token on the very next request.
        assert_problem(c.get("/api/v1/auth/me"), 401, "revoked")
        token = r.json()["access_token"]

    with client(cp, token) as c:
        assert c.get("/api/v1/auth/me").status_code == 200
        with login(cp) as admin:
            r = admin.patch(f"/api/v1/users/{user_id}", json={"is_active": False})
            assert r.status_code == 200, r.text
        assert_problem(c.get("/api/v1/auth/me"), 401)


def test_changes_made_elsewhere_apply_within_the_configured_seconds(
    db_url: str, make_control_plane: Any
) -> None:
    cp = make_control_plane(database_url=db_url, auth_cache_seconds=1.0, **NO_LIMIT)
    user_id, token = _user(cp, "elsewhere")
    with client(cp, token) as c:
        assert c.get("/api/v1/auth/me").status_code == 200
        _set_inactive_behind_the_orm(cp, user_id)
        deadline = time.monotonic() + 5
        while c.get("/api/v1/auth/me").status_code == 200:
            assert time.monotonic() < deadline, "a disabled user stayed signed in for 5 s"
            time.sleep(0.1)
        assert_problem(c.get("/api/v1/auth/me"), 401, "disabled")


def test_cache_off(db_url: str, make_control_plane: Any) -> None:
    cp = make_control_plane(database_url=db_url, auth_cache_seconds=0, **NO_LIMIT)
    user_id, token = _user(cp, "uncached")
    with client(cp, token) as c:
        assert c.get("/api/v1/auth/me").status_code == 200
        _set_inactive_behind_the_orm(cp, user_id)
        assert_problem(c.get("/api/v1/auth/me"), 401, "disabled")
    assert cp.state.auth_cache.hits == 0
