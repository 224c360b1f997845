"""Usernames are unique whatever their case, and the migration that makes them so loses nothing.

"Alice" next to "alice" let a second account pose as the first in every list and log line.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import column, delete, func, insert, select, table
from sqlalchemy.exc import IntegrityError

from conftest import ControlPlane
from streamspace.controlplane.security import hash_password
from streamspace.db import migrate
from streamspace.db.engine import create_engine
from streamspace.db.models import User

PASSWORD = "alice-correct-horse-42"


def test_case_variants_are_one_username(make_control_plane: Any) -> None:
    cp = make_control_plane()
    with cp.login() as admin:
        r = admin.post("/api/v1/users", json={"username": "alice", "password": PASSWORD})
        assert r.status_code == 201, r.text
        for variant in ("Alice", "ALICE", "aLiCe"):
            r = admin.post("/api/v1/users", json={"username": variant, "password": PASSWORD})
            assert r.status_code == 409, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "'alice'" in r.json()["detail"], r.json()
        assert admin.get("/api/v1/users/ALICE").json()["username"] == "alice"
        users = admin.get("/api/v1/users").json()["items"]
        assert sorted(u["username"] for u in users) == ["admin", "alice"]
    # login by any case finds the one user
    with httpx.Client(base_url=cp.url, timeout=30) as anon:
        for variant in ("alice", "Alice", "ALICE"):
            r = anon.post("/api/v1/auth/login", json={"username": variant, "password": PASSWORD})
            assert r.status_code == 200, r.text
            assert r.json()["user"]["username"] == "alice"


USERS_AT_0002 = table(
    "users",
    *(
        column(name)
        for name in (
            "id",
            "username",
            "password_hash",
            "role",
            "display_name",
            "email",
            "is_active",
            "token_version",
            "created_at",
            "updated_at",
        )
    ),
)
"""The users table as revision 0002 has it: the model's table carries later columns."""


async def _seed_at_0002(url: str, names: list[str]) -> None:
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine, "0002")
        async with engine.begin() as conn:
            for name in names:
                await conn.execute(
                    insert(USERS_AT_0002).values(
                        id=f"id-{name}",
                        username=name,
                        password_hash=hash_password(PASSWORD),
                        role="user",
                        display_name="",
                        email="",
                        is_active=True,
                        token_version=0,
                        created_at=func.now(),
                        updated_at=func.now(),
                    )
                )
    finally:
        await engine.dispose()


async def _usernames(url: str) -> tuple[list[str], str | None]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names = list((await conn.execute(select(User.username).order_by(User.id))).scalars())
        return names, await migrate.current_revision(engine)
    finally:
        await engine.dispose()


# uvicorn ends the refused start with SystemExit in the control plane's thread: expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_migration_refuses_case_duplicates_and_keeps_them(db_url: str, tmp_path: Any) -> None:
    asyncio.run(_seed_at_0002(db_url, ["Alice", "alice", "bob", "Carol", "CAROL"]))
    # The product refuses to start, says which users clash and what to do, and changes nothing.
    cp = ControlPlane(tmp_path / "cp", db_url)
    with pytest.raises(RuntimeError, match="did not start"):
        cp.start()
    cp.stop()
    message = cp.app.state.startup_error
    for part in ("'Alice' (id id-Alice)", "'alice' (id id-alice)", "'CAROL'", "'Carol'"):
        assert part in message, message
    assert "bob" not in message
    assert "Nothing was changed" in message
    names, revision = asyncio.run(_usernames(db_url))
    assert sorted(names) == ["Alice", "CAROL", "Carol", "alice", "bob"]
    assert revision == "0002"

    async def resolve_and_upgrade() -> None:
        engine = create_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    delete(User.__table__).where(User.id.in_(["id-Alice", "id-CAROL"]))
                )
            await migrate.upgrade(engine)
            # from now on the database itself refuses a case variant
            with pytest.raises(IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(
                        insert(User.__table__).values(
                            id="id-BOB",
                            username="BOB",
                            password_hash="x",
                            role="user",
                            display_name="",
                            email="",
                            is_active=True,
                            token_version=0,
                            created_at=func.now(),
                            updated_at=func.now(),
                        )
                    )
        finally:
            await engine.dispose()

    asyncio.run(resolve_and_upgrade())
    names, revision = asyncio.run(_usernames(db_url))
    assert sorted(names) == ["Carol", "alice", "bob"]
    assert revision == ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
