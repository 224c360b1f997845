"""The event-loop lag probe records how long other work held the loop."""

from __future__ import annotations

import asyncio
import time

from streamspace.controlplane import metrics
from streamspace.controlplane.loops import probe_event_loop_lag


def _bucket(le: str) -> float:
    value = metrics.registry.get_sample_value(
        "streamspace_event_loop_lag_seconds_bucket", {"le": le}
    )
    return value or 0.0


async def test_a_blocked_loop_shows_up_as_lag() -> None:
    total0, quick0, prompt0 = _bucket("+Inf"), _bucket("0.05"), _bucket("0.005")
    probe = asyncio.create_task(probe_event_loop_lag(interval=0.01))
    try:
        await asyncio.sleep(0.05)  # a few on-time ticks
        time.sleep(0.15)  # work that holds the loop
        await asyncio.sleep(0.05)
    finally:
        probe.cancel()
    observed = _bucket("+Inf") - total0
    late = observed - (_bucket("0.05") - quick0)
    assert observed >= 3
    assert late >= 1, "a 150 ms block was not recorded as more than 50 ms of lag"
    assert _bucket("0.005") - prompt0 >= 1, "no tick was on time while the loop was free"
