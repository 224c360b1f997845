"""Telling the lease holder about placement work: throttled, but never dropped."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from streamspace.config import Settings
from streamspace.controlplane.lifecycle import REMOTE_WAKE_GAP_SECONDS, Lifecycle


def _lifecycle() -> tuple[Lifecycle, list[float]]:
    state: Any = SimpleNamespace(settings=Settings())
    lc = Lifecycle(state)
    sent: list[float] = []
    loop = asyncio.get_running_loop()
    lc.remote_wake = lambda: sent.append(loop.time())
    return lc, sent


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
