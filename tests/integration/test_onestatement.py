"""One-statement writes of a transition (real PostgreSQL): what lands must be exactly what the
ORM's own flush writes, in one round trip instead of one per table."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Table, delete, event, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from streamspace.controlplane.transitions import EVENTS_KEY, now
from streamspace.db import migrate, onestatement
from streamspace.db.engine import create_engine, session_factory, write_session_factory
from streamspace.db.models import Agent, AgentCommand, AuditLog, SessionEvent, User
from streamspace.db.models import Session as SessionRow

EVENTS = cast(Table, SessionEvent.__table__)
Scenario = Callable[[AsyncEngine, Any], Awaitable[None]]


def run(url: str, scenario: Scenario) -> None:
    async def main() -> None:
        engine = create_engine(url)
        try:
            await migrate.upgrade(engine)
            await scenario(engine, session_factory(engine))
        finally:
            await engine.dispose()

    asyncio.run(main())


async def seed(factory: Any, sessions: int) -> tuple[str, str, list[str]]:
    async with factory() as db:
        user = User(username="ann", password_hash="x")
        agent = Agent(
            name="a1", cluster_id="c1", cluster_name="c1", backend="local", credential_hash="x"
        )
        db.add_all([user, agent])
        await db.flush()
        rows = [
            SessionRow(
                owner_id=user.id,
                template_name="xterm",
                state="running",
                agent_id=agent.id,
                cpu_millis=500,
                memory_mb=512,
                idle_timeout_seconds=60,
                max_duration_seconds=3600,
                endpoint_host="127.0.0.1",
                endpoint_port=5901,
            )
            for _ in range(sessions)
        ]
        db.add_all(rows)
        await db.commit()
        return user.id, agent.id, [r.id for r in rows]


async def stop_like(
    db: AsyncSession, user_id: str, agent_id: str, session_id: str, row: SessionRow | None = None
) -> None:
    """What a stop request does: audit row, session UPDATE, command, session event."""
    if row is None:
        row = await db.scalar(select(SessionRow).where(SessionRow.id == session_id))
    assert row is not None
    db.add(
        AuditLog(
            actor_id=user_id,
            actor="ann",
            action="session.stop",
            resource_type="session",
            resource_id=session_id,
            detail={"why": "test"},
            ip="",
            status_code=202,
        )
    )
    row.state = "stopping"
    row.state_changed_at = now()
    row.status_message = ""
    row.endpoint_host = None
    cmd = AgentCommand(
        agent_id=agent_id,
        session_id=session_id,
        action="stop",
        payload={"k": [1, 2]},
        deadline=now() + timedelta(seconds=30),
    )
    db.add(cmd)
    db.info.setdefault(EVENTS_KEY, []).append(
        {
            "session_id": session_id,
            "kind": "stopping",
            "message": "stop requested",
            "data": {"previous": "running"},
            "at": now(),
        }
    )


def count_statements(engine: AsyncEngine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _on(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.split()[0].upper())

    return seen


IGNORED = {
    "id",
    "created_at",
    "updated_at",
    "state_changed_at",
    "last_activity",
    "at",
    "deadline",
    "session_id",
}


async def snapshot(db: AsyncSession, session_id: str) -> dict[str, Any]:
    """Every column of every row the stop wrote, minus ids and clocks."""

    def plain(row: Any) -> dict[str, Any]:
        return {
            c.name: getattr(row, c.name) for c in row.__table__.columns if c.name not in IGNORED
        }

    session = await db.get(SessionRow, session_id)
    cmds = (
        await db.scalars(select(AgentCommand).where(AgentCommand.session_id == session_id))
    ).all()
    events = (
        await db.scalars(select(SessionEvent).where(SessionEvent.session_id == session_id))
    ).all()
    audits = (await db.scalars(select(AuditLog).where(AuditLog.resource_id == session_id))).all()
    return {
        "session": plain(session),
        "commands": [plain(c) for c in cmds],
        "events": [plain(e) for e in events],
        "audit": [{k: v for k, v in plain(a).items() if k != "resource_id"} for a in audits],
    }


def test_a_transition_is_one_statement_and_writes_what_the_orm_writes(pg_url: str) -> None:
    async def scenario(engine: AsyncEngine, factory: Any) -> None:
        user_id, agent_id, (fast, slow) = await seed(factory, 2)
        seen = count_statements(engine)

        async with factory() as db:
            await stop_like(db, user_id, agent_id, slow)
            del seen[:]
            await db.commit()  # the ORM: one statement per table
            orm_statements = list(seen)

        async with factory() as db:
            await stop_like(db, user_id, agent_id, fast)
            cmd = next(o for o in db.new if isinstance(o, AgentCommand))
            before = now()
            del seen[:]
            assert await onestatement.write_pending(db, [(EVENTS, db.info.pop(EVENTS_KEY))])
            await db.commit()
            one_statement = list(seen)
            assert cmd.id and cmd.status == "pending" and cmd.created_at is not None

        assert orm_statements.count("INSERT") + orm_statements.count("UPDATE") == 4
        assert one_statement == ["WITH"], one_statement

        async with factory() as db:
            got, want = await snapshot(db, fast), await snapshot(db, slow)
            differing = {
                part: [(k, v, want[part]) for k, v in got[part].items() if want[part][k] != v]
                if part == "session"
                else (got[part], want[part])
                for part in got
                if got[part] != want[part]
            }
            assert not differing, differing
            assert got["session"]["state"] == "stopping"
            assert got["session"]["endpoint_host"] is None
            assert got["commands"][0]["payload"] == {"k": [1, 2]}
            assert got["commands"][0]["status"] == "pending"
            assert len(got["events"]) == 1 and len(got["audit"]) == 1
            row = await db.get(SessionRow, fast)
            assert row is not None
            stored = await db.scalar(select(AgentCommand).where(AgentCommand.id == cmd.id))
            assert stored is not None and stored.created_at == cmd.created_at
            assert row.updated_at >= before  # the column's onupdate applied

    run(pg_url, scenario)


@pytest.mark.parametrize("transaction", [True, False], ids=["in-transaction", "no-transaction"])
@pytest.mark.parametrize("meanwhile", ["changed", "deleted", "unchanged"])
def test_without_a_transaction_a_row_changed_since_it_was_read_is_not_overwritten(
    pg_url: str, meanwhile: str, transaction: bool
) -> None:
    """Compare-and-set: a user's stop lands between a placement's read and its write; the
    placement must neither resurrect the session nor leave its command or event behind. In a
    transaction the statement behaves as the ORM's flush does (the caller locks what it must)."""

    async def scenario(engine: AsyncEngine, factory: Any) -> None:
        user_id, agent_id, (sid,) = await seed(factory, 1)
        if not transaction:
            factory = write_session_factory(engine)
        async with factory() as db:
            row = await db.get(SessionRow, sid)
            assert row is not None and row.state == "running"
            async with session_factory(engine)() as other:
                if meanwhile == "changed":
                    await other.execute(
                        update(SessionRow).where(SessionRow.id == sid).values(state="stopped")
                    )
                elif meanwhile == "deleted":
                    await other.execute(delete(SessionRow).where(SessionRow.id == sid))
                await other.commit()
            await stop_like(db, user_id, agent_id, sid, row)
            events = [(EVENTS, db.info.pop(EVENTS_KEY))]
            if meanwhile == "unchanged" or (meanwhile == "changed" and transaction):
                assert await onestatement.write_pending(db, events)
                await db.commit()
            else:
                with pytest.raises(StaleDataError, match="changed or gone since it was read"):
                    await onestatement.write_pending(db, events)
                await db.rollback()
        async with factory() as db:
            written = {
                "commands": len((await db.scalars(select(AgentCommand))).all()),
                "audit": len((await db.scalars(select(AuditLog))).all()),
                "events": len((await db.scalars(select(SessionEvent))).all()),
            }
            state = await db.scalar(select(SessionRow.state).where(SessionRow.id == sid))
        if meanwhile == "unchanged" or (meanwhile == "changed" and transaction):
            assert written == {"commands": 1, "audit": 1, "events": 1} and state == "stopping"
        else:
            assert written == {"commands": 0, "audit": 0, "events": 0}
            assert state == {"changed": "stopped", "deleted": None}[meanwhile]

    run(pg_url, scenario)


