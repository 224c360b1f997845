"""Who a bearer token belongs to, without a database read on every request.

Every API request used to load its user row only to check `is_active` and `token_version`: one
more round trip and ORM load per request, the largest share of a GET's cost after the query it
was made for. Users seen in the last `ttl` seconds are kept here and attached to each request's
database session with `merge(load=False)` (no SQL), so handlers get an ordinary persistent row.

Staleness: any change to a user row made through the ORM on this replica (logout and password
change bump `token_version`, an admin disables, demotes or deletes) drops the entry at once, via
mapper events; every revocation drops it again after its commit and on the other replicas too
(controlplane.revocation, through Redis). A change nothing announces (a write straight to the
database) is noticed within `ttl` seconds. `STREAMSPACE_AUTH_CACHE_SECONDS=0` turns it off.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from streamspace.db.models import User

_caches: weakref.WeakSet[AuthCache] = weakref.WeakSet()


class AuthCache:
    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._users: dict[str, tuple[float, User]] = {}
        self.hits = 0
        self.misses = 0
        self._forgets = 0
        _caches.add(self)

    async def load(self, db: AsyncSession, user_id: str) -> User | None:
        """The user as a row of `db`'s session (from the cache when fresh)."""
        entry = self._users.get(user_id)
        if entry is not None and entry[0] > time.monotonic():
            self.hits += 1
            return await db.merge(entry[1], load=False)
        self.misses += 1
        forgets = self._forgets
        user = await db.get(User, user_id)
        # A read that overlapped a `forget` may have seen the row from before the revocation;
        # caching it would keep a signed-out user signed in for another `ttl`.
        if user is not None and self.ttl > 0 and forgets == self._forgets:
            if len(self._users) >= self.max_entries:
                self._users.clear()
            self._users[user_id] = (time.monotonic() + self.ttl, _detached_copy(user))
        return user

    def forget(self, user_id: str) -> None:
        self._forgets += 1
        self._users.pop(user_id, None)


def _detached_copy(user: User) -> User:
    """A private copy: the cached row must never be the instance a handler modifies."""
    copy = User()
    for attr in inspect(User).column_attrs:
        setattr(copy, attr.key, getattr(user, attr.key))
    make_transient_to_detached(copy)
    return copy


def _forget_everywhere(_mapper: Any, _connection: Any, target: User) -> None:
    for cache in list(_caches):
        cache.forget(target.id)


event.listen(User, "after_update", _forget_everywhere)
event.listen(User, "after_delete", _forget_everywhere)
