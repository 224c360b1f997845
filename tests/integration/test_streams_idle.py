"""Stream traffic as activity, idle hibernation and the maximum session duration.

The control plane counts a session as active while bytes flow through one of its streams: each
pump touches the session at most every ~5 s and a loop writes those touches to
`sessions.last_activity` every ~5 s. `Lifecycle.cull` (every idle_check_interval_seconds, 0.5 s
here) hibernates running sessions idle past idle_timeout_seconds and stops sessions older than
max_duration_seconds. The API refuses timeouts under 60 s, so the tests write the columns
directly.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from test_streams_support import Desk, desk
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import wait_state
from streamspace_testing.rfb import RFBClient, RFBError

pytestmark = pytest.mark.xvnc


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(tmp_path_factory.mktemp("streams-idle"), idle_check_interval_seconds=0.5) as shared:
        yield shared


def events(d: Desk, sid: str) -> list[dict[str, Any]]:
    r = d.admin.get(f"/api/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


def state(d: Desk, sid: str) -> str:
    return str(d.row(sid).state)


async def keep_busy(client: RFBClient, seconds: float) -> int:
    """Real viewer traffic both ways for `seconds`: small full-update requests, ~10 a second."""
    deadline = time.monotonic() + seconds
    updates = 0
    while time.monotonic() < deadline:
        await client.request_update(incremental=False, width=32, height=32, timeout=10)
        updates += 1
        await asyncio.sleep(0.1)
    return updates


async def test_stream_traffic_keeps_a_session_active(d: Desk) -> None:
    """last_activity follows the traffic, so a watched session outlives its idle timeout."""
    sid = d.start_session()["id"]
    # Idle for 5 s already, with a 14 s timeout: left alone it would be hibernated ~9 s from
    # now. With traffic, last_activity lags real time by at most ~10.5 s (touch every 5 s +
    # flush every 5 s + the 0.5 s cull period), which stays under 14 s.
    start_marker = datetime.now(UTC) - timedelta(seconds=5)
    d.set_columns(sid, idle_timeout_seconds=14, last_activity=start_marker)

    client = await d.open_viewer(sid)
    seen = [d.row(sid).last_activity]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await keep_busy(client, 1.0)
            assert state(d, sid) == "running", events(d, sid)
            la = d.row(sid).last_activity
            if la != seen[-1]:
                seen.append(la)
    finally:
        await client.close()

    advances = seen[1:]
    print(f"\nlast_activity advanced {len(advances)} times in 20 s of traffic")
    assert advances, "stream traffic never updated last_activity"
    assert all(b > a for a, b in itertools.pairwise(seen)), seen
    # Not only the connect: traffic kept touching it (first flush <= ~5 s, later ones too).
    assert len(advances) >= 2, seen
    assert seen[-1] > datetime.now(UTC) - timedelta(seconds=12)
    assert not [e for e in events(d, sid) if e["kind"] == "hibernating"]
    d.stop_session(sid)


async def test_idle_session_is_hibernated_with_an_event(d: Desk) -> None:
    sid = d.start_session()["id"]
    ticket = d.connect(sid)["ticket"]
    d.set_columns(sid, idle_timeout_seconds=2)
    started = time.monotonic()
    body = wait_state(d.admin, sid, "hibernated", 30)
    print(f"\nidle (timeout 2 s) -> hibernated after {time.monotonic() - started:.1f}s")

    kinds = [e["kind"] for e in body["events"]]
    hibernating = [e for e in body["events"] if e["kind"] == "hibernating"]
    assert len(hibernating) == 1, kinds  # culled once, not on every pass
    msg = hibernating[0]["message"]
    assert re.fullmatch(r"idle for \d+ s \(timeout 2 s\); hibernated automatically", msg), msg
    assert int(msg.split()[2]) >= 2
    assert hibernating[0]["data"].get("previous") == "running"
    assert kinds[-1] == "hibernated"
    assert kinds.index("hibernating") < kinds.index("hibernated")
    assert body["allowed_actions"] and "wake" in body["allowed_actions"]
    row = d.row(sid)
    assert row.endpoint_host is None
    # The stream the user was about to open is not there any more.
    r = d.admin.post(f"/api/v1/sessions/{sid}/connect")
    assert r.status_code == 409, r.text
    with pytest.raises(InvalidStatus) as refused:
        await connect(d.ws_url(ticket), open_timeout=10)
    assert refused.value.response.status_code == 403
    d.stop_session(sid)


async def test_session_past_max_duration_is_stopped_with_an_event(d: Desk) -> None:
    running = d.start_session()["id"]
    hibernated = d.start_session()["id"]
    r = d.admin.post(f"/api/v1/sessions/{hibernated}/hibernate")
    assert r.status_code == 202, r.text
    wait_state(d.admin, hibernated, "hibernated", 30)

    viewer = await d.open_viewer(running)
    await viewer.request_update(incremental=False)
    streams = d.cp.state.streams
    assert streams.active_streams == 1

    d.set_columns(running, max_duration_seconds=1)
    d.set_columns(hibernated, max_duration_seconds=1)
    for sid in (running, hibernated):
        body = wait_state(d.admin, sid, "stopped", 30)
        kinds = [e["kind"] for e in body["events"]]
        stopping = [e for e in body["events"] if e["kind"] == "stopping"]
        assert len(stopping) == 1, kinds
        assert stopping[0]["message"] == (
            "reached its maximum duration of 1 s; stopped automatically"
        )
        assert kinds[-1] == "stopped", kinds
        assert "hibernating" not in kinds[kinds.index("stopping") :]
    assert [
        e["data"].get("previous") for e in events(d, hibernated) if e["kind"] == "stopping"
    ] == ["hibernated"]

    # The viewer of the stopped session was disconnected.
    with pytest.raises((RFBError, ConnectionClosed)):
        for _ in range(50):
            await viewer.request_update(incremental=True, timeout=10)
    await viewer.close()
    deadline = time.monotonic() + 10
    while streams.active_streams and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert streams.active_streams == 0