def test_units_it_does_not_cover_are_left_to_the_orm(pg_url: str, tmp_path: Path) -> None:
    async def scenario(engine: AsyncEngine, factory: Any) -> None:
        _, _, sids = await seed(factory, onestatement.MAX_ROWS + 1)
        async with factory() as db:
            assert not await onestatement.write_pending(db)  # nothing pending
            rows = (await db.scalars(select(SessionRow))).all()
            for row in rows:
                row.status_message = "batch"
            assert not await onestatement.write_pending(db)  # too many rows
            await db.commit()
        async with factory() as db:
            row = await db.get(SessionRow, sids[0])
            assert row is not None and row.status_message == "batch"
            await db.delete(row)
            assert not await onestatement.write_pending(db)  # deletes
            await db.commit()
            assert await db.get(SessionRow, sids[0]) is None

    run(pg_url, scenario)

    async def no_transaction(engine: AsyncEngine, factory: Any) -> None:
        async with write_session_factory(engine)() as db:
            rows = (await db.scalars(select(SessionRow))).all()
            for row in rows:
                row.status_message = "too many for one statement"
            db.add(AuditLog(action="bulk", resource_type="session"))
            assert len(rows) + 1 > onestatement.MAX_ROWS
            with pytest.raises(RuntimeError, match="does not fit one statement"):
                await onestatement.write_pending(db)
            db.expunge_all()
        async with factory() as db:
            messages = set((await db.scalars(select(SessionRow.status_message))).all())
            assert "too many for one statement" not in messages

    run(pg_url, no_transaction)

    async def sqlite_scenario(engine: AsyncEngine, factory: Any) -> None:
        user_id, agent_id, (sid,) = await seed(factory, 1)
        async with factory() as db:
            await stop_like(db, user_id, agent_id, sid)
            assert not await onestatement.write_pending(db)
            await db.commit()
        async with factory() as db:
            assert len((await db.scalars(select(AgentCommand))).all()) == 1

    run(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}", sqlite_scenario)


