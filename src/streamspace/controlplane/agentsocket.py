"""The WebSocket endpoint agents dial into: hello, registration, and the messages that follow.

One JSON message per frame; handling a message never runs an agent command itself (agents
execute concurrently on their side). Results go to the lifecycle's batches, heartbeats are kept
in memory and written in one batch every few seconds (`flush_heartbeats`).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from fastapi import WebSocket, WebSocketDisconnect
from sqlalchemy import select, update

from streamspace import logs, protocol
from streamspace.config import Settings
from streamspace.controlplane import agentauth
from streamspace.controlplane.hub import CLOSE_PROTOCOL, AgentConnection, Hub
from streamspace.controlplane.placement import Placement
from streamspace.controlplane.results import Results
from streamspace.controlplane.streams import StreamBroker
from streamspace.db.engine import Database
from streamspace.db.models import OPEN_COMMAND_STATUSES, Agent, AgentCommand, User

log = logs.get_logger("streamspace.hub")

HELLO_TIMEOUT = 10.0
ADMISSION_SLOTS = 8
MAX_AGENT_FRAME = 1024 * 1024
"""Largest control frame accepted from an agent; the biggest valid hello is a few hundred KiB."""


class _FrameTooLarge(Exception):
    pass


async def _receive_text(ws: WebSocket) -> str | None:
    """The next text frame; None for a binary frame (answered with an error, not a crash)."""
    msg = await ws.receive()
    if msg["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(msg.get("code", 1000))
    text = msg.get("text")
    if isinstance(text, str) and len(text) > MAX_AGENT_FRAME:
        raise _FrameTooLarge(len(text))
    return text if isinstance(text, str) else None


class AgentEndpoint:
    def __init__(
        self,
        *,
        db: Database,
        settings: Settings,
        replica_id: str,
        hub: Hub,
        results: Results,
        placement: Placement,
        streams: StreamBroker,
    ) -> None:
        self.db = db
        self.settings = settings
        self.replica_id = replica_id
        self.hub = hub
        self.results = results
        self.placement = placement
        self.streams = streams
        self._beats: dict[str, tuple[datetime, protocol.Heartbeat]] = {}
        self._admission = asyncio.Semaphore(ADMISSION_SLOTS)
        """Bounds concurrent authentications and registrations so a reconnect storm (every
        agent after a restart) queues here instead of exhausting the database pool."""

    async def serve(self, ws: WebSocket) -> None:
        async with self._admission:
            agent = await agentauth.authenticate(self.db, ws.headers.get("authorization", ""))
        if agent is None:
            await ws.close(code=1008, reason="agent credential rejected")
            return
        await ws.accept()
        conn = AgentConnection(agent.id, ws)
        conn.writer = asyncio.create_task(conn.write_loop())
        try:
            hello = await self._receive_hello(ws, conn, agent)
            if hello is None:
                return
            await self.hub.hold(conn)
            async with self._admission:
                await self._register(agent.id, hello, conn)
            await self._read_loop(conn)
        except WebSocketDisconnect:
            pass
        finally:
            await self.hub.release(conn)

    async def _receive_hello(
        self, ws: WebSocket, conn: AgentConnection, agent: Agent
    ) -> protocol.Hello | None:
        try:
            raw = await asyncio.wait_for(_receive_text(ws), HELLO_TIMEOUT)
        except TimeoutError:
            await conn.error("hello_timeout", "no hello within 10 s")
            await conn.close(CLOSE_PROTOCOL, "no hello")
            return None
        except _FrameTooLarge:
            await conn.error(
                "frame_too_large", f"control frames are limited to {MAX_AGENT_FRAME} bytes"
            )
            await conn.close(CLOSE_PROTOCOL, "frame_too_large")
            return None
        try:
            if raw is None:
                raise protocol.ProtocolError("binary_frame", "the hello must be a JSON text frame")
            msg = protocol.parse_agent_message(raw)
            if not isinstance(msg, protocol.Hello):
                raise protocol.ProtocolError("expected_hello", "the first message must be hello")
            protocol.check_version(msg.protocol_version)
            if msg.agent_id != agent.id:
                raise protocol.ProtocolError(
                    "unauthorized", f"hello is for agent {msg.agent_id}, credential for {agent.id}"
                )
            if msg.cluster_id != agent.cluster_id:
                raise protocol.ProtocolError(
                    "cluster_mismatch",
                    f"agent enrolled in cluster {agent.cluster_id!r}, hello says "
                    f"{msg.cluster_id!r}; enrol again to move it",
                )
        except protocol.ProtocolError as exc:
            log.warning("agent_hello_refused", agent_id=agent.id, code=exc.code, reason=exc.message)
            await conn.error(exc.code, exc.message)
            await conn.close(CLOSE_PROTOCOL, exc.code)
            return None
        return msg

    async def _register(self, agent_id: str, hello: protocol.Hello, conn: AgentConnection) -> None:
        at = datetime.now(UTC)
        async with self.db() as db:
            agent = await db.get(Agent, agent_id)
            assert agent is not None
            agent.cluster_name = hello.cluster_name
            agent.region = hello.region
            agent.backend = hello.backend
            agent.capacity_sessions = hello.capacity.max_sessions
            agent.capacity_cpu_millis = hello.capacity.cpu_millis
            agent.capacity_memory_mb = hello.capacity.memory_mb
            agent.templates = sorted(hello.templates)
            agent.version = hello.version
            agent.isolation = hello.isolation.mode
            agent.isolation_detail = hello.isolation.detail
            agent.limits_enforced = hello.isolation.limits_enforced
            agent.last_seen = at
            agent.connected_replica = self.replica_id
            agent.healthy = True
            await db.commit()
            keep = await self.results.reconcile(db, agent_id, hello.inventory)
            home_owners: dict[str, str] = {}
            if hello.legacy_homes:
                rows = await db.execute(
                    select(User.username, User.id).where(User.username.in_(hello.legacy_homes))
                )
                home_owners = {name: user_id for name, user_id in rows.all()}
            open_cmds = (
                await db.scalars(
                    select(AgentCommand.id)
                    .where(
                        AgentCommand.agent_id == agent_id,
                        AgentCommand.status.in_(OPEN_COMMAND_STATUSES),
                    )
                    .order_by(AgentCommand.created_at)
                )
            ).all()
        await conn.send(
            protocol.Welcome(
                agent_id=agent_id,
                heartbeat_seconds=self.settings.agent_heartbeat_seconds,
                keep=keep,
                home_owners=home_owners,
            )
        )
        log.event(
            "agent_connected",
            agent_id=agent_id,
            cluster_id=hello.cluster_id,
            templates=len(hello.templates),
            inventory=len(hello.inventory),
            keep=len(keep),
            resend=len(open_cmds),
            replica=self.replica_id,
        )
        if hello.isolation.mode == "insecure-shared-user":
            log.warning(
                "agent_insecure",
                agent_id=agent_id,
                isolation=hello.isolation.mode,
                detail=hello.isolation.detail,
                note="its sessions run as the agent's own user, unsandboxed",
            )
        for cmd_id in open_cmds:
            await self.hub.dispatch(cmd_id, retry=True)
        self.placement.wake_placer()

    async def _read_loop(self, conn: AgentConnection) -> None:
        results = self.results
        while True:
            try:
                raw = await _receive_text(conn.ws)
            except _FrameTooLarge:
                await conn.error(
                    "frame_too_large", f"control frames are limited to {MAX_AGENT_FRAME} bytes"
                )
                continue
            if raw is None:
                await conn.error("binary_frame", "control messages are JSON text frames")
                continue
            try:
                msg = protocol.parse_agent_message(raw)
            except protocol.ProtocolError as exc:
                await conn.error(exc.code, exc.message)
                continue
            if isinstance(msg, protocol.Heartbeat):
                self._beats[conn.agent_id] = (datetime.now(UTC), self._merged(conn.agent_id, msg))
            elif isinstance(msg, protocol.Ack):
                results.submit_ack(conn.agent_id, msg)
            elif isinstance(msg, protocol.Result):
                results.submit_result(conn.agent_id, msg)
            elif isinstance(msg, protocol.SessionStatus):
                await results.on_session_status(conn.agent_id, msg)
            elif isinstance(msg, protocol.SessionProgress):
                results.submit_progress(conn.agent_id, msg)
            elif isinstance(msg, protocol.StreamFailed):
                self.streams.agent_failed(msg.stream_id, msg.error)
            elif isinstance(msg, protocol.ErrorMessage):
                log.warning(
                    "agent_reported_error",
                    agent_id=conn.agent_id,
                    code=msg.code,
                    message=msg.message,
                )
            else:
                await conn.error("unexpected_message", f"{msg.type} is only valid first")

    def _merged(self, agent_id: str, beat: protocol.Heartbeat) -> protocol.Heartbeat:
        """The latest heartbeat wins, but templates are sent only when they change: one that
        says nothing about them keeps those of the earlier beat not yet written."""
        pending = self._beats.get(agent_id)
        if beat.templates is None and pending is not None and pending[1].templates is not None:
            return beat.model_copy(update={"templates": pending[1].templates})
        return beat

    async def flush_heartbeats(self) -> int:
        """Write the latest heartbeat of each agent in one batch (last_seen is the one truth)."""
        if not self._beats:
            return 0
        beats, self._beats = self._beats, {}
        rows = [
            {
                "id": agent_id,
                "last_seen": at,
                "healthy": hb.healthy,
                "health_detail": hb.detail[:512],
                "load_sessions": hb.load.sessions,
                "load_cpu_millis": hb.load.cpu_millis,
                "load_memory_mb": hb.load.memory_mb,
            }
            for agent_id, (at, hb) in beats.items()
        ]
        async with self.db() as db:
            await db.execute(update(Agent), rows)
            for agent_id, (_, hb) in beats.items():
                if hb.templates is not None:
                    await db.execute(
                        update(Agent)
                        .where(Agent.id == agent_id)
                        .values(templates=sorted(hb.templates))
                    )
            await db.commit()
        if any(not hb.healthy or hb.templates is not None for _, hb in beats.values()):
            self.placement.wake_placer()
        return len(rows)
