"""Telling the lease holder about placement work: throttled, but never dropped."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import async_sessionmaker

from peers_support import FakePeers
from streamspace.config import Settings
from streamspace.controlplane.events import EventBus
from streamspace.controlplane.hub import Hub
from streamspace.controlplane.placement import REMOTE_WAKE_GAP_SECONDS, Placement
from streamspace.controlplane.transitions import Transitions
from streamspace.controlplane.writerturn import WriterTurn


def _lifecycle() -> tuple[Placement, list[float]]:
    settings = Settings()
    peers = FakePeers()
    db = async_sessionmaker()  # never used: nothing here touches the database
    hub = Hub(db=db, settings=settings, replica_id=peers.replica_id, peers=peers)
    lc = Placement(
        settings=settings,
        db=db,
        write_db=db,
        writer_turn=WriterTurn(sqlite=False),
        peers=peers,
        transitions=Transitions(settings=settings, events=EventBus(peers=peers), hub=hub),
    )
    return lc, peers.wakes


async def test_a_burst_sends_one_wake_at_once_and_one_at_the_end_of_the_gap() -> None:
    lc, sent = _lifecycle()
    for _ in range(5):
        lc.wake_placer()
    assert len(sent) == 1  # the first at once
    await asyncio.sleep(REMOTE_WAKE_GAP_SECONDS * 3)
    # The other four were not dropped: one trailing wake covers them (a session created just
    # after the lease holder read its queue would otherwise wait for some later wake).
    assert len(sent) == 2
    assert sent[1] - sent[0] >= REMOTE_WAKE_GAP_SECONDS * 0.9


async def test_local_only_wakes_and_quiet_periods() -> None:
    lc, sent = _lifecycle()
    lc.wake_placer(local_only=True)
    assert sent == [] and lc._place_wakeup.is_set()
    lc.wake_placer()
    await asyncio.sleep(REMOTE_WAKE_GAP_SECONDS * 2)
    lc.wake_placer()  # after a quiet gap: at once, no trailing wake
    assert len(sent) == 2
    await asyncio.sleep(REMOTE_WAKE_GAP_SECONDS * 2)
    assert len(sent) == 2