def test_a_new_row_and_a_row_referencing_it_in_one_statement(pg_url: str) -> None:
    async def scenario(engine: AsyncEngine, factory: Any) -> None:
        user_id, _, _ = await seed(factory, 0)
        async with factory() as db:
            row = SessionRow(
                owner_id=user_id,
                template_name="xterm",
                state="pending",
                cpu_millis=500,
                memory_mb=512,
                idle_timeout_seconds=60,
                max_duration_seconds=3600,
            )
            db.add(row)
            assert row.id is None
            events = [{"session_id": "", "kind": "created", "message": "m", "data": {}}]
            sid = await _write_with_event(db, row, events)
            await db.commit()
        async with factory() as db:
            stored = await db.get(SessionRow, sid)
            assert stored is not None and stored.state == "pending" and stored.tags == []
            assert stored.persistent_home is True and stored.failure_reason == ""
            kinds = (
                await db.scalars(select(SessionEvent.kind).where(SessionEvent.session_id == sid))
            ).all()
            assert kinds == ["created"]

    run(pg_url, scenario)


async def _write_with_event(db: AsyncSession, row: SessionRow, events: list[dict[str, Any]]) -> str:
    """The session id is a Python-side default: fill it the way the module does, then point
    the event at it."""
    from streamspace.db.models import new_id

    row.id = new_id()
    events[0]["session_id"] = row.id
    assert await onestatement.write_pending(db, [(EVENTS, events)])
    return row.id
