"""`db` and `admin`: maintenance straight on the database, no control plane needed."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from streamspace.cli.base import (
    CLIError,
    T,
    admin_app,
    console,
    db_app,
    fail,
    run,
    settings_for,
)
from streamspace.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine


@contextlib.asynccontextmanager
async def _migrated(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The database engine, migrated to the latest revision; what goes wrong is a CLIError."""
    from streamspace.db import migrate
    from streamspace.db.engine import create_engine

    engine = create_engine(settings.resolved_database_url())
    try:
        await migrate.upgrade(engine)
        yield engine
    except OSError as exc:
        raise CLIError(f"database unreachable: {exc}") from exc
    except migrate.MigrationRefused as exc:
        raise CLIError(str(exc)) from None
    finally:
        await engine.dispose()


async def _with_db(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from streamspace.db.engine import session_factory

    async with _migrated(settings) as engine, session_factory(engine)() as db:
        return await fn(db)


@db_app.command("upgrade")
def db_upgrade(data_dir: Path | None = typer.Option(None)) -> None:
    """Apply all migrations (also done by `up` and `server` on start)."""
    from streamspace.db import migrate

    s = settings_for(data_dir)

    async def main() -> str | None:
        async with _migrated(s) as engine:
            return await migrate.current_revision(engine)

    console.print(f"database at revision [bold]{run(main())}[/]")


@admin_app.command("create-user")
def admin_create_user(
    username: str,
    role: str = typer.Option("user", help="admin, operator or user"),
    password: str = typer.Option(..., prompt=True, hide_input=True, confirmation_prompt=True),
    data_dir: Path | None = typer.Option(None),
) -> None:
    """Create a user directly in the database."""
    from sqlalchemy import func, select

    from streamspace.controlplane.api.schemas import USERNAME
    from streamspace.controlplane.passwords import describe, weakness
    from streamspace.controlplane.security import hash_password
    from streamspace.db.models import User

    if role not in ("admin", "operator", "user"):
        fail("role must be admin, operator or user")
    if not re.fullmatch(USERNAME, username):
        fail("username: letters, digits, '.', '_' and '-', starting with a letter or digit; max 64")
    weak = weakness(password, [username])
    if weak is not None:
        fail(describe("password", weak))

    async def create(db: Any) -> str:
        taken = await db.scalar(
            select(User.username).where(func.lower(User.username) == username.lower())
        )
        if taken:
            raise CLIError(f"user {taken!r} exists (usernames are unique whatever their case)")
        user = User(username=username, role=role, password_hash=hash_password(password))
        db.add(user)
        await db.commit()
        return str(user.id)

    user_id = run(_with_db(settings_for(data_dir), create))
    console.print(f"created {role} [bold]{username}[/] ({user_id})")


@admin_app.command("join-token")
def admin_join_token(
    ttl_seconds: int = typer.Option(3600, help="How long the token can be used."),
    data_dir: Path | None = typer.Option(None),
) -> None:
    """Mint a one-time join token for a new agent."""
    from streamspace.controlplane.api.agents import mint_join_token

    s = settings_for(data_dir)

    async def mint(db: Any) -> str:
        token, _ = await mint_join_token(db, s, None, ttl_seconds)
        await db.commit()
        return token

    token = run(_with_db(s, mint))
    console.print(token)
