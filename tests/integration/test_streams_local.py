"""Viewers of `streamspace up`: the embedded agent hands the control plane its connection to the
session's VNC socket instead of dialling a loopback WebSocket back (docs/streaming.md). Real
product process, real Xvnc; the same pixels must arrive as from the VNC socket itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from api_support import login
from test_streams_support import wait_until

from conftest import XVNC_MISSING, require
from product_support import Product
from streamspace_testing.rfb import RFBClient, WebSocketTransport
from vnc_support import open_direct, vnc_clients

pytestmark = pytest.mark.xvnc


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    require(XVNC_MISSING)
    p = Product(tmp_path_factory.mktemp("streams-local") / "data")
    try:
        p.start()
        yield p
    finally:
        p.stop()


def running_xterm(c: httpx.Client) -> str:
    sid = str(c.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"])
    deadline = time.time() + 30
    while time.time() < deadline:
        state = c.get(f"/api/v1/sessions/{sid}").json()["state"]
        if state == "running":
            return sid
        assert state in ("pending", "scheduled", "starting"), f"session went {state}"
        time.sleep(0.1)
    raise AssertionError("xterm session never ran")


def test_embedded_agent_streams_without_dial_back(up: Product) -> None:
    c = login(up)
    try:
        sid = running_xterm(c)
        state_dir = up.data_dir / "agent"

        async def scenario() -> None:
            ticket = c.post(f"/api/v1/sessions/{sid}/connect").json()
            url = up.url.replace("http://", "ws://") + ticket["ws_path"]
            direct = await open_direct(state_dir, sid)
            viewer = await RFBClient.over(
                await WebSocketTransport.connect(f"{url}?ticket={ticket['ticket']}")
            )
            try:
                await direct.request_update(False)
                assert await direct.wait_for(RFBClient.framebuffer_nonblank, timeout=15)
                # Byte-for-byte the same raw framebuffer as straight from the VNC socket (once
                # xterm has finished drawing, so both full updates see the same screen).
                for _ in range(10):
                    await direct.request_update(False)
                    await viewer.request_update(False)
                    if viewer.framebuffer_digest() == direct.framebuffer_digest():
                        break
                    await asyncio.sleep(0.3)
                assert viewer.framebuffer_nonblank()
                assert viewer.framebuffer_digest() == direct.framebuffer_digest()
                assert vnc_clients(sid) == 2  # the direct client + the control plane

                # Input through the tunnel reaches the session: the direct view changes.
                before = direct.framebuffer_digest()
                await viewer.type_text("echo tunnelled\n")
                assert await direct.wait_for_change(before, timeout=10)
            finally:
                await viewer.close()
            # Closing the browser end closes the control plane's connection to Xvnc.
            await wait_until(lambda: vnc_clients(sid) == 1, 10, "tunnel connection closed")
            await direct.close()

        asyncio.run(scenario())
        c.delete(f"/api/v1/sessions/{sid}")
    finally:
        c.close()

    log = up.log()
    assert f"stream_open path=local session_id={sid}" in log
    assert "stream_closed path=local" in log
    assert "stream_id=" not in log  # both ends of a dialled-back stream log its stream_id
