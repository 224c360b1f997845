"""Another site's page cannot open the viewer WebSocket or the event stream.

Browsers send `Origin` on every WebSocket handshake and cannot be made to lie about it, so a
cross-site page that got hold of a ticket (or rode on a session) is recognised by it. The
WebSocket case runs against a real xterm session (Xvnc via a real agent), so "accepted" means
the stream really opened.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import ControlPlane

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_streams_support import Desk, desk


def events_status(cp: ControlPlane, origin: str | None) -> tuple[int, str]:
    headers = {"Origin": origin} if origin else {}
    with cp.login() as c, c.stream("GET", "/api/v1/events", headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.text
        first = next(r.iter_text())
        return 200, first


def test_event_stream_refuses_foreign_origins(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp").start()
    try:
        for origin in ("https://evil.example", "null", f"{cp.url}.evil.example"):
            status, text = events_status(cp, origin)
            assert status == 403, (origin, status, text)
            assert "cross-origin" in text
        for origin in (cp.url, None):  # the UI itself; a non-browser client
            status, text = events_status(cp, origin)
            assert status == 200 and "event: hello" in text, (origin, text)
    finally:
        cp.stop()


def test_public_url_is_the_one_allowed_origin(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", public_url="https://streamspace.example/").start()
    try:
        assert events_status(cp, "https://streamspace.example")[0] == 200
        assert events_status(cp, "https://streamspace.example:443")[0] == 200
        # with a public URL set, the direct address is not a browser origin any more
        assert events_status(cp, cp.url)[0] == 403
        assert events_status(cp, "http://streamspace.example")[0] == 403
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(tmp_path_factory.mktemp("origins")) as shared:
        yield shared


async def handshake(d: Desk, ticket: str, origin: str | None) -> int:
    try:
        ws = await connect(
            d.ws_url(ticket),
            origin=origin,  # type: ignore[arg-type]
            subprotocols=["binary"],  # type: ignore[list-item]
            open_timeout=20,
        )
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def test_cross_origin_viewer_websocket_is_refused(d: Desk) -> None:
    session = d.start_session()
    ticket = d.connect(session["id"])["ticket"]
    for origin in ("https://evil.example", "null", f"http://localhost:{d.cp.port}"):
        assert await handshake(d, ticket, origin) == 403, origin
    # The refused attempts did not burn the single-use ticket: the UI's own origin opens it.
    assert await handshake(d, ticket, d.cp.url) == 101
    # ... once.
    assert await handshake(d, ticket, d.cp.url) == 403
    # Clients that are not browsers send no Origin and are judged by the ticket alone.
    assert await handshake(d, d.connect(session["id"])["ticket"], None) == 101
