"""Revocation reaches open connections (issue 12, part 4), on one control plane.

A viewer WebSocket and an event stream are authorised once, when they open; before this, a user
who logged out, changed their password or was disabled or deleted kept watching (and typing
into) their desktop for as long as the socket stayed open. Each test here opens a real viewer
(browser WebSocket -> control plane -> agent WebSocket -> real Xvnc, a non-blank frame as proof)
and the user's event stream, pulls one trigger through the API as a user or an admin would, and
requires both to be closed within 2 s, the viewer with 4401 and a reason. The control planes
recheck open connections against the database only once an hour here, so what closes them is
the revocation itself; the recheck, the safety net for a revocation nothing announced, has its
own test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from replicas_support import SSEReader
from revocation_support import (
    LIMIT,
    Viewer,
    assert_signed_out,
    closed_within,
    events_ended_within,
    open_events,
    open_viewer,
)
from sqlalchemy import text
from test_agents_support import xvnc_pids
from test_streams_support import Desk, desk
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import XVNC_MISSING, require, wait_for, wait_state
from product_support import Product

PASSWORD = "user-pass-123"


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(
        tmp_path_factory.mktemp("revocation"),
        connection_recheck_seconds=3600,
        login_rate_per_minute=10_000,
    ) as shared:
        yield shared


@dataclass
class Victim:
    id: str
    name: str
    client: httpx.Client
    token: str
    session_id: str
    viewer: Viewer
    sse: SSEReader


def token_of(client: httpx.Client) -> str:
    return client.headers["Authorization"].split(" ", 1)[1]


@contextlib.asynccontextmanager
async def victim(d: Desk, name: str) -> AsyncIterator[Victim]:
    """A user with a running xterm, its viewer open and its event stream listening."""
    client = d.user(name)
    user_id = client.get("/api/v1/auth/me").json()["id"]
    session = await asyncio.to_thread(d.start_session, client)
    ticket = d.connect(session["id"], client)
    viewer = await open_viewer(d.cp.url, ticket["ws_path"], ticket["ticket"])
    sse = open_events(d.cp.url, token_of(client))
    try:
        yield Victim(user_id, name, client, token_of(client), session["id"], viewer, sse)
    finally:
        await viewer.rfb.close()
        sse.close()


async def assert_all_closed(v: Victim, started: float, *reason: str) -> None:
    viewer_s = await closed_within(v.viewer, started)
    events_s = await events_ended_within(v.sse, started)
    assert_signed_out(v.viewer, *reason)
    print(f"viewer closed after {viewer_s:.3f} s, event stream after {events_s:.3f} s")


async def call(method: Any, *args: Any, **kwargs: Any) -> httpx.Response:
    return await asyncio.to_thread(method, *args, **kwargs)


def session_events(d: Desk, session_id: str) -> list[dict[str, Any]]:
    r = d.admin.get(f"/api/v1/sessions/{session_id}")
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


# ---- the user's own actions -----------------------------------------------------------------


async def test_logout_closes_the_users_viewer_and_event_stream(d: Desk) -> None:
    async with victim(d, "rv-logout") as v:
        started = time.monotonic()
        r = await call(v.client.post, "/api/v1/auth/logout", json={})
        assert r.status_code == 204, r.text
        await assert_all_closed(v, started, "logged out")


async def test_password_change_closes_the_users_viewer_and_event_stream(d: Desk) -> None:
    async with victim(d, "rv-password") as v:
        started = time.monotonic()
        r = await call(
            v.client.post,
            "/api/v1/auth/password",
            json={"current_password": PASSWORD, "new_password": "another-pass-456"},
        )
        assert r.status_code == 200, r.text
        await assert_all_closed(v, started, "password")
        # The new tokens the change handed out open a new viewer at once.
        c = d.cp.client(r.json()["access_token"])
        d.clients.append(c)
        ticket = d.connect(v.session_id, c)
        again = await open_viewer(d.cp.url, ticket["ws_path"], ticket["ticket"])
        await again.rfb.close()


async def test_a_ticket_issued_before_logout_opens_nothing_after_it(d: Desk) -> None:
    async with victim(d, "rv-ticket") as v:
        ticket = d.connect(v.session_id, v.client)
        r = await call(v.client.post, "/api/v1/auth/logout", json={})
        assert r.status_code == 204, r.text
        try:
            ws = await connect(
                d.ws_url(ticket["ticket"]),
                subprotocols=["binary"],  # type: ignore[list-item]
                open_timeout=20,
            )
        except InvalidStatus as exc:
            assert exc.response.status_code == 403
        else:
            await ws.close()
            raise AssertionError("a ticket from before the logout opened a stream")


# ---- an admin's actions ---------------------------------------------------------------------


async def test_sign_out_everywhere_closes_only_that_users_connections(d: Desk) -> None:
    async with victim(d, "rv-signout") as v, victim(d, "rv-bystander") as bystander:
        with d.cp.client() as anon:
            r = anon.post(
                "/api/v1/auth/login",
                json={"username": v.name, "password": PASSWORD, "refresh_token_delivery": "body"},
            )
            assert r.status_code == 200, r.text
            refresh_token = r.json()["refresh_token"]
        started = time.monotonic()
        r = await call(d.admin.post, f"/api/v1/users/{v.id}/sign-out")
        assert r.status_code == 204, r.text
        await assert_all_closed(v, started, "signed out everywhere by admin")

        # Every token the user held is dead: access, and refresh (which would mint new ones).
        assert v.client.get("/api/v1/auth/me").status_code == 401
        with d.cp.client() as anon:
            r = anon.post("/api/v1/auth/refresh", json={"refresh_token": refresh_token})
            assert r.status_code == 401, r.text
        # Another user's viewer and event stream are untouched.
        digest = bystander.viewer.rfb.framebuffer_digest()
        await bystander.viewer.rfb.type_text("echo still-here\n")
        assert await bystander.viewer.rfb.wait_for_change(digest, timeout=5)
        assert bystander.sse.is_alive()
        assert bystander.client.get("/api/v1/auth/me").status_code == 200
        r = d.admin.get("/api/v1/audit", params={"action": "user.sign_out"})
        assert [e["resource_id"] for e in r.json()["items"]] == [v.id]


async def test_admin_password_reset_closes_the_users_connections(d: Desk) -> None:
    async with victim(d, "rv-reset") as v:
        started = time.monotonic()
        r = await call(d.admin.patch, f"/api/v1/users/{v.id}", json={"password": "reset-pass-789"})
        assert r.status_code == 200, r.text
        await assert_all_closed(v, started, "password was reset by admin")


async def test_disabling_closes_connections_and_hibernates_sessions_saying_why(d: Desk) -> None:
    async with victim(d, "rv-disable") as v:
        started = time.monotonic()
        r = await call(d.admin.patch, f"/api/v1/users/{v.id}", json={"is_active": False})
        assert r.status_code == 200, r.text
        await assert_all_closed(v, started, "disabled by admin")

        await asyncio.to_thread(wait_state, d.admin, v.session_id, "hibernated", 30)
        events = session_events(d, v.session_id)
        why = [e for e in events if e["kind"] == "hibernating"]
        assert why and "account was disabled by admin" in why[-1]["message"], events
        # Enabled again, the user finds the session hibernated with the home kept, and wakes it.
        r = d.admin.patch(f"/api/v1/users/{v.id}", json={"is_active": True})
        assert r.status_code == 200, r.text
        c = d.cp.login(v.name, PASSWORD)
        d.clients.append(c)
        assert c.post(f"/api/v1/sessions/{v.session_id}/wake").status_code == 202
        await asyncio.to_thread(wait_state, c, v.session_id, "running", 60)


def activity_flushes(d: Desk) -> float:
    for line in d.admin.get("/metrics").text.splitlines():
        if line.startswith('streamspace_loop_runs_total{loop="activity"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_deleting_closes_connections_and_stops_sessions(d: Desk) -> None:
    async with victim(d, "rv-delete") as v:
        assert xvnc_pids(v.session_id), "no Xvnc for the victim's session"
        d.cp.state.streams.touch(v.session_id)  # activity not yet written when the row goes
        flushes = activity_flushes(d)
        started = time.monotonic()
        r = await call(d.admin.delete, f"/api/v1/users/{v.id}")
        assert r.status_code == 204, r.text
        await assert_all_closed(v, started, "deleted")

        wait_for(lambda: not xvnc_pids(v.session_id), 30, what="the deleted user's Xvnc to stop")
        assert d.admin.get(f"/api/v1/sessions/{v.session_id}").status_code == 404
        r = d.admin.get("/api/v1/audit", params={"action": "user.delete"})
        entry = next(e for e in r.json()["items"] if e["resource_id"] == v.id)
        assert entry["detail"]["sessions_stopped"] == [v.session_id], entry
        # Stream activity is still recorded for everyone else (the batch that held the deleted
        # session's row used to fail on every later try).
        wait_for(lambda: activity_flushes(d) > flushes, 15, what="an activity flush to succeed")


# ---- the safety net -------------------------------------------------------------------------


def test_a_change_made_behind_the_api_closes_event_streams_at_the_next_recheck(
    make_control_plane: Any,
) -> None:
    """Nothing announces a write straight to the database; the periodic recheck finds it."""
    cp = make_control_plane(connection_recheck_seconds=0.5, login_rate_per_minute=10_000)
    c = cp.create_user("rv-behind")
    user_id = c.get("/api/v1/auth/me").json()["id"]
    sse = open_events(cp.url, token_of(c))
    try:

        async def bump() -> None:
            async with cp.state.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE users SET token_version = token_version + 1 WHERE id = :id"),
                    {"id": user_id},
                )

        cp.run(bump())
        started = time.monotonic()
        asyncio.run(events_ended_within(sse, started, LIMIT))
    finally:
        sse.close()
        c.close()


# ---- `streamspace up`: the embedded agent's direct path -------------------------------------


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Product]:
    require(XVNC_MISSING)
    p = Product(tmp_path / "data", env={"STREAMSPACE_CONNECTION_RECHECK_SECONDS": "3600"})
    try:
        p.start()
        yield p
    finally:
        p.stop()


async def test_logout_closes_a_viewer_of_streamspace_up(up: Product) -> None:
    """`up` pumps the viewer straight into the session's TCP connection (no agent WebSocket):
    that path closes on revocation too."""
    admin = up.login()
    r = admin.post("/api/v1/users", json={"username": "rv-up", "password": PASSWORD})
    assert r.status_code == 201, r.text
    c = up.login("rv-up", PASSWORD)
    try:
        r = c.post("/api/v1/sessions", json={"template": "xterm"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        await asyncio.to_thread(wait_state, c, sid, "running", 60)
        ticket = c.post(f"/api/v1/sessions/{sid}/connect").json()
        viewer = await open_viewer(up.url, ticket["ws_path"], ticket["ticket"])
        started = time.monotonic()
        r = await call(c.post, "/api/v1/auth/logout", json={})
        assert r.status_code == 204, r.text
        await closed_within(viewer, started)
        assert_signed_out(viewer, "logged out")
        wait_for(lambda: "stream_revoked" in up.log(), 10, what="the revocation in the log")
    finally:
        c.close()
        admin.close()
