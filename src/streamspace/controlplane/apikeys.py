"""API keys: long-lived credentials for scripts and the CLI, each limited to scopes.

A key reads `ssk_<id>_<secret>`. The id finds its row by primary key, so a key is checked
without a scan; only the secret's SHA-256 is stored (32 random bytes need no slow hash), and it
is compared in constant time.

A key is never more than its owner: it authenticates as the owner, so every role check still
applies, and `admin` can only be granted by an admin. It dies with its owner (rows cascade;
a disabled owner is refused by the same check as a token). Keys cannot manage keys, sign out,
refresh or change a password: those need a real sign-in.

Use is audited as a sign-in (`auth.login`, method `api-key`, the key's id) when `last_used_at`
is written, so at most once a minute per key, and a refused use of an existing key (wrong
secret, expired) as `auth.login_failed` as often; every audit row of a request made with a
key names it too (`detail.api_key`).

Checked without a database read while fresh: resolved keys are kept for `ttl` seconds (the
auth cache's setting). Deleting a key forgets it at once on the replica that deleted it; the
others stop accepting it within `ttl` (5 s by default).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from streamspace.controlplane.security import constant_eq, random_secret, sha256
from streamspace.db.engine import Database
from streamspace.db.models import ApiKey, AuditLog, User
from streamspace.db.types import new_id

PREFIX = "ssk_"
SCOPES = ("sessions:read", "sessions:write", "templates:read", "admin")
ANY_SCOPE = ""
"""`required_scope`'s answer for requests any valid key may make."""
LAST_USED_PRECISION = timedelta(seconds=60)
"""`last_used_at` is written at most this often per key: a write per request would double the
cost of every scripted GET."""


@dataclass(frozen=True)
class Grant:
    """What a valid key lets its bearer do."""

    key_id: str
    user_id: str
    scopes: frozenset[str]
    expires_at: datetime | None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def allows(self, scope: str) -> bool:
        return scope == ANY_SCOPE or scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True)
class NewKey:
    id: str
    token: str
    secret_hash: str


def make_key() -> NewKey:
    key_id = new_id()
    secret = random_secret(32)
    return NewKey(key_id, f"{PREFIX}{key_id}_{secret}", sha256(secret))


def display_prefix(key_id: str) -> str:
    """What lists show so a user can tell keys apart: never enough to use one."""
    return f"{PREFIX}{key_id[:8]}"


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 32 or not secret:
        return None
    return key_id, secret


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs when made with an API key; None when no key may make it.

    Deny by default: a route not named here needs `admin`.
    """
    read = method in ("GET", "HEAD")
    if path == "/api/v1/auth/me":
        return ANY_SCOPE
    if path.startswith("/api/v1/auth/"):
        return None
    if path == "/api/v1/sessions" or path.startswith("/api/v1/sessions/"):
        return "sessions:read" if read else "sessions:write"
    if path in ("/api/v1/me/quota", "/api/v1/events"):
        return "sessions:read"
    if path == "/api/v1/templates" or path.startswith("/api/v1/templates/"):
        return "templates:read" if read else "admin"
    return "admin"


class ApiKeys:
    def __init__(self, *, db: Database, ttl: float, max_entries: int = 10_000) -> None:
        self.db = db
        self.ttl = ttl
        self.max_entries = max_entries
        self._grants: dict[str, tuple[float, Grant, str]] = {}
        self._touched: dict[str, float] = {}
        self._refused: dict[str, float] = {}
        self._forgets = 0

    async def resolve(self, token: str, ip: str = "") -> Grant | None:
        """The grant of a valid, unexpired key, else None.

        A cache miss reads the row with a session of its own: this runs before the request is
        given one (the caller's rate limit needs the owner first)."""
        parsed = parse(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        entry = self._grants.get(key_id)
        if entry is not None and entry[0] > time.monotonic():
            _, grant, secret_hash = entry
        else:
            found = await self._load(key_id)
            if found is None:
                return None
            grant, secret_hash = found
        now = datetime.now(UTC)
        if not constant_eq(secret_hash, sha256(secret)) or grant.expired(now):
            reason = "expired" if grant.expired(now) else "wrong secret"
            await self._audit(self._refused, grant, now, ip, "auth.login_failed", reason)
            return None
        await self._audit(self._touched, grant, now, ip, "auth.login", "")
        return grant

    async def _load(self, key_id: str) -> tuple[Grant, str] | None:
        forgets = self._forgets
        async with self.db() as db:
            row = await db.get(ApiKey, key_id)
            if row is None:
                return None
            grant = Grant(row.id, row.user_id, frozenset(row.scopes), row.expires_at)
            secret_hash = row.secret_hash
        # A load that overlapped a `forget` may have read the row from before its deletion.
        if self.ttl > 0 and forgets == self._forgets:
            if len(self._grants) >= self.max_entries:
                self._grants.clear()
            self._grants[key_id] = (time.monotonic() + self.ttl, grant, secret_hash)
        return grant, secret_hash

    async def _audit(
        self,
        seen: dict[str, float],
        grant: Grant,
        now: datetime,
        ip: str,
        action: str,
        reason: str,
    ) -> None:
        """At most once per LAST_USED_PRECISION per key and outcome: the audit row, and on a
        use the key's `last_used_at`."""
        last = seen.get(grant.key_id)
        if last is not None and time.monotonic() - last < LAST_USED_PRECISION.total_seconds():
            return
        if len(seen) >= self.max_entries:
            seen.clear()
        seen[grant.key_id] = time.monotonic()
        async with self.db() as db:
            if not reason:
                await db.execute(
                    update(ApiKey).where(ApiKey.id == grant.key_id).values(last_used_at=now)
                )
            owner = await db.get(User, grant.user_id)
            db.add(
                AuditLog(
                    actor_id=grant.user_id if not reason else None,
                    actor=owner.username if owner is not None and not reason else "",
                    action=action,
                    resource_type="user",
                    resource_id=grant.user_id,
                    detail={"method": "api-key", "api_key": grant.key_id}
                    | ({"reason": reason} if reason else {}),
                    ip=ip[:64],
                    status_code=401 if reason else 200,
                )
            )
            await db.commit()

    def forget(self, key_id: str) -> None:
        self._forgets += 1
        self._grants.pop(key_id, None)
        self._touched.pop(key_id, None)
        self._refused.pop(key_id, None)
