"""Per-process wiring: what a request handler can reach through `request.app.state.ss`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from streamspace.config import Settings
from streamspace.db.engine import Database

if TYPE_CHECKING:
    from streamspace.controlplane.authcache import AuthCache
    from streamspace.controlplane.events import EventBus
    from streamspace.controlplane.hub import Hub
    from streamspace.controlplane.lifecycle import Lifecycle
    from streamspace.controlplane.loginthrottle import LoginThrottle
    from streamspace.controlplane.ratelimit import InFlight, TokenBuckets
    from streamspace.controlplane.revocation import Revocations
    from streamspace.controlplane.streams import StreamBroker


class EmbeddedAgent(Protocol):
    """The agent `streamspace up` runs in this process (agent.runtime.Agent)."""

    @property
    def agent_id(self) -> str | None: ...

    async def adopt_credential(self, credential: str) -> None: ...


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    db: Database
    read_db: Database
    """For GET requests: no transaction round trips (see db.engine.read_session_factory)."""
    write_db: Database
    """For writes that are one statement (user actions, placement): no BEGIN/COMMIT round
    trips (see db.engine.write_session_factory)."""
    replica_id: str
    secret: str
    events: EventBus
    login_throttle: LoginThrottle
    user_requests: TokenBuckets
    """Each user's request rate (deps.token_claims)."""
    session_creates: InFlight
    """Each user's session creations under way (deps.create_turn)."""
    auth_cache: AuthCache
    db_slots: asyncio.Semaphore
    """Request sessions allowed at once (see deps.get_db); sized from the pool in create_app."""
    revocations: Revocations
    hub: Hub = field(init=False)
    lifecycle: Lifecycle = field(init=False)
    streams: StreamBroker = field(init=False)
    sqlite_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serialises read-then-write requests on SQLite, which has no row locks: quota check +
    insert, and a session action's decision + write (PostgreSQL uses row locks and
    compare-and-set writes instead)."""
    embedded_agent: EmbeddedAgent | None = None
    """Set by `streamspace up`: a credential rotated for it is handed to it in-process."""
