"""Apply Alembic migrations programmatically (used by `db upgrade`, `up` and `server`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

STARTUP_LOCK_KEY = 0x5354524D  # "STRM": one replica at a time migrates and seeds


class MigrationRefused(RuntimeError):
    """A migration found data it cannot move without losing or changing some; it changed
    nothing, and its message says what the operator has to decide."""


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "streamspace.db:migrations")
    return cfg


def _with_connection(sync_conn: Any, fn: Any, *args: Any) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = sync_conn
    fn(cfg, *args)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_with_connection, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_with_connection, command.downgrade, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    def _rev(sync_conn: Any) -> str | None:
        return MigrationContext.configure(sync_conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_rev)


@contextlib.asynccontextmanager
async def startup_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """Serialise migrate + seed across replicas starting together (PostgreSQL advisory lock).

    SQLite needs none: only one process uses an embedded database.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": STARTUP_LOCK_KEY})
        await conn.commit()
        try:
            yield
        finally:
            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": STARTUP_LOCK_KEY})
            await conn.commit()
