"""Async engine and session factory for SQLite (embedded) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from streamspace.db.onestatement import ONE_STATEMENT_ONLY
from streamspace.private_files import PRIVATE_FILE, create_private_file, private_dir, tighten

Database = async_sessionmaker[AsyncSession]


class DatabaseUnavailable(ConnectionError):
    """The database refused or timed out a new connection (answered as 503, not 500)."""


def normalise_url(url: str) -> str:
    """Accept plain postgresql:// and sqlite:// URLs and pick the async drivers."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def make_private_file(path: Path) -> None:
    """The database file owner-only (0600) before SQLite opens it: SQLite gives its WAL and
    shared-memory files the database file's mode, and the database holds every password hash
    and agent credential hash. Its directory is created owner-only if missing."""
    if not path.parent.exists():
        private_dir(path.parent)
    create_private_file(path)
    for suffix in SQLITE_COMPANIONS:
        tighten(path.with_name(path.name + suffix), PRIVATE_FILE)


def create_engine(
    url: str, *, pool_size: int = 20, max_overflow: int = 20, pool_timeout: float = 10.0
) -> AsyncEngine:
    """PostgreSQL connections are not pinged on checkout: that was one more round trip on every
    request. A connection found dead is invalidated with the rest of the pool by SQLAlchemy's
    disconnect handling and the request answers 503 (problems.py); the next one reconnects.

    SQLite gets the same pool sizes: the request slots (deps.get_db) are sized from them, and
    with SQLAlchemy's smaller default pool requests queued in the pool instead of in the slots."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        pool: dict[str, Any] = {}
        if parsed.database and parsed.database != ":memory:":
            make_private_file(Path(parsed.database))
            pool = {
                "pool_size": pool_size,
                "max_overflow": max_overflow,
                "pool_timeout": pool_timeout,
            }
        engine = create_async_engine(url, connect_args={"timeout": 30}, **pool)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine

    async def connect() -> Any:
        import asyncpg

        try:
            return await asyncpg.connect(
                host=parsed.host or None,
                port=parsed.port or None,
                user=parsed.username or None,
                password=parsed.password or None,
                database=parsed.database or None,
                timeout=5,
                command_timeout=30,
            )
        except (OSError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"database unreachable: {exc}") from exc

    return create_async_engine(
        url,
        async_creator=connect,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
    )


def session_factory(engine: AsyncEngine) -> Database:
    return async_sessionmaker(engine, expire_on_commit=False)


def read_session_factory(engine: AsyncEngine) -> Database:
    """Sessions for requests that only read: on PostgreSQL in autocommit, which spares the
    BEGIN and ROLLBACK round trips around every GET (each statement still sees committed data;
    no GET needs several reads to agree). SQLite keeps ordinary transactions."""
    if is_sqlite(engine):
        return session_factory(engine)
    return session_factory(engine.execution_options(isolation_level="AUTOCOMMIT"))


def write_session_factory(engine: AsyncEngine) -> Database:
    """Sessions whose whole write is one statement (`db.onestatement`): on PostgreSQL in
    autocommit, so the write costs one round trip instead of BEGIN, statement and COMMIT. Such
    a session never autoflushes and refuses a write that one statement cannot hold, since
    without a transaction the ORM's statement-per-table flush would not be atomic. SQLite keeps
    ordinary transactions (and the ORM flush)."""
    if is_sqlite(engine):
        return session_factory(engine)
    return async_sessionmaker(
        engine.execution_options(isolation_level="AUTOCOMMIT"),
        expire_on_commit=False,
        autoflush=False,
        info={ONE_STATEMENT_ONLY: True},
    )


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"
