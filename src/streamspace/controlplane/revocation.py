"""Revocation that reaches open connections: viewer WebSockets and live event streams.

An access token is checked on every API request, but a viewer WebSocket or an event stream is
authorised once, when it opens, and may then stay open for hours. So each change that revokes a
user's tokens (logout, password change, disabling, deleting, a role change, an admin's "sign out
everywhere") also closes the user's open connections: `revoke` is called after the commit that
made the change, closes them on this replica at once and tells the other replicas (`Peers`; with
Redis, channel `ss:revoke`), each of which drops the user from its auth cache and closes
its own.

Redis pub/sub is fire and forget: a replica that is resubscribing at that moment misses the
message, and a change written straight to the database announces nothing. So every replica also
compares, every `connection_recheck_seconds`, the users it holds connections for with their
rows, and closes what no longer matches (`recheck`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace import logs
from streamspace.controlplane import metrics
from streamspace.controlplane.authcache import AuthCache
from streamspace.controlplane.peers import Peers
from streamspace.db.engine import Database
from streamspace.db.models import RefreshToken, SignIn, User

log = logs.get_logger("streamspace.revocation")

RECHECK_BATCH = 500


async def end_sign_ins(db: AsyncSession, user: User) -> None:
    """In the caller's transaction: every access token issued to `user` so far stops working
    (`token_version`) and so does every refresh token. Call `Revocations.revoke` after the
    commit to close the connections those tokens opened."""
    user.token_version += 1
    now = datetime.now(UTC)
    await db.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user.id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    await db.execute(
        update(SignIn)
        .where(SignIn.user_id == user.id, SignIn.revoked_at.is_(None))
        .values(revoked_at=now)
    )


async def end_sign_in(db: AsyncSession, user: User, sign_in_id: str) -> None:
    """In the caller's transaction: one sign-in ends (its refresh tokens stop working) and so
    does every access token issued to `user` so far, whichever sign-in it came from: access
    tokens are checked against `token_version` alone, with no read per request. The user's
    other sign-ins renew theirs from their refresh tokens (the web UI does so on its next 401,
    without asking for the password). Call `Revocations.revoke` after the commit."""
    user.token_version += 1
    now = datetime.now(UTC)
    await db.execute(
        update(RefreshToken)
        .where(RefreshToken.family_id == sign_in_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    await db.execute(
        update(SignIn)
        .where(SignIn.id == sign_in_id, SignIn.user_id == user.id)
        .values(revoked_at=now)
    )


@dataclass(eq=False)
class Connection:
    """One open connection of a user, authorised with the user's `token_version` of then."""

    user_id: str
    token_version: int
    kind: str
    on_revoke: Callable[[str], None]
    revoked: str = ""
    """Why it was closed; empty while it is open."""

    def revoke(self, reason: str) -> bool:
        if self.revoked:
            return False
        self.revoked = reason
        metrics.connections_revoked_total.labels(self.kind).inc()
        self.on_revoke(reason)
        return True


class Revocations:
    def __init__(self, *, auth_cache: AuthCache, db: Database, peers: Peers) -> None:
        self.auth_cache = auth_cache
        self.db = db
        self.peers = peers
        self._open: dict[str, set[Connection]] = {}

    @contextlib.contextmanager
    def track(
        self, user_id: str, token_version: int, kind: str, on_revoke: Callable[[str], None]
    ) -> Iterator[Connection]:
        """Register a connection for as long as the block runs; `on_revoke(reason)` closes it."""
        conn = Connection(user_id, token_version, kind, on_revoke)
        self._open.setdefault(user_id, set()).add(conn)
        try:
            yield conn
        finally:
            held = self._open.get(user_id)
            if held is not None:
                held.discard(conn)
                if not held:
                    del self._open[user_id]

    def open_count(self, user_id: str | None = None) -> int:
        if user_id is not None:
            return len(self._open.get(user_id, ()))
        return sum(len(c) for c in self._open.values())

    def revoke(self, user_id: str, reason: str) -> int:
        """After the commit that revoked the user's tokens: close the user's connections here
        and on every other replica. Returns how many were closed here."""
        closed = self.apply(user_id, reason)
        self.peers.publish_revocation(user_id, reason)
        return closed

    def apply(self, user_id: str, reason: str) -> int:
        """This replica's part of a revocation (also run for one announced by another)."""
        self.auth_cache.forget(user_id)
        closed = sum(conn.revoke(reason) for conn in list(self._open.get(user_id, ())))
        if closed:
            log.event("connections_revoked", user_id=user_id, closed=closed, reason=reason)
        return closed

    async def recheck(self) -> int:
        """Close connections whose user is gone, disabled, or has revoked their tokens since."""
        user_ids = list(self._open)
        if not user_ids:
            return 0
        rows: dict[str, tuple[bool, int]] = {}
        async with self.db() as db:
            for i in range(0, len(user_ids), RECHECK_BATCH):
                chunk = user_ids[i : i + RECHECK_BATCH]
                query = select(User.id, User.is_active, User.token_version).where(
                    User.id.in_(chunk)
                )
                rows.update({uid: (active, tv) for uid, active, tv in (await db.execute(query))})
        closed = 0
        for user_id in user_ids:
            row = rows.get(user_id)
            for conn in list(self._open.get(user_id, ())):
                if row is None:
                    why = "the account was deleted"
                elif not row[0]:
                    why = "the account was disabled"
                elif row[1] != conn.token_version:
                    why = "signed out"
                else:
                    continue
                if conn.revoke(why):
                    closed += 1
                    self.auth_cache.forget(user_id)
        if closed:
            log.event("connections_revoked", source="recheck", closed=closed)
        return closed
