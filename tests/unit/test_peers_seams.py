"""What a component hands to the other replicas, and what it keeps to itself (FakePeers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker

from peers_support import FakePeers
from streamspace.config import Settings
from streamspace.controlplane.authcache import AuthCache
from streamspace.controlplane.events import EventBus
from streamspace.controlplane.hub import AgentConnection, Hub
from streamspace.controlplane.peers import InProcessPeers, Ticket
from streamspace.controlplane.revocation import Revocations
from streamspace.protocol import Command


def _hub(peers: FakePeers) -> Hub:
    return Hub(db=async_sessionmaker(), settings=Settings(), replica_id="r1", peers=peers)


async def test_a_frame_goes_to_the_held_socket_else_to_the_peers() -> None:
    peers = FakePeers(reach={"elsewhere"})
    hub = _hub(peers)
    held = AgentConnection("held", ws=None)  # type: ignore[arg-type]
    hub.connections["held"] = held
    msg = Command(command_id="c1", action="stop", session_id="s")

    assert await hub.send_to_agent("held", msg) is True
    assert not held.queue.empty() and peers.called("send_many") == []
    assert await hub.send_to_agent("elsewhere", msg) is True
    assert await hub.send_to_agent("nowhere", msg) is False
    assert [c.args[0][0][0] for c in peers.called("send_many")] == ["elsewhere", "nowhere"]


async def test_disconnecting_an_agent_held_elsewhere_asks_the_peers_unless_local_only() -> None:
    peers = FakePeers()
    hub = _hub(peers)
    await hub.disconnect("a1", "revoked", "gone", local_only=True)
    assert peers.called("disconnect_agent") == []
    await hub.disconnect("a1", "revoked", "gone")
    assert [c.args for c in peers.called("disconnect_agent")] == [("a1", "revoked", "gone")]


async def test_events_and_revocations_reach_the_peers_once() -> None:
    peers = FakePeers()
    events = EventBus(peers=peers)
    async with events.subscribe("u1", sees_all=False) as sub:
        events.publish({"type": "session"}, owner_id="u1")
        events.publish({"type": "session"}, owner_id="u1", local_only=True)
        assert sub.queue.qsize() == 2
    assert [c.args for c in peers.called("publish_event")] == [({"type": "session"}, "u1")]

    closed: list[str] = []
    revocations = Revocations(auth_cache=AuthCache(0), db=async_sessionmaker(), peers=peers)
    with revocations.track("u1", 1, "stream", closed.append):
        assert revocations.revoke("u1", "signed out") == 1
        revocations.apply("u1", "from another replica")
    assert closed == ["signed out"]
    assert [c.args for c in peers.called("publish_revocation")] == [("u1", "signed out")]


async def test_in_process_tickets_are_single_use_and_expired_ones_are_swept() -> None:
    peers = InProcessPeers("r1")
    at = datetime.now(UTC)
    await peers.put_ticket("old", Ticket("s", "u", at - timedelta(seconds=1), 0), 1)
    await peers.put_ticket("new", Ticket("s", "u", at + timedelta(seconds=30), 0), 30)
    assert "old" not in peers._tickets  # swept when "new" was issued
    assert (await peers.take_ticket("new")) is not None
    assert (await peers.take_ticket("new")) is None
    assert await peers.send_many([("a", None), ("b", None)]) == [False, False]
