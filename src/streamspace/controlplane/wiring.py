"""Builds the control plane's components, each given the collaborators it uses.

The one place that decides how this replica talks to the others: `InProcessPeers` when it
runs alone, `RedisPeers` when `STREAMSPACE_REDIS_URL` is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

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
from streamspace.controlplane.loops import LeaderLease, Loops
from streamspace.controlplane.oidc import OpenIdProviders
from streamspace.controlplane.peers import InProcessPeers, Peers
from streamspace.controlplane.placement import Placement
from streamspace.controlplane.ratelimit import InFlight, TokenBuckets
from streamspace.controlplane.redis_peers import RedisPeers
from streamspace.controlplane.results import Results
from streamspace.controlplane.revocation import Revocations
from streamspace.controlplane.saml import SamlProviders
from streamspace.controlplane.state import AppState
from streamspace.controlplane.streams import StreamBroker
from streamspace.controlplane.thumbnails import Thumbnails
from streamspace.controlplane.timeouts import Timeouts
from streamspace.controlplane.transitions import Transitions
from streamspace.controlplane.writerturn import WriterTurn
from streamspace.db.engine import (
    is_sqlite,
    read_session_factory,
    session_factory,
    write_session_factory,
)


def request_slots(settings: Settings) -> int:
    """Pooled connections requests may hold at once; the rest stay free for the background
    loops, the hub and result batches, which do not queue behind requests."""
    total = settings.db_pool_size + settings.db_max_overflow
    return max(1, total - max(2, total // 5))


def make_peers(settings: Settings, replica_id: str) -> Peers:
    if settings.redis_url:
        return RedisPeers(url=settings.redis_url, replica_id=replica_id)
    return InProcessPeers(replica_id)


def build_state(
    settings: Settings, engine: AsyncEngine, *, replica_id: str, secret: str
) -> AppState:
    db = session_factory(engine)
    write_db = write_session_factory(engine)
    peers = make_peers(settings, replica_id)
    auth_cache = AuthCache(settings.auth_cache_seconds)
    events = EventBus(peers=peers)
    revocations = Revocations(auth_cache=auth_cache, db=db, peers=peers)
    writer_turn = WriterTurn(sqlite=is_sqlite(engine))
    hub = Hub(db=db, settings=settings, replica_id=replica_id, peers=peers)
    transitions = Transitions(settings=settings, events=events, hub=hub)
    placement = Placement(
        settings=settings,
        db=db,
        write_db=write_db,
        writer_turn=writer_turn,
        peers=peers,
        transitions=transitions,
    )
    results = Results(db=db, transitions=transitions, placement=placement)
    lifecycle = Lifecycle(
        settings=settings,
        transitions=transitions,
        placement=placement,
        results=results,
        writer_turn=writer_turn,
    )
    local_agent = EmbeddedAgentSlot()
    streams = StreamBroker(
        db=db,
        settings=settings,
        hub=hub,
        revocations=revocations,
        peers=peers,
        local_agent=local_agent,
    )
    agents = AgentEndpoint(
        db=db,
        settings=settings,
        replica_id=replica_id,
        hub=hub,
        results=results,
        placement=placement,
        streams=streams,
    )
    return AppState(
        settings=settings,
        engine=engine,
        db=db,
        read_db=read_session_factory(engine),
        write_db=write_db,
        replica_id=replica_id,
        secret=secret,
        peers=peers,
        events=events,
        login_throttle=LoginThrottle(
            failures_before_delay=settings.login_failures_before_delay,
            delay_seconds=settings.login_delay_seconds,
            max_delay_seconds=settings.login_max_delay_seconds,
            ip_failures_per_minute=settings.login_ip_failures_per_minute,
        ),
        user_requests=TokenBuckets(settings.user_requests_per_second, settings.user_request_burst),
        session_creates=InFlight(settings.user_concurrent_creates),
        auth_cache=auth_cache,
        api_keys=ApiKeys(db=db, ttl=settings.auth_cache_seconds),
        directory=Directory.from_settings(settings),
        oidc=OpenIdProviders.from_settings(settings),
        saml=SamlProviders(settings),
        db_slots=asyncio.Semaphore(request_slots(settings)),
        revocations=revocations,
        writer_turn=writer_turn,
        hub=hub,
        agents=agents,
        lifecycle=lifecycle,
        streams=streams,
        local_agent=local_agent,
        thumbnails=Thumbnails(streams=streams, ttl_seconds=settings.thumbnail_cache_seconds),
    )


def build_loops(state: AppState) -> Loops:
    return Loops(
        settings=state.settings,
        lease=LeaderLease(db=state.db, replica_id=state.replica_id),
        placement=state.lifecycle.placement,
        results=state.lifecycle.results,
        timeouts=Timeouts(
            settings=state.settings,
            db=state.db,
            hub=state.hub,
            transitions=state.lifecycle.transitions,
        ),
        agents=state.agents,
        streams=state.streams,
        revocations=state.revocations,
    )


class PeerInbox:
    """`peers.Inbox`: what another replica asks of this one, done with local delivery only."""

    def __init__(
        self, *, hub: Hub, events: EventBus, revocations: Revocations, placement: Placement
    ) -> None:
        self.hub = hub
        self.events = events
        self.revocations = revocations
        self.placement = placement

    def held_agents(self) -> Iterable[str]:
        return self.hub.connections.keys()

    def offer_frame(self, agent_id: str, frame: str) -> bool | None:
        conn = self.hub.connections.get(agent_id)
        return None if conn is None else conn.offer_frame(frame)

    async def disconnect_agent(self, agent_id: str, code: str, message: str) -> None:
        await self.hub.disconnect(agent_id, code, message, local_only=True)

    def deliver_event(self, event: dict[str, Any], owner_id: str) -> None:
        self.events.deliver(event, owner_id=owner_id)

    def apply_revocation(self, user_id: str, reason: str) -> None:
        self.revocations.apply(user_id, reason)

    def wake_placer(self) -> None:
        self.placement.wake_placer(local_only=True)


def start_peers(state: AppState) -> None:
    state.peers.start(
        PeerInbox(
            hub=state.hub,
            events=state.events,
            revocations=state.revocations,
            placement=state.lifecycle.placement,
        )
    )
