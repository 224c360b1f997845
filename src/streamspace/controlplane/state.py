"""Per-process wiring: what a request handler can reach through `request.app.state.ss`.

Built once by `wiring.build_state`. The components in it are given their collaborators as
arguments; none of them takes this object.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from streamspace.config import Settings
from streamspace.controlplane.agentsocket import AgentEndpoint
from streamspace.controlplane.apikeys import ApiKeys
from streamspace.controlplane.authcache import AuthCache
from streamspace.controlplane.directory import Directory
from streamspace.controlplane.embedded import EmbeddedAgentSlot
from streamspace.controlplane.events import EventBus
from streamspace.controlplane.hub import Hub
from streamspace.controlplane.lifecycle import Lifecycle
from streamspace.controlplane.loginthrottle import LoginThrottle
from streamspace.controlplane.oidc import OpenIdProviders
from streamspace.controlplane.peers import Peers
from streamspace.controlplane.ratelimit import InFlight, TokenBuckets
from streamspace.controlplane.revocation import Revocations
from streamspace.controlplane.saml import SamlProviders
from streamspace.controlplane.streams import StreamBroker
from streamspace.controlplane.thumbnails import Thumbnails
from streamspace.controlplane.writerturn import WriterTurn
from streamspace.db.engine import Database


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
    peers: Peers
    """What crosses replicas: in-process with one replica, Redis with several."""
    events: EventBus
    login_throttle: LoginThrottle
    user_requests: TokenBuckets
    """Each user's request rate (deps.token_claims)."""
    session_creates: InFlight
    """Each user's session creations under way (deps.create_turn)."""
    auth_cache: AuthCache
    api_keys: ApiKeys
    directory: Directory | None
    """LDAP / Active Directory login; None when `STREAMSPACE_LDAP_URL` is not set."""
    oidc: OpenIdProviders
    """The OpenID Providers users may sign in with (`STREAMSPACE_OIDC_PROVIDERS`)."""
    saml: SamlProviders
    """The SAML identity providers of `STREAMSPACE_SAML_PROVIDERS` (none: an empty registry)."""
    db_slots: asyncio.Semaphore
    """Request sessions allowed at once (see deps.get_db); sized from the pool by wiring."""
    revocations: Revocations
    writer_turn: WriterTurn
    """Serialises read-then-write requests on SQLite, which has no row locks: quota check +
    insert, and a session action's decision + write (PostgreSQL uses row locks and
    compare-and-set writes instead)."""
    hub: Hub
    agents: AgentEndpoint
    lifecycle: Lifecycle
    streams: StreamBroker
    local_agent: EmbeddedAgentSlot
    """Filled by `streamspace up`: a credential rotated for it is handed to it in-process."""
    thumbnails: Thumbnails
