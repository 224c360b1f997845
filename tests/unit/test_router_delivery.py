"""Frames that crossed Redis are handed to the agent's socket queue without ever waiting."""

from __future__ import annotations

import asyncio
import json

from sqlalchemy.ext.asyncio import async_sessionmaker

from peers_support import FakePeers
from streamspace.config import Settings
from streamspace.controlplane.authcache import AuthCache
from streamspace.controlplane.events import EventBus
from streamspace.controlplane.hub import AgentConnection, Hub
from streamspace.controlplane.placement import Placement
from streamspace.controlplane.redis_peers import RedisPeers, _to_agent_payload, agent_channel
from streamspace.controlplane.revocation import Revocations
from streamspace.controlplane.transitions import Transitions
from streamspace.controlplane.wiring import PeerInbox
from streamspace.controlplane.writerturn import WriterTurn
from streamspace.protocol import Command


def _router(connections: dict[str, AgentConnection]) -> RedisPeers:
    """A RedisPeers whose inbox is this replica's real one, over a hub holding `connections`."""
    settings = Settings()
    peers = FakePeers()
    db = async_sessionmaker()  # never used: delivery touches no database
    hub = Hub(db=db, settings=settings, replica_id="r1", peers=peers)
    hub.connections.update(connections)
    events = EventBus(peers=peers)
    placement = Placement(
        settings=settings,
        db=db,
        write_db=db,
        writer_turn=WriterTurn(sqlite=False),
        peers=peers,
        transitions=Transitions(settings=settings, events=events, hub=hub),
    )
    revocations = Revocations(auth_cache=AuthCache(0), db=db, peers=peers)
    router = RedisPeers(url="redis://127.0.0.1:1/0", replica_id="r1")  # never connected here
    router.bind(PeerInbox(hub=hub, events=events, revocations=revocations, placement=placement))
    return router


def _frame(n: int) -> bytes:
    return _to_agent_payload(Command(command_id=f"c{n}", action="stop", session_id="s")).encode()


async def test_a_full_agent_queue_drops_the_frame_instead_of_stalling_the_listener() -> None:
    stuck = AgentConnection("stuck", ws=None)  # type: ignore[arg-type]
    ok = AgentConnection("ok", ws=None)  # type: ignore[arg-type]
    while stuck.offer_frame("x"):
        pass
    router = _router({"stuck": stuck, "ok": ok})

    await asyncio.wait_for(router._handle(agent_channel("stuck").encode(), _frame(1)), 1)
    await asyncio.wait_for(router._handle(agent_channel("ok").encode(), _frame(2)), 1)

    assert router.dropped == 1
    assert router.delivered == 1
    assert json.loads(ok.queue.get_nowait() or "")["command_id"] == "c2"


async def test_frames_for_an_agent_held_elsewhere_are_ignored() -> None:
    ok = AgentConnection("ok", ws=None)  # type: ignore[arg-type]
    router = _router({"ok": ok})
    await router._handle(agent_channel("gone").encode(), _frame(3))
    assert router.delivered == 0 and router.dropped == 0 and ok.queue.empty()
