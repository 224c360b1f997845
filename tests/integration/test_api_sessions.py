"""Sessions API on SQLite and PostgreSQL. No agent is connected, so sessions stay pending."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
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
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from conftest import wait_for
from streamspace.controlplane.lifecycle import ACTION_ATTEMPTS
from streamspace.db.models import Agent, AgentCommand, SessionEvent, User
from streamspace.db.models import Session as SessionRow

BIG_QUOTA = {"max_sessions": 50, "max_cpu_millis": 1_000_000, "max_memory_mb": 1_000_000}


def add_user(
    cp: Any, admin: httpx.Client, name: str, quota: dict[str, int] | None = None, role: str = "user"
) -> httpx.Client:
    r = admin.post(
        "/api/v1/users", json={"username": name, "password": "user-pass-123", "role": role}
    )
    assert r.status_code == 201, r.text
    if quota:
        r = admin.put(f"/api/v1/users/{name}/quota", json=quota)
        assert r.status_code == 200, r.text
    return login(cp, name, "user-pass-123")


def db_count(cp: Any, username: str, active_only: bool = False) -> int:
    async def count() -> int:
        async with cp.state.db() as db:
            stmt = (
                select(func.count(SessionRow.id))
                .join(User, User.id == SessionRow.owner_id)
                .where(User.username == username)
            )
            if active_only:
                stmt = stmt.where(SessionRow.state.not_in(["stopped", "failed"]))
            return int(await db.scalar(stmt) or 0)

    return int(cp.run(count()))


def test_create_and_get(db_url: str, make_control_plane: Any) -> None:
    cp = make_control_plane(database_url=db_url, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        user = add_user(cp, admin, "ursula")
    r = user.post(
        "/api/v1/sessions",
        json={
            "template": "xterm",
            "tags": ["work", "work", "a:b"],
            "resources": {"cpu_millis": 700},
        },
    )
    assert r.status_code == 201, r.text
    created = r.json()
    sid = created["id"]
    assert r.headers["location"] == f"/api/v1/sessions/{sid}"
    assert created["state"] == "pending"
    assert created["owner"] == "ursula"
    assert created["template"] == "xterm"
    assert created["tags"] == ["work", "a:b"]  # de-duplicated, order kept
    assert created["resources"] == {"cpu_millis": 700, "memory_mb": 512}  # memory from template
    assert created["allowed_actions"] == ["stop"]
    assert created["agent_id"] is None
    assert created["status_message"], "a pending session must say why it waits"

    # the placer runs and records the reason: there is no agent
    def waiting() -> dict[str, Any] | None:
        body: dict[str, Any] = user.get(f"/api/v1/sessions/{sid}").json()
        return body if "no agent" in body["status_message"] else None

    got = wait_for(waiting, timeout=15, what="status_message to mention 'no agent'")
    assert got["state"] == "pending"
    kinds = [e["kind"] for e in got["events"]]
    assert kinds[0] == "created", kinds
    assert "queued" in kinds, kinds
    assert "xterm" in got["events"][0]["message"]
    # the list view has no events, the detail view has them
    listed = user.get("/api/v1/sessions").json()["items"]
    assert [s["id"] for s in listed] == [sid]
    assert listed[0]["events"] is None
    assert_problem(user.get("/api/v1/sessions/" + "f" * 32), 404, "f" * 32)
    user.close()


def test_list_pagination_and_filters(db_url: str, make_control_plane: Any) -> None:
    cp = make_control_plane(database_url=db_url, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        user = add_user(cp, admin, "paula", quota=BIG_QUOTA)
    ids = []
    for i in range(7):
        body = {
            "template": "firefox" if i % 3 == 0 else "xterm",
            "tags": ["even"] if i % 2 == 0 else ["odd", "team/x"],
        }
        r = user.post("/api/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])

    seen: list[str] = []
    offset: int | None = 0
    pages = []
    while offset is not None:
        r = user.get("/api/v1/sessions", params={"limit": 3, "offset": offset})
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["total"] == 7 and page["limit"] == 3 and page["offset"] == offset
        pages.append(len(page["items"]))
        seen += [s["id"] for s in page["items"]]
        offset = page["next_offset"]
        assert len(pages) <= 3, "pagination does not terminate"
    assert pages == [3, 3, 1]
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 7
    assert seen == list(reversed(ids)), "newest first"
    beyond = user.get("/api/v1/sessions", params={"limit": 3, "offset": 9}).json()
    assert beyond["items"] == [] and beyond["total"] == 7 and beyond["next_offset"] is None

    # stop two
    for sid in ids[:2]:
        assert user.delete(f"/api/v1/sessions/{sid}").status_code == 202

    # xterm sessions are 1, 2, 4, 5; firefox 0, 3, 6; odd tags on 1, 3, 5; 0 and 1 stopped
    checks: list[tuple[dict[str, Any], set[str]]] = [
        ({"state": "stopped"}, set(ids[:2])),
        ({"state": "pending"}, set(ids[2:])),
        ({"state": "pending,stopped"}, set(ids)),
        ({"state": "running"}, set()),
        ({"active": "true"}, set(ids[2:])),
        ({"active": "false"}, set(ids[:2])),
        ({"template": "firefox"}, {ids[i] for i in (0, 3, 6)}),
        ({"template": "firefox", "active": "true"}, {ids[3], ids[6]}),
        ({"tag": "even"}, {ids[i] for i in (0, 2, 4, 6)}),
        ({"tag": "team/x"}, {ids[i] for i in (1, 3, 5)}),
        ({"tag": "nope"}, set()),
        ({"template": "xterm", "tag": "odd", "state": "pending"}, {ids[5]}),
    ]
    failures = []
    for params, expected in checks:
        r = user.get("/api/v1/sessions", params={"limit": 200, **params})
        if r.status_code != 200:
            failures.append(f"{params}: {r.status_code} {r.text[:160]}")
            continue
        body = r.json()
        got = {s["id"] for s in body["items"]}
        if got != expected or body["total"] != len(expected):
            failures.append(
                f"{params}: got {len(got)} (total {body['total']}), expected {len(expected)}"
            )
    assert not failures, "list filters:\n" + "\n".join(failures)
    user.close()


def test_patch_stop_and_state_conflicts(db_url: str, make_control_plane: Any) -> None:
    cp = make_control_plane(database_url=db_url, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        user = add_user(cp, admin, "stella")
    sid = user.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]
    url = f"/api/v1/sessions/{sid}"

    r = user.patch(url, json={"tags": ["b", "a", "b"], "idle_timeout_seconds": 900})
    assert r.status_code == 200, r.text
    assert r.json()["tags"] == ["b", "a"]
    assert r.json()["idle_timeout_seconds"] == 900
    r = user.patch(url, json={"tags": []})
    assert r.status_code == 200 and r.json()["tags"] == []
    assert_problem(user.patch(url, json={"tags": ["no spaces"]}), 422, "tag")
    assert_problem(user.patch(url, json={"max_duration_seconds": 3600}), 403, "admin")
    assert user.get(url).json()["max_duration_seconds"] != 3600

    for action in ("hibernate", "wake", "connect"):
        body = assert_problem(user.post(f"{url}/{action}"), 409)
        assert body["current_state"] == "pending", body
        assert "pending" in body["detail"], body
    assert user.get(url).json()["state"] == "pending"

    r = user.delete(url)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "stopped"
    assert r.json()["allowed_actions"] == []
    again = user.delete(url)
    assert again.status_code == 202, again.text
    assert again.json()["state"] == "stopped"
    got = user.get(url).json()
    assert got["state"] == "stopped"
    assert [e["kind"] for e in got["events"]].count("stopped") == 1, got["events"]
    for action in ("hibernate", "wake", "connect"):
        body = assert_problem(user.post(f"{url}/{action}"), 409)
        assert body["current_state"] == "stopped", body
    user.close()


def test_idempotency_key(db_url: str, make_control_plane: Any) -> None:
    cp = make_control_plane(database_url=db_url, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        ida = add_user(cp, admin, "ida")
        ivan = add_user(cp, admin, "ivan")
    key = {"Idempotency-Key": "create-once-7f3a"}
    first = ida.post("/api/v1/sessions", json={"template": "xterm"}, headers=key)
    assert first.status_code == 201, first.text
    second = ida.post("/api/v1/sessions", json={"template": "xterm"}, headers=key)
    assert second.status_code in (200, 201), second.text
    assert second.json()["id"] == first.json()["id"]
    assert ida.get("/api/v1/sessions").json()["total"] == 1
    assert db_count(cp, "ida") == 1
    # a different key creates a new session
    other = ida.post(
        "/api/v1/sessions", json={"template": "xterm"}, headers={"Idempotency-Key": "another-key"}
    )
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    # keys are per user: the same key for somebody else is a different session
    theirs = ivan.post("/api/v1/sessions", json={"template": "xterm"}, headers=key)
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["id"] != first.json()["id"]
    assert theirs.json()["owner"] == "ivan"
    assert db_count(cp, "ida") == 2 and db_count(cp, "ivan") == 1
    ida.close()
    ivan.close()


def test_concurrent_creates_with_one_key_make_one_session(
    db_url: str, make_control_plane: Any
) -> None:
    """The second look for the key, after the quota lock or the writer turn, answers with the
    winner's session: one row, one 201, the others 200 with its id (or 409 while the winner's
    insert is not committed yet)."""
    cp = make_control_plane(database_url=db_url, user_concurrent_creates=8, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        ida = add_user(cp, admin, "ida", quota=BIG_QUOTA)
    key = {"Idempotency-Key": "create-once-race"}

    def send(_: int) -> httpx.Response:
        return ida.post("/api/v1/sessions", json={"template": "xterm"}, headers=key)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, range(6)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 201, 409} and codes.count(201) == 1, codes
    ids = {r.json()["id"] for r in answers if r.status_code != 409}
    assert len(ids) == 1, ids
    for r in answers:
        if r.status_code == 200:
            assert r.json()["template"] == "xterm" and r.json()["state"] == "pending", r.json()
            assert "location" not in r.headers
    assert db_count(cp, "ida") == 1
    ida.close()


def add_agent(db: AsyncSession, name: str, **columns: Any) -> Agent:
    """An agent row with no agent process behind it."""
    agent = Agent(
        name=name,
        cluster_id="c1",
        cluster_name="c1",
        backend="local",
        credential_hash="x",
        **columns,
    )
    db.add(agent)
    return agent


def test_concurrent_actions_on_one_session_send_each_command_once(
    db_url: str, make_control_plane: Any
) -> None:
    """Hibernates and stops race on one running session: every request answers 202 or 409,
    and each transition (with its command) happens once — no request decides on a state that
    another has already left."""
    cp = make_control_plane(database_url=db_url, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        user = add_user(cp, admin, "rita")
    sid = user.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]

    async def make_running() -> None:
        async with cp.state.db() as db:
            agent = add_agent(db, "offline-agent")
            await db.flush()
            await db.execute(
                update(SessionRow)
                .where(SessionRow.id == sid)
                .values(state="running", agent_id=agent.id, status_message="")
            )
            await db.commit()

    cp.run(make_running())
    token = user.headers["Authorization"].split()[1]
    url = f"/api/v1/sessions/{sid}"
    requests = [("POST", f"{url}/hibernate"), ("DELETE", url)] * 4

    def send(req: tuple[str, str]) -> httpx.Response:
        with client(cp, token) as c:
            return c.request(*req)

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(send, requests))
    assert {r.status_code for r in answers} <= {202, 409}, [r.text for r in answers]

    async def written() -> tuple[list[str], list[str]]:
        async with cp.state.db() as db:
            cmds = await db.scalars(
                select(AgentCommand.action).where(AgentCommand.session_id == sid)
            )
            kinds = await db.scalars(
                select(SessionEvent.kind)
                .where(SessionEvent.session_id == sid)
                .order_by(SessionEvent.id)
            )
            return sorted(cmds.all()), list(kinds.all())

    commands, kinds = cp.run(written())
    assert commands in (["stop"], ["hibernate", "stop"]), (commands, kinds)
    assert kinds.count("stopping") == 1 and kinds.count("hibernating") <= 1, kinds
    assert user.get(url).json()["state"] == "stopping"
    user.close()


def test_a_placement_round_does_not_resurrect_a_session_stopped_meanwhile(
    pg_url: str, make_control_plane: Any
) -> None:
    """The placer reads a pending session, the user stops it, then the placer writes: the
    session stays stopped and no start command is left for the agent. (PostgreSQL: on SQLite
    the one writer at a time cannot be split between a read and a write like this.)"""
    cp = make_control_plane(database_url=pg_url, loop_interval_seconds=3600, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        user = add_user(cp, admin, "paula")
    sid = user.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]
    wait_for(
        lambda: "waiting" in user.get(f"/api/v1/sessions/{sid}").json()["status_message"],
        what="the placer to find no agent",
    )
    lc = cp.state.lifecycle

    async def race() -> int:
        async with cp.state.db() as db:
            add_agent(
                db,
                "idle-agent",
                connected_replica=cp.state.replica_id,
                last_seen=datetime.now(UTC),
                templates=["xterm"],
                capacity_sessions=10,
                capacity_cpu_millis=100_000,
                capacity_memory_mb=100_000,
            )
            await db.commit()
        async with cp.state.write_db() as placer_db:
            pending = await lc.placement._pending(placer_db, 10)
            assert [s.id for s in pending] == [sid]
            async with cp.state.db() as db:
                await db.execute(
                    update(SessionRow).where(SessionRow.id == sid).values(state="stopped")
                )
                await db.commit()
            return await lc.placement._place(placer_db, pending)

    assert cp.run(race()) == 0

    async def written() -> tuple[str | None, int]:
        async with cp.state.db() as db:
            state = await db.scalar(select(SessionRow.state).where(SessionRow.id == sid))
            cmds = await db.scalar(
                select(func.count(AgentCommand.id)).where(AgentCommand.session_id == sid)
            )
            return state, int(cmds or 0)

    assert cp.run(written()) == ("stopped", 0)
    user.close()


def test_a_session_that_keeps_changing_is_a_409_not_a_500(
    make_control_plane: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write of the action finds the row changed (as under a storm of agent results):
    the action is decided again a bounded number of times, then answered 409; a PATCH that
    meets a changed row is a 409 problem too."""
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    with login(cp) as admin:
        user = add_user(cp, admin, "tess")
    sid = user.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]
    tries: list[str] = []

    async def always_changed(db: Any, sessions: Any, *args: Any, **kwargs: Any) -> None:
        tries.append(sessions.state if isinstance(sessions, SessionRow) else "commit")
        raise StaleDataError("sessions row changed or gone since it was read")

    monkeypatch.setattr(cp.state.lifecycle, "request_stop", always_changed)
    body = assert_problem(user.delete(f"/api/v1/sessions/{sid}"), 409, "kept changing")
    assert tries == ["pending"] * ACTION_ATTEMPTS

    monkeypatch.setattr(cp.state.lifecycle, "commit", always_changed)
    body = assert_problem(
        user.patch(f"/api/v1/sessions/{sid}", json={"tags": ["x"]}), 409, "changed while"
    )
    assert body["type"].endswith("conflict"), body
    assert user.get(f"/api/v1/sessions/{sid}").json()["tags"] == []
    user.close()
