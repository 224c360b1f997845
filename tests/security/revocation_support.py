"""Helpers for the revocation tests (this module holds no tests): a viewer as a browser opens
it, a live event stream, and how long each stays open once its user is signed out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from replicas_support import SSEReader
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamspace_testing.rfb import RFBClient, WebSocketTransport

LIMIT = 2.0
"""Seconds within which a revocation must close every open connection of its user."""


@dataclass
class Viewer:
    ws: ClientConnection
    rfb: RFBClient


async def open_viewer(base_url: str, ws_path: str, ticket: str) -> Viewer:
    """WebSocket with the ticket -> RFB handshake -> a non-blank frame from the real Xvnc."""
    ws_base = "ws" + base_url.removeprefix("http")
    ws = await connect(
        f"{ws_base}{ws_path}?ticket={ticket}",
        subprotocols=["binary"],  # type: ignore[list-item]
        max_size=None,
        compression=None,
        open_timeout=20,
    )
    async with asyncio.timeout(20):
        rfb = await RFBClient.over(WebSocketTransport(ws))
    await rfb.request_update(False, timeout=20)
    assert await rfb.wait_for(RFBClient.framebuffer_nonblank, timeout=20), "blank stream"
    return Viewer(ws, rfb)


async def closed_within(viewer: Viewer, started: float, limit: float = LIMIT) -> float:
    """Seconds from `started` (time.monotonic) until the server closed the viewer's socket;
    fails if it is still open `limit` seconds after `started`."""

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await viewer.ws.recv()

    budget = max(0.0, limit - (time.monotonic() - started))
    try:
        await asyncio.wait_for(drain(), budget)
    except TimeoutError:
        raise AssertionError(f"the viewer was still open {limit} s after the revocation") from None
    return time.monotonic() - started


async def events_ended_within(sse: SSEReader, started: float, limit: float = LIMIT) -> float:
    """Seconds from `started` until the event stream ended with a `revoked` event."""
    budget = max(0.0, limit - (time.monotonic() - started))
    await asyncio.to_thread(sse.join, budget)
    assert not sse.is_alive(), f"the event stream was still open {limit} s after the revocation"
    names = [name for name, _ in sse.events]
    assert names and names[-1] == "revoked", names
    return time.monotonic() - started


def open_events(url: str, token: str) -> SSEReader:
    sse = SSEReader(url + "/api/v1/events", token)
    sse.start()
    assert sse.ready.wait(10) and sse.status == 200, (sse.status, sse.error)
    return sse


def assert_signed_out(viewer: Viewer, *fragments: str) -> None:
    """The viewer was closed with 4401 and a reason that says why."""
    assert viewer.ws.close_code == 4401, (viewer.ws.close_code, viewer.ws.close_reason)
    reason = viewer.ws.close_reason or ""
    assert "signed out" in reason, reason
    for fragment in fragments:
        assert fragment in reason, reason
