"""Quotas: per-user session/CPU/memory limits, group limits, usage, and concurrent creates."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)
from sqlalchemy import func, select

from streamspace.db.models import Session as SessionRow
from streamspace.db.models import User

PASSWORD = "user-pass-123"


def add_user(
    cp: Any, admin: httpx.Client, name: str, quota: dict[str, int] | None = None
) -> httpx.Client:
    r = admin.post("/api/v1/users", json={"username": name, "password": PASSWORD})
    assert r.status_code == 201, r.text
    if quota:
        r = admin.put(f"/api/v1/users/{name}/quota", json=quota)
        assert r.status_code == 200, r.text
    return login(cp, name, PASSWORD)


def quota(
    sessions: int, cpu: int = 100_000, mem: int = 100_000, home: int | None = None
) -> dict[str, int | None]:
    return {
        "max_sessions": sessions,
        "max_cpu_millis": cpu,
        "max_memory_mb": mem,
        "max_home_mb": home,
    }


def create(client: httpx.Client, **extra: Any) -> httpx.Response:
    return client.post("/api/v1/sessions", json={"template": "xterm", **extra})


def active_in_db(cp: Any, *usernames: str) -> int:
    async def count() -> int:
        async with cp.state.db() as db:
            return int(
                await db.scalar(
                    select(func.count(SessionRow.id))
                    .join(User, User.id == SessionRow.owner_id)
                    .where(
                        User.username.in_(usernames), SessionRow.state.not_in(["stopped", "failed"])
                    )
                )
                or 0
            )

    return int(cp.run(count()))


def test_session_quota_and_usage(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        user = add_user(cp, admin, "quinn", quota=quota(2))
        r = admin.get("/api/v1/users/quinn/quota")
        assert r.status_code == 200 and r.json()["limits"]["max_sessions"] == 2
    me = user.get("/api/v1/me/quota").json()
    assert me["source"] == "user quota"
    assert me["limits"] == quota(2)
    assert (me["used_sessions"], me["used_cpu_millis"], me["used_memory_mb"]) == (0, 0, 0)

    first = create(user)
    assert first.status_code == 201, first.text
    assert create(user).status_code == 201
    body = assert_problem(create(user), 403, "2 active sessions", "quota")
    assert body["type"].endswith("quota-exceeded"), body
    me = user.get("/api/v1/me/quota").json()
    assert me["used_sessions"] == 2
    assert me["used_cpu_millis"] == 1000 and me["used_memory_mb"] == 1024  # 2 x xterm
    assert active_in_db(cp, "quinn") == 2

    # stopping one frees a slot
    assert user.delete(f"/api/v1/sessions/{first.json()['id']}").status_code == 202
    assert user.get("/api/v1/me/quota").json()["used_sessions"] == 1
    assert create(user).status_code == 201
    assert_problem(create(user), 403, "quota")

    # default quota for users without their own
    with login(cp) as admin:
        assert admin.delete("/api/v1/users/quinn/quota").status_code == 204
    me = user.get("/api/v1/me/quota").json()
    assert me["source"] == "default quota"
    assert me["limits"]["max_sessions"] == cp.settings.default_quota_sessions
    user.close()


def test_cpu_and_memory_quota(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        user = add_user(cp, admin, "cora", quota=quota(10, cpu=1000, mem=2048))
    assert create(user, resources={"cpu_millis": 600, "memory_mb": 256}).status_code == 201
    assert_problem(create(user, resources={"cpu_millis": 600, "memory_mb": 256}), 403, "mCPU")
    assert create(user, resources={"cpu_millis": 400, "memory_mb": 256}).status_code == 201
    # CPU is used up exactly: even the smallest request is refused
    assert_problem(create(user, resources={"cpu_millis": 100, "memory_mb": 64}), 403, "1000")
    me = user.get("/api/v1/me/quota").json()
    assert (me["used_cpu_millis"], me["used_memory_mb"]) == (1000, 512)
    with login(cp) as admin:
        r = admin.put("/api/v1/users/cora/quota", json=quota(10, cpu=100_000, mem=2048))
        assert r.status_code == 200, r.text
    body = assert_problem(create(user, resources={"memory_mb": 2000}), 403, "MiB")
    assert "2000" in body["detail"]
    # the template's default memory (512 MiB for xterm) counts when the body gives none
    assert create(user).status_code == 201
    assert create(user, resources={"memory_mb": 1024}).status_code == 201
    assert_problem(create(user), 403, "memory")
    assert user.get("/api/v1/me/quota").json()["used_memory_mb"] == 2048
    user.close()


def test_group_quota_limits_members_total(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    admin = login(cp)
    m1 = add_user(cp, admin, "gina")
    m2 = add_user(cp, admin, "gus")
    outsider = add_user(cp, admin, "olga")
    r = admin.post("/api/v1/groups", json={"name": "team", "description": "shared"})
    assert r.status_code == 201, r.text
    gid = r.json()["id"]
    for name in ("gina", "gus"):
        r = admin.put(f"/api/v1/groups/{gid}/members/{name}")
        assert r.status_code == 200, r.text
    r = admin.put(f"/api/v1/groups/{gid}/quota", json=quota(3))
    assert r.status_code == 200, r.text
    group = admin.get(f"/api/v1/groups/{gid}").json()
    assert group["members"] == ["gina", "gus"] and group["quota"] == quota(3)

    assert create(m1).status_code == 201
    gus_first = create(m2)
    assert gus_first.status_code == 201
    assert create(m1).status_code == 201
    # 3 in the group: neither member may start another, though each is far below 5
    assert_problem(create(m1), 403, "team")
    assert_problem(create(m2), 403, "team")
    assert create(outsider).status_code == 201
    # a stop frees a slot for the whole group
    assert m2.delete(f"/api/v1/sessions/{gus_first.json()['id']}").status_code == 202
    assert create(m1).status_code == 201
    assert_problem(create(m2), 403, "group")
    # leaving the group lifts the group's limit
    r = admin.delete(f"/api/v1/groups/{gid}/members/gus")
    assert r.status_code == 200 and r.json()["members"] == ["gina"]
    assert create(m2).status_code == 201
    # removing the group quota lifts it for the rest
    assert admin.delete(f"/api/v1/groups/{gid}/quota").status_code == 204
    assert create(m1).status_code == 201
    for c in (admin, m1, m2, outsider):
        c.close()


def fire(cp: Any, tokens: list[str], per_token: int) -> list[int]:
    """POST /api/v1/sessions concurrently: per_token requests for each token, released at once."""
    clients = [client(cp, t) for t in tokens]  # thread-safe; one connection per request
    jobs = [c for c in clients for _ in range(per_token)]
    barrier = threading.Barrier(len(jobs))
    codes: list[int] = [0] * len(jobs)
    errors: list[str] = []

    def run(i: int, client: httpx.Client) -> None:
        barrier.wait(10)
        try:
            r = client.post("/api/v1/sessions", json={"template": "xterm"})
            codes[i] = r.status_code
            if r.status_code not in (201, 403):
                errors.append(r.text[:200])
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    assert not errors, errors
    return codes


def token_of(cp: Any, name: str) -> str:
    with client(cp) as c:
        r = c.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])


def _race(cp: Any) -> None:
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        for name in ("racer", "ann", "ben"):
            r = admin.post("/api/v1/users", json={"username": name, "password": PASSWORD})
            assert r.status_code == 201, r.text
        assert admin.put("/api/v1/users/racer/quota", json=quota(3)).status_code == 200
        gid = admin.post("/api/v1/groups", json={"name": "racers"}).json()["id"]
        for name in ("ann", "ben"):
            assert admin.put(f"/api/v1/groups/{gid}/members/{name}").status_code == 200
        assert admin.put(f"/api/v1/groups/{gid}/quota", json=quota(3)).status_code == 200

    codes = fire(cp, [token_of(cp, "racer")], 10)
    assert sorted(codes) == [201] * 3 + [403] * 7, codes
    assert active_in_db(cp, "racer") == 3

    # two members of one group racing for the group's 3 slots
    codes = fire(cp, [token_of(cp, "ann"), token_of(cp, "ben")], 5)
    assert sorted(codes) == [201] * 3 + [403] * 7, codes
    assert active_in_db(cp, "ann", "ben") == 3


RACE = {**NO_LIMIT, "user_concurrent_creates": 0}
"""The race is one user's 10 creates at once: the per-user limit on creations under way (per
replica, so several replicas still race) would refuse most of them before the quota is read."""


def test_quota_race_postgres(pg_url: str, make_control_plane: Any) -> None:
    _race(make_control_plane(database_url=pg_url, **RACE))


def test_quota_race_sqlite(tmp_path: Path, make_control_plane: Any) -> None:
    _race(make_control_plane(database_url=f"sqlite+aiosqlite:///{tmp_path / 'race.db'}", **RACE))


def test_home_size_limit_is_the_smallest_quota_and_reaches_the_agent(
    control_plane: Any,
) -> None:
    cp = control_plane
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        alice = add_user(cp, admin, "hanna", quota(5, home=700))
        r = admin.post("/api/v1/groups", json={"name": "small-homes"})
        assert r.status_code == 201, r.text
        gid = r.json()["id"]
        assert admin.put(f"/api/v1/groups/{gid}/members/hanna").status_code == 200
        r = admin.put(f"/api/v1/groups/{gid}/quota", json=quota(50, home=300))
        assert r.status_code == 200 and r.json()["max_home_mb"] == 300, r.text
        r = admin.put("/api/v1/users/hanna/quota", json={**quota(5), "max_home_mb": 0})
        assert_problem(r, 422)  # a limit of nothing is refused, not stored
    with alice:
        assert alice.get("/api/v1/me/quota").json()["limits"]["max_home_mb"] == 700
        r = create(alice)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]

    async def spec_limit() -> tuple[int | None, int | None]:
        async with cp.state.db() as db:
            row = await db.get(SessionRow, sid)
            assert row is not None
            spec = await cp.state.lifecycle.transitions.build_spec(db, row)
            return row.home_limit_mb, spec.home_limit_mb

    assert cp.run(spec_limit()) == (300, 300)
