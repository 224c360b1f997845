"""Stream tickets: who may get one, what one opens, and that it opens nothing else.

Everything runs against real xterm sessions (TigerVNC Xvnc via an agent subprocess with the
local backend), so "the stream opened" always means an RFB handshake through
browser WebSocket -> control plane -> agent WebSocket -> Xvnc succeeded. A refused ticket is
closed before the WebSocket is accepted, which the ASGI server turns into HTTP 403.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_streams_support import Desk, desk
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import wait_for, wait_state
from streamspace_testing.rfb import RFBClient, WebSocketTransport
from vnc_support import open_direct

pytestmark = pytest.mark.xvnc

PASSWORD = "user-pass-123"


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(tmp_path_factory.mktemp("streams-tickets")) as shared:
        yield shared


async def handshake_status(url: str, headers: dict[str, str] | None = None) -> int:
    """101 if the stream WebSocket was accepted (closed again at once), else the HTTP status."""
    try:
        ws = await connect(
            url,
            subprotocols=["binary"],  # type: ignore[list-item]
            additional_headers=headers,
            open_timeout=20,
        )
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def view(d: Desk, ticket: str, extra_query: str = "") -> RFBClient:
    """Open the stream with `ticket` and complete the RFB handshake plus one full update."""
    ws = await connect(
        d.ws_url(ticket) + extra_query,
        subprotocols=["binary"],  # type: ignore[list-item]
        max_size=None,
        compression=None,
        open_timeout=20,
    )
    async with asyncio.timeout(20):
        client = await RFBClient.over(WebSocketTransport(ws))
    await client.request_update(incremental=False, timeout=15)
    return client


def login(d: Desk, username: str) -> tuple[httpx.Client, dict[str, Any]]:
    r = d.admin.post(
        "/api/v1/users", json={"username": username, "password": PASSWORD, "role": "user"}
    )
    assert r.status_code == 201, r.text
    with d.cp.client() as anon:
        r = anon.post(
            "/api/v1/auth/login",
            json={"username": username, "password": PASSWORD, "refresh_token_delivery": "body"},
        )
    assert r.status_code == 200, r.text
    tokens: dict[str, Any] = r.json()
    client = d.cp.client(tokens["access_token"])
    d.clients.append(client)
    return client, tokens


async def wait_stream_count(d: Desk, n: int, timeout: float = 10) -> None:
    await asyncio.to_thread(
        wait_for, lambda: d.cp.state.streams.active_streams == n, timeout, 0.05, f"{n} streams"
    )


# ---- tests ---------------------------------------------------------------------------------


async def test_connect_returns_a_ticket_and_never_the_jwt(d: Desk) -> None:
    alice, tokens = login(d, "alice")
    session = d.start_session(alice)

    issued_at = datetime.now(UTC)
    r = alice.post(f"/api/v1/sessions/{session['id']}/connect")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"ticket", "ws_path", "expires_at", "viewer_url", "microphone"}
    # Neither the access token, the refresh token nor any JWT-looking string is handed out.
    for secret in (tokens["access_token"], tokens["refresh_token"]):
        assert secret not in r.text
        assert secret.split(".")[-1] not in r.text  # not even the signature part
    assert not re.search(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", r.text)
    assert "." not in body["ticket"] and len(body["ticket"]) >= 32
    # ws_path carries no credentials of its own: the ticket is the only token on the URL.
    assert body["ws_path"] == "/api/v1/streams/ws"
    assert "?" not in body["ws_path"] and "token" not in body["ws_path"].lower()
    assert body["viewer_url"] == f"/#/view/{session['id']}"
    assert tokens["access_token"] not in body["viewer_url"]
    expires = datetime.fromisoformat(body["expires_at"])
    ttl = d.cp.settings.stream_ticket_ttl_seconds
    assert issued_at < expires <= issued_at + timedelta(seconds=ttl + 2)

    client = await view(d, body["ticket"])
    try:
        assert client.name == "xterm (alice)"
        assert client.framebuffer_nonblank() or await client.wait_for(
            RFBClient.framebuffer_nonblank, timeout=10
        )
    finally:
        await client.close()
    await wait_stream_count(d, 0)
    d.stop_session(session["id"])


async def test_ticket_is_single_use(d: Desk) -> None:
    session = d.start_session()
    ticket = d.connect(session["id"])["ticket"]

    first = await view(d, ticket)
    # Reuse while the first stream is still open ...
    assert await handshake_status(d.ws_url(ticket)) == 403
    await first.close()
    await wait_stream_count(d, 0)
    # ... and after it closed.
    assert await handshake_status(d.ws_url(ticket)) == 403
    assert ticket not in d.cp.state.peers._tickets

    # A ticket that was refused for another reason is gone as well (consumed on any attempt).
    ticket2 = d.connect(session["id"])["ticket"]
    assert await handshake_status(d.ws_url(ticket2)) == 101
    assert await handshake_status(d.ws_url(ticket2)) == 403
    await wait_stream_count(d, 0)
    d.stop_session(session["id"])


async def test_ticket_expires(make_control_plane: Any, tmp_path: Path) -> None:
    with desk(tmp_path / "ttl", make_control_plane, stream_ticket_ttl_seconds=1) as short:
        session = short.start_session()
        # Control: a fresh ticket used at once opens the stream on this control plane.
        fresh = short.connect(session["id"])["ticket"]
        client = await view(short, fresh)
        await client.close()

        stale = short.connect(session["id"])
        expires = datetime.fromisoformat(stale["expires_at"])
        assert expires - datetime.now(UTC) <= timedelta(seconds=1.5)
        await asyncio.sleep(2)
        assert await handshake_status(short.ws_url(stale["ticket"])) == 403
        await wait_stream_count(short, 0)
        # Issuing a new ticket sweeps expired ones out of memory.
        unused = short.connect(session["id"])["ticket"]
        await asyncio.sleep(1.5)
        short.connect(session["id"])
        assert unused not in short.cp.state.peers._tickets


async def test_missing_or_garbage_ticket_is_refused(d: Desk) -> None:
    session = d.start_session()
    good = d.connect(session["id"])["ticket"]
    admin_jwt = d.admin.headers["Authorization"].removeprefix("Bearer ")

    assert await handshake_status(d.ws_url(None)) == 403
    assert await handshake_status(d.ws_url("")) == 403
    assert await handshake_status(d.ws_url(secrets.token_urlsafe(32))) == 403
    assert await handshake_status(d.ws_url("x" * 5000)) == 403
    assert await handshake_status(d.ws_url(good[:-1])) == 403  # close is not good enough
    assert good.upper() != good
    assert await handshake_status(d.ws_url(good.upper())) == 403
    # A valid JWT is not a ticket, neither in the query nor as a bearer header.
    assert await handshake_status(d.ws_url(admin_jwt)) == 403
    headers = {"Authorization": f"Bearer {admin_jwt}"}
    assert await handshake_status(d.ws_url(None), headers=headers) == 403
    # The ticket under another parameter name is not looked at (and so not spent either).
    assert await handshake_status(d.ws_url(None) + f"?token={good}") == 403
    assert d.cp.state.streams.active_streams == 0

    client = await view(d, good)  # still valid: none of the above consumed it
    await client.close()
    await wait_stream_count(d, 0)
    d.stop_session(session["id"])


async def test_connect_is_bound_to_the_owner_or_an_admin(d: Desk) -> None:
    owner, _ = login(d, "owner1")
    other, _ = login(d, "other1")
    session = d.start_session(owner)
    sid = session["id"]

    r = other.post(f"/api/v1/sessions/{sid}/connect")
    assert r.status_code == 404, r.text
    assert "ticket" not in r.text
    assert other.get(f"/api/v1/sessions/{sid}").status_code == 404
    assert other.post("/api/v1/sessions/no-such-session/connect").status_code == 404
    with d.cp.client() as anon:
        assert anon.post(f"/api/v1/sessions/{sid}/connect").status_code == 401
    bad = d.cp.client("not-a-jwt")
    try:
        assert bad.post(f"/api/v1/sessions/{sid}/connect").status_code == 401
    finally:
        bad.close()

    # An admin may connect to anyone's session, and the ticket really opens it.
    admin_ticket = d.connect(sid)["ticket"]
    client = await view(d, admin_ticket)
    assert client.name == "xterm (owner1)"
    await client.close()

    # The owner's ticket stops working once the owner is disabled before using it.
    ticket = d.connect(sid, owner)["ticket"]
    r = d.admin.patch("/api/v1/users/owner1", json={"is_active": False})
    assert r.status_code == 200, r.text
    assert await handshake_status(d.ws_url(ticket)) == 403
    await wait_stream_count(d, 0)
    d.stop_session(sid)


async def test_ticket_opens_only_the_session_it_was_issued_for(d: Desk) -> None:
    x = d.start_session()
    y = d.start_session()
    assert x["id"] != y["id"]

    # Make Y look different from X, typing straight into Y's VNC socket (not via the tunnel).
    y_row = d.row(y["id"])
    x_row = d.row(x["id"])
    assert y_row.endpoint_host and x_row.endpoint_host
    assert y_row.endpoint_host != x_row.endpoint_host
    direct_y = await open_direct(d.agent.state_dir, y["id"])
    direct_x = await open_direct(d.agent.state_dir, x["id"])
    try:
        await direct_y.request_update(incremental=False)
        before = direct_y.framebuffer_digest()
        await direct_y.pointer(20, 20)
        await direct_y.type_text("echo this-is-session-y " + "y" * 30 + "\n")
        assert await direct_y.wait_for_change(before, timeout=10)
        await direct_x.request_update(incremental=False)
        await direct_y.request_update(incremental=False)
        x_digest, y_digest = direct_x.framebuffer_digest(), direct_y.framebuffer_digest()
        assert x_digest != y_digest

        # X's ticket, with every plausible way of asking for Y bolted onto the URL.
        ticket = d.connect(x["id"])["ticket"]
        sneaky = f"&session_id={y['id']}&session={y['id']}&id={y['id']}"
        tunnel = await view(d, ticket, extra_query=sneaky)
        try:
            await tunnel.request_update(incremental=False)
            assert tunnel.framebuffer_digest() == x_digest
            assert tunnel.framebuffer_digest() != y_digest
        finally:
            await tunnel.close()
        await wait_stream_count(d, 0)
    finally:
        await direct_x.close()
        await direct_y.close()

    # A ticket for X dies with X, even though Y (same owner) is still running.
    ticket = d.connect(x["id"])["ticket"]
    d.stop_session(x["id"])
    assert await handshake_status(d.ws_url(ticket)) == 403
    assert await handshake_status(d.ws_url(ticket) + f"&session_id={y['id']}") == 403
    y_ticket = d.connect(y["id"])["ticket"]
    client = await view(d, y_ticket)
    await client.close()
    await wait_stream_count(d, 0)
    d.stop_session(y["id"])


async def test_connect_needs_a_running_session(d: Desk) -> None:
    session = d.start_session()
    sid = session["id"]

    # A ticket issued while running is refused once the session is hibernated.
    ticket = d.connect(sid)["ticket"]
    r = d.admin.post(f"/api/v1/sessions/{sid}/hibernate")
    assert r.status_code == 202, r.text
    wait_state(d.admin, sid, "hibernated", 30)
    assert await handshake_status(d.ws_url(ticket)) == 403

    r = d.admin.post(f"/api/v1/sessions/{sid}/connect")
    assert r.status_code == 409, r.text
    assert r.json()["current_state"] == "hibernated"
    assert "ticket" not in r.json()

    d.stop_session(sid)
    r = d.admin.post(f"/api/v1/sessions/{sid}/connect")
    assert r.status_code == 409, r.text
    assert r.json()["current_state"] == "stopped"
    await wait_stream_count(d, 0)
