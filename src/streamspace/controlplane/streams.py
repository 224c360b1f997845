"""Stream tickets and the VNC tunnel: browser WebSocket <-> control plane <-> agent WebSocket.

Each viewer gets its own agent WebSocket (dialled back by the agent on request), so TCP flow
control works end to end: every pump awaits the send of one frame before reading the next, and
the control plane holds at most one frame per direction per stream. See docs/streaming.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from fastapi import WebSocket, WebSocketDisconnect
from sqlalchemy import Table, bindparam, update

from streamspace import logs, protocol
from streamspace.config import Settings
from streamspace.controlplane import agentauth, grouppolicy
from streamspace.controlplane.embedded import (
    EmbeddedAgent,
    EmbeddedAgentSlot,
    SessionReader,
    SessionWriter,
)
from streamspace.controlplane.hub import Hub
from streamspace.controlplane.peers import Peers, Ticket, TicketPurpose
from streamspace.controlplane.revocation import Connection, Revocations
from streamspace.controlplane.security import random_secret
from streamspace.controlplane.statemachine import State
from streamspace.db.engine import Database
from streamspace.db.models import Session as SessionRow
from streamspace.db.models import User

log = logs.get_logger("streamspace.streams")

SESSIONS = cast(Table, SessionRow.__table__)

AGENT_DIAL_TIMEOUT = 10.0
MAX_AGENT_FRAME = 1024 * 1024
"""Browser frames (a big clipboard paste) are split to stay under the agent's frame limit;
RFB is a byte stream, so frame boundaries carry no meaning."""
CLOSE_DENIED = 4401
CLOSE_UNAVAILABLE = 4503
CLOSE_FORBIDDEN = 4403
"""The user may view the session but not open this kind of stream (a group policy)."""
CLOSE_SIGNED_OUT = 4401
"""Also 4401: the viewer must not reconnect with what it holds; the reason says why."""


TCP_READ_BYTES = 1024 * 1024


@dataclass
class PendingStream:
    stream_id: str
    agent_id: str
    session_id: str
    agent_ws: asyncio.Future[WebSocket]
    done: asyncio.Event = field(default_factory=asyncio.Event)


class StreamBroker:
    def __init__(
        self,
        *,
        db: Database,
        settings: Settings,
        hub: Hub,
        revocations: Revocations,
        peers: Peers,
        local_agent: EmbeddedAgentSlot,
    ) -> None:
        self.db = db
        self.settings = settings
        self.hub = hub
        self.revocations = revocations
        self.peers = peers
        self.local_agent = local_agent
        """`streamspace up`'s own agent, once it runs: its viewers skip the loopback WebSocket
        the agent would otherwise dial back; the control plane pumps the browser WebSocket
        straight into the connection the agent opened to the session's VNC server (the single
        hop websockify makes). Remote agents always use the dial-back."""
        self._pending: dict[str, PendingStream] = {}
        self._activity: dict[str, float] = {}
        self.active_streams = 0
        self.local_streams = 0
        self.bytes_to_browser = 0
        self.bytes_from_browser = 0

    # ---- tickets --------------------------------------------------------------------------

    async def issue_ticket(
        self,
        session_id: str,
        user_id: str,
        token_version: int,
        *,
        purpose: TicketPurpose = "stream",
        path: str = "",
    ) -> tuple[str, datetime]:
        ticket = random_secret(32)
        ttl = self.settings.stream_ticket_ttl_seconds
        expires = datetime.now(UTC) + timedelta(seconds=ttl)
        await self.peers.put_ticket(
            ticket, Ticket(session_id, user_id, expires, token_version, purpose, path), ttl
        )
        return ticket, expires

    async def consume_ticket(self, ticket: str) -> Ticket | None:
        """Single use: the ticket is gone after the first attempt, valid or not."""
        if not ticket or len(ticket) > 128:
            return None
        found = await self.peers.take_ticket(ticket)
        if found is None or found.expires_at <= datetime.now(UTC):
            return None
        return found

    def stream_base_url(self) -> str:
        """Where the agent dials back: this replica itself when several replicas run."""
        url = self.settings.advertise_url.rstrip("/")
        if not url:
            return ""
        return "ws" + url[4:] if url.startswith("http") else url

    # ---- browser side ---------------------------------------------------------------------

    async def serve_browser(self, ws: WebSocket, purpose: protocol.ViewerPurpose = "vnc") -> None:
        """One viewer socket. A ticket opens one stream of whichever purpose its socket's path
        says (the same owner check either way): the viewer asks /connect for one per socket."""
        try:
            ticket = await self.consume_ticket(ws.query_params.get("ticket", ""))
        except Exception as exc:  # Redis down: refuse clearly instead of failing the handshake
            log.warning("ticket_store_unavailable", error=exc)
            await ws.close(code=CLOSE_UNAVAILABLE, reason="ticket store unavailable; retry")
            return
        if ticket is None or ticket.purpose != "stream":
            await ws.close(code=CLOSE_DENIED, reason="stream ticket invalid, used or expired")
            return
        # Tracked before the user is read: a revocation committed after that read reaches this
        # stream through the registry, one committed before it is seen by the read.
        serving: asyncio.Task[None] | None = None

        def on_revoke(_reason: str) -> None:
            if serving is not None:
                serving.cancel()

        with self.revocations.track(
            ticket.user_id, ticket.token_version, "stream", on_revoke
        ) as conn:
            serving = asyncio.create_task(self._serve_ticket(ws, ticket, conn, purpose))
            try:
                await serving
            except asyncio.CancelledError:
                if not conn.revoked:
                    raise
                await _close(ws, conn)
                log.event(
                    "stream_revoked",
                    session_id=ticket.session_id,
                    user_id=ticket.user_id,
                    reason=conn.revoked,
                )
            finally:
                serving.cancel()

    async def _serve_ticket(
        self, ws: WebSocket, ticket: Ticket, conn: Connection, purpose: protocol.ViewerPurpose
    ) -> None:
        async with self.db() as db:
            session = await db.get(SessionRow, ticket.session_id)
            user = await db.get(User, ticket.user_id)
            may_speak = purpose != "microphone" or (
                user is not None
                and await grouppolicy.allowed(db, self.settings, user.id, "microphone")
            )
        if user is not None and user.token_version != ticket.token_version:
            await ws.close(code=CLOSE_SIGNED_OUT, reason="signed out since the ticket was issued")
            return
        allowed = (
            session is not None
            and user is not None
            and user.is_active
            and (session.owner_id == user.id or user.role == "admin")
        )
        if not allowed or session is None:
            await ws.close(code=CLOSE_DENIED, reason="not allowed to view this session")
            return
        if session.state != State.RUNNING or session.agent_id is None:
            await ws.close(code=CLOSE_UNAVAILABLE, reason=f"session is {session.state}")
            return
        subprotocol = "binary" if "binary" in ws.scope.get("subprotocols", []) else None
        await ws.accept(subprotocol=subprotocol)
        if not may_speak:
            # Accepted first so the viewer gets the reason (a close before the handshake is a
            # bare 403); no agent stream has been asked for.
            await ws.close(code=CLOSE_FORBIDDEN, reason="your groups do not allow the microphone")
            return
        local = self.local_agent.serving(session.agent_id) if purpose == "vnc" else None
        if local is not None:
            await self._serve_local(ws, local, session, user.id if user else "", conn)
            return
        stream_id = random_secret(16)
        pending = PendingStream(
            stream_id, session.agent_id, session.id, asyncio.get_running_loop().create_future()
        )
        self._pending[stream_id] = pending
        try:
            sent = await self.hub.send_to_agent(
                session.agent_id,
                protocol.OpenStream(
                    stream_id=stream_id,
                    session_id=session.id,
                    path=protocol.AGENT_STREAM_PATH_PREFIX + stream_id,
                    base_url=self.stream_base_url(),
                    purpose=purpose,
                ),
            )
            if not sent:
                await ws.close(code=CLOSE_UNAVAILABLE, reason="the session's agent is offline")
                return
            try:
                agent_ws = await asyncio.wait_for(pending.agent_ws, AGENT_DIAL_TIMEOUT)
            except (TimeoutError, ConnectionError) as exc:
                reason = str(exc) or "agent did not open the stream in time"
                await ws.close(code=CLOSE_UNAVAILABLE, reason=reason[:120])
                return
            log.event(
                "stream_open",
                stream_id=stream_id,
                session_id=session.id,
                agent_id=session.agent_id,
                user_id=user.id if user else "",
                purpose=purpose,
            )
            await self._pump_pair(ws, agent_ws, session.id, conn)
        finally:
            pending.done.set()
            self._pending.pop(stream_id, None)
            log.event("stream_closed", stream_id=stream_id, session_id=ticket.session_id)

    async def _serve_local(
        self,
        ws: WebSocket,
        local: EmbeddedAgent,
        session: SessionRow,
        user_id: str,
        conn: Connection,
    ) -> None:
        try:
            reader, writer = await local.open_session(session.id)
        except (OSError, TimeoutError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            reason = f"cannot reach the session: {reason}"
            await ws.close(code=CLOSE_UNAVAILABLE, reason=reason[:120])
            return
        log.event(
            "stream_open",
            path="local",
            session_id=session.id,
            agent_id=local.agent_id,
            user_id=user_id,
        )
        self.local_streams += 1
        try:
            await self._pump_tcp(ws, reader, writer, session.id, conn)
        finally:
            writer.close()
            with contextlib.suppress(OSError, RuntimeError):
                await writer.wait_closed()
            log.event("stream_closed", path="local", session_id=session.id)

    async def fetch_thumbnail(self, session_id: str, agent_id: str) -> bytes:
        """A JPEG of the session's screen taken by its agent (see controlplane.thumbnails).

        The embedded agent is asked in-process; a remote one gets an OpenStream with purpose
        `thumbnail`, dials back to this replica (like a viewer's stream, so it works whichever
        replica holds the agent's control socket) and sends the image as one binary frame.
        Raises ConnectionError with the reason when no image comes."""
        local = self.local_agent.serving(agent_id)
        if local is not None:
            try:
                return await local.thumbnail(session_id)
            except (OSError, TimeoutError) as exc:
                raise ConnectionError(str(exc) or type(exc).__name__) from exc
        async with self.agent_stream(agent_id, session_id, "thumbnail") as agent_ws:
            try:
                async with asyncio.timeout(AGENT_DIAL_TIMEOUT):
                    image = await _receive_bytes(agent_ws)
            except TimeoutError:
                raise ConnectionError("the agent sent no thumbnail in time") from None
        if not image:
            raise ConnectionError("the agent closed the thumbnail stream without an image")
        if len(image) > protocol.THUMBNAIL_MAX_BYTES:
            raise ConnectionError(f"the agent sent a thumbnail of {len(image)} bytes")
        return image

    @contextlib.asynccontextmanager
    async def agent_stream(
        self,
        agent_id: str,
        session_id: str,
        purpose: protocol.StreamPurpose,
        **fields: Any,
    ) -> AsyncIterator[WebSocket]:
        """A dialled-back agent WebSocket for one non-viewer stream (file transfer...): the
        same OpenStream and pending-stream machinery as a viewer's, held for the block.
        Raises ConnectionError if the agent is offline or does not dial back in time."""
        stream_id = random_secret(16)
        pending = PendingStream(
            stream_id, agent_id, session_id, asyncio.get_running_loop().create_future()
        )
        self._pending[stream_id] = pending
        try:
            sent = await self.hub.send_to_agent(
                agent_id,
                protocol.OpenStream(
                    stream_id=stream_id,
                    session_id=session_id,
                    path=protocol.AGENT_STREAM_PATH_PREFIX + stream_id,
                    base_url=self.stream_base_url(),
                    purpose=purpose,
                    **fields,
                ),
            )
            if not sent:
                raise ConnectionError("the session's agent is offline")
            try:
                agent_ws = await asyncio.wait_for(pending.agent_ws, AGENT_DIAL_TIMEOUT)
            except TimeoutError:
                raise ConnectionError("the agent did not open the stream in time") from None
            yield agent_ws
        finally:
            pending.done.set()
            self._pending.pop(stream_id, None)
            if pending.agent_ws.done() and not pending.agent_ws.exception():
                with contextlib.suppress(Exception):
                    await pending.agent_ws.result().close()

    def agent_failed(self, stream_id: str, error: str) -> None:
        pending = self._pending.get(stream_id)
        if pending is not None and not pending.agent_ws.done():
            pending.agent_ws.set_exception(ConnectionError(f"agent: {error}"))

    # ---- agent side -----------------------------------------------------------------------

    async def serve_agent(self, ws: WebSocket, stream_id: str) -> None:
        agent = await agentauth.authenticate(self.db, ws.headers.get("authorization", ""))
        pending = self._pending.get(stream_id)
        if agent is None or pending is None or pending.agent_id != agent.id:
            await ws.close(code=1008, reason="unknown stream or wrong agent")
            return
        if pending.agent_ws.done():
            await ws.close(code=1008, reason="stream already attached")
            return
        await ws.accept()
        pending.agent_ws.set_result(ws)
        await pending.done.wait()

    # ---- pumping --------------------------------------------------------------------------

    async def _pump_pair(
        self, browser: WebSocket, agent: WebSocket, session_id: str, conn: Connection
    ) -> None:
        self.active_streams += 1
        self.touch(session_id)
        to_agent = asyncio.create_task(self._pump(browser, agent, session_id, upstream=True))
        to_browser = asyncio.create_task(self._pump(agent, browser, session_id, upstream=False))
        try:
            await asyncio.wait({to_agent, to_browser}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.active_streams -= 1
            for task in (to_agent, to_browser):
                task.cancel()
            await _close(browser, conn, _said(to_browser))
            with contextlib.suppress(Exception):
                await agent.close()

    async def _pump(
        self, src: WebSocket, dst: WebSocket, session_id: str, upstream: bool
    ) -> tuple[int, str] | None:
        """Copy until `src` closes; its close code and reason when it said one."""
        last_touch = 0.0
        closed: dict[str, Any] = {}
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, ConnectionError):
            while (data := await _receive_bytes(src, closed)) is not None:
                if upstream and len(data) > MAX_AGENT_FRAME:
                    for i in range(0, len(data), MAX_AGENT_FRAME):
                        await dst.send_bytes(data[i : i + MAX_AGENT_FRAME])
                else:
                    await dst.send_bytes(data)
                last_touch = self._count(session_id, len(data), upstream, last_touch)
        code = closed.get("code")
        return (int(code), str(closed.get("reason") or "")) if code else None

    def _count(self, session_id: str, n: int, upstream: bool, last_touch: float) -> float:
        """Byte counters, and the session's activity at most every 5 s; returns last_touch."""
        if upstream:
            self.bytes_from_browser += n
        else:
            self.bytes_to_browser += n
        now = time.monotonic()
        if now - last_touch > 5:
            self.touch(session_id)
            return now
        return last_touch

    async def _pump_tcp(
        self,
        browser: WebSocket,
        reader: SessionReader,
        writer: SessionWriter,
        session_id: str,
        conn: Connection,
    ) -> None:
        """Browser WebSocket <-> session VNC; each side awaits its sink before reading more."""

        async def to_session() -> None:
            last_touch = 0.0
            while (data := await _receive_bytes(browser)) is not None:
                writer.write(data)
                await writer.drain()
                last_touch = self._count(session_id, len(data), True, last_touch)

        async def to_browser() -> None:
            last_touch = 0.0
            while data := await reader.read(TCP_READ_BYTES):
                await browser.send_bytes(data)
                last_touch = self._count(session_id, len(data), False, last_touch)

        self.active_streams += 1
        self.touch(session_id)
        tasks = [asyncio.create_task(to_session()), asyncio.create_task(to_browser())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.active_streams -= 1
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close(browser, conn)

    def touch(self, session_id: str) -> None:
        self._activity[session_id] = time.time()

    async def flush_activity(self) -> int:
        """Persist last_activity in batches so stream traffic costs no per-frame writes.

        A plain executemany, not the ORM's bulk UPDATE by primary key: that one fails the whole
        batch if a row is gone (a deleted user's sessions), and the batch was kept for the next
        try, so no session's activity was recorded again."""
        if not self._activity:
            return 0
        activity, self._activity = self._activity, {}
        stmt = (
            update(SESSIONS)
            .where(SESSIONS.c.id == bindparam("sid"))
            .values(last_activity=bindparam("at"))
        )
        try:
            async with self.db() as db:
                await db.execute(
                    stmt,
                    [  # sorted: concurrent writers then lock rows in one order (no deadlock)
                        {"sid": sid, "at": datetime.fromtimestamp(ts, UTC)}
                        for sid, ts in sorted(activity.items())
                    ],
                )
                await db.commit()
        except Exception:
            for sid, ts in activity.items():
                self._activity[sid] = max(ts, self._activity.get(sid, 0.0))
            raise
        return len(activity)


def _said(pump: asyncio.Task[tuple[int, str] | None]) -> tuple[int, str] | None:
    """How the agent closed its stream, if that is what ended the pump."""
    if not pump.done() or pump.cancelled() or pump.exception() is not None:
        return None
    return pump.result()


AGENT_CLOSE_CODES = frozenset({1003, 1007, 1011})
"""Codes the agent ends a stream with for a reason the viewer should see (a malformed
microphone frame, the session's sound server gone); passed on with the agent's reason."""


async def _close(
    browser: WebSocket, conn: Connection, agent_said: tuple[int, str] | None = None
) -> None:
    """Close the viewer's socket, saying why if its user was signed out or the agent gave a
    reason (once: later calls find it closed)."""
    code, reason = (CLOSE_SIGNED_OUT, conn.revoked[:120]) if conn.revoked else (1000, "")
    if not conn.revoked and agent_said is not None and agent_said[0] in AGENT_CLOSE_CODES:
        code, reason = agent_said[0], agent_said[1][:120]
    with contextlib.suppress(Exception):
        await browser.close(code=code, reason=reason)


async def _receive_bytes(ws: WebSocket, closed: dict[str, Any] | None = None) -> bytes | None:
    """The next payload (text frames as UTF-8: RFB is bytes); None once the peer has gone
    (its close message then in `closed`)."""
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            if closed is not None:
                closed.update(msg)
            return None
        data = msg.get("bytes")
        if data is not None:
            return bytes(data)
        text = msg.get("text")
        if text is not None:
            return str(text).encode()
