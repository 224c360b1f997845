"""SQLite's one writer at a time, as a turn this replica's read-then-write work waits for.

SQLite has no row locks: a quota check and the insert after it, a session action's decision and
its write, and a placement round each hold the turn for their whole read-then-write.
PostgreSQL uses row locks and compare-and-set writes instead, and there the turn is free.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

SLOT_KEY = "streamspace.request_slot"
"""Where a request's session keeps its place among the requests allowed a session at once
(deps.RequestSlot)."""


class Slot(Protocol):
    async def acquire(self) -> None: ...

    def release(self) -> None: ...


class WriterTurn:
    def __init__(self, *, sqlite: bool) -> None:
        self.sqlite = sqlite
        self.lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """The turn, for work that holds no database connection yet (the placement loop)."""
        if not self.sqlite:
            yield
            return
        async with self.lock:
            yield

    @contextlib.asynccontextmanager
    async def taken_by(self, db: AsyncSession) -> AsyncIterator[None]:
        """The turn for a session that may already hold a connection (a request's), waited for
        without holding it or the request's slot.

        A request that waited for the lock while holding its connection deadlocked against the
        placement loop, which holds the lock and then needs a connection: 30 parallel creates
        took every connection of the pool, and everyone's requests stalled until the pool
        timeout (25-30 s). So the connection goes back first (the session's reads so far are
        committed: expire_on_commit is off, loaded rows stay usable), then the slot; both are
        taken again once the lock is held.
        """
        if not self.sqlite:
            yield
            return
        if db.in_transaction():
            await db.commit()
        slot: Slot | None = db.info.get(SLOT_KEY)
        if slot is not None:
            slot.release()
        async with self.lock:
            if slot is not None:
                await slot.acquire()
            yield
