"""The schema drift guard: migrations and models must agree on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from streamspace.db import migrate
from streamspace.db.engine import create_engine
from streamspace.db.models import Base


def _diff(sync_conn: Any) -> list[Any]:
    ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


def _tables(sync_conn: Any) -> set[str]:
    return set(inspect(sync_conn).get_table_names())


async def _check(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
            assert diff == [], f"models and migrations disagree: {diff}"
            tables = await conn.run_sync(_tables)
        expected = set(Base.metadata.tables)
        assert expected <= tables
        for name in (
            "users",
            "groups",
            "group_memberships",
            "quotas",
            "templates",
            "agents",
            "sessions",
            "agent_commands",
            "session_events",
            "audit_log",
        ):
            assert name in tables
        await migrate.downgrade(engine, "base")
        async with engine.connect() as conn:
            left = await conn.run_sync(_tables)
        assert left <= {"alembic_version"}, f"downgrade left tables behind: {left}"
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        assert await migrate.current_revision(engine) is not None
    finally:
        await engine.dispose()


def test_sqlite_migrates_to_models_without_drift(tmp_path: Any) -> None:
    asyncio.run(_check(f"sqlite+aiosqlite:///{tmp_path / 'drift.db'}"))


def test_postgres_migrates_to_models_without_drift(pg_url: str) -> None:
    asyncio.run(_check(pg_url))


def test_drift_is_detected(tmp_path: Any) -> None:
    """The guard itself must be able to fail: a column the migrations lack is reported."""
    from sqlalchemy import Column, Integer

    async def run() -> list[Any]:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
        try:
            await migrate.upgrade(engine)
            table = Base.metadata.tables["sessions"]
            extra = Column("not_migrated", Integer)
            table.append_column(extra)
            try:
                async with engine.connect() as conn:
                    return await conn.run_sync(_diff)
            finally:
                table._columns.remove(extra)
        finally:
            await engine.dispose()

    diff = asyncio.run(run())
    assert any("not_migrated" in str(d) for d in diff)


async def _sign_ins_backfill(url: str) -> None:
    """0009 gives each refresh-token family that exists a sign-in row, ended when all its
    tokens are revoked."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert, text

    from streamspace.db.models import RefreshToken, User

    engine = create_engine(url)
    try:
        await migrate.upgrade(engine, "0008")
        day = datetime(2026, 1, 1, tzinfo=UTC)
        async with engine.begin() as conn:
            await conn.execute(
                insert(User.__table__).values(
                    id="u1",
                    username="old",
                    display_name="",
                    email="",
                    password_hash="x",
                    role="user",
                    is_active=True,
                    token_version=0,
                    service_account=False,
                    auth_source="local",
                    created_at=day,
                    updated_at=day,
                )
            )
            for tid, family, days, revoked in (
                ("t1", "live", 0, None),
                ("t2", "live", 1, None),
                ("t3", "gone", 0, day + timedelta(days=2)),
            ):
                await conn.execute(
                    insert(RefreshToken.__table__).values(
                        id=tid,
                        user_id="u1",
                        family_id=family,
                        token_hash=tid,
                        expires_at=day + timedelta(days=365),
                        revoked_at=revoked,
                        created_at=day + timedelta(days=days),
                    )
                )
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT id, user_id, revoked_at IS NULL FROM sign_ins ORDER BY id")
                )
            ).all()
        assert [(r[0], r[1], bool(r[2])) for r in rows] == [
            ("gone", "u1", False),
            ("live", "u1", True),
        ]
    finally:
        await engine.dispose()


def test_sign_ins_are_made_for_existing_refresh_tokens(tmp_path: Any) -> None:
    asyncio.run(_sign_ins_backfill(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"))


def test_sign_ins_are_made_for_existing_refresh_tokens_on_postgres(pg_url: str) -> None:
    asyncio.run(_sign_ins_backfill(pg_url))
