"""Agent hub: the WebSocket endpoint agents dial into, and command delivery to them.

One JSON message per frame, one writer task per connection; message handling never runs an
agent command itself (agents execute concurrently on their side).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from fastapi import WebSocket, WebSocketDisconnect
from sqlalchemy import case, select, update

from streamspace import protocol
from streamspace.controlplane.security import constant_eq, sha256
from streamspace.db.models import Agent, AgentCommand, User

if TYPE_CHECKING:
    from streamspace.controlplane.state import AppState

log = logging.getLogger("streamspace.hub")

HELLO_TIMEOUT = 10.0
SEND_QUEUE = 1000
CLOSE_REVOKED = 4403
CLOSE_PROTOCOL = 4400
CLOSE_REPLACED = 4409
OPEN_STATUSES = ("pending", "sent", "acked")
ADMISSION_SLOTS = 8


def parse_credential(header: str) -> tuple[str, str] | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    agent_id, _, secret = token.strip().partition(".")
    if not agent_id or not secret:
        return None
    return agent_id, secret


def make_credential(agent_id: str, secret: str) -> str:
    return f"{agent_id}.{secret}"


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


def command_message(cmd: AgentCommand) -> protocol.Command:
    spec = cmd.payload.get("spec")
    return protocol.Command(
        command_id=cmd.id,
        action=cmd.action,  # type: ignore[arg-type]
        session_id=cmd.session_id or "",
        spec=protocol.SessionSpec.model_validate(spec) if spec else None,
    )


@dataclass
class AgentConnection:
    agent_id: str
    ws: WebSocket
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(SEND_QUEUE))
    writer: asyncio.Task[None] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, msg: Any) -> None:
        await self.queue.put(protocol.encode(msg))

    def offer(self, msg: Any) -> bool:
        """Queue without waiting; False if the agent is 1000 frames behind."""
        return self.offer_frame(protocol.encode(msg))

    def offer_frame(self, frame: str) -> bool:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    async def write_loop(self) -> None:
        try:
            while True:
                frame = await self.queue.get()
                if frame is None:
                    return
                await self.ws.send_text(frame)
        except Exception as exc:  # a dead socket ends the writer; the reader notices too
            log.info("agent_writer_stopped agent_id=%s error=%r", self.agent_id, exc)
        finally:
            self.closed.set()


class Hub:
    def __init__(self, state: AppState) -> None:
        self.state = state
        self.connections: dict[str, AgentConnection] = {}
        self._beats: dict[str, tuple[datetime, protocol.Heartbeat]] = {}
        self.remote_disconnect: Callable[[str, str, str], Awaitable[None]] | None = None
        self.remote_send_many: Callable[[list[tuple[str, Any]]], Awaitable[list[bool]]] | None = (
            None
        )
        """Set by the cross-replica router: delivers frames to agents held by other replicas,
        True for each that a replica took."""
        self._recording: set[asyncio.Task[None]] = set()
        self.on_agent_held: Callable[[str], Awaitable[None]] | None = None
        """Set by the cross-replica router: an agent's socket is now held here / no longer."""
        self.on_agent_released: Callable[[str], Awaitable[None]] | None = None
        self._admission = asyncio.Semaphore(ADMISSION_SLOTS)
        """Bounds concurrent authentications and registrations so a reconnect storm (every
        agent after a restart) queues here instead of exhausting the database pool."""

    # ---- authentication -------------------------------------------------------------------

    async def authenticate(self, authorization: str) -> Agent | None:
        parsed = parse_credential(authorization)
        if parsed is None:
            return None
        agent_id, secret = parsed
        async with self.state.db() as db:
            agent = await db.get(Agent, agent_id)
        if agent is None or agent.revoked:
            return None
        if not constant_eq(agent.credential_hash, sha256(secret)):
            return None
        return agent

    # ---- connection -----------------------------------------------------------------------

    async def serve(self, ws: WebSocket) -> None:
        async with self._admission:
            agent = await self.authenticate(ws.headers.get("authorization", ""))
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
            old = self.connections.get(agent.id)
            if old is not None:
                await self._close(old, CLOSE_REPLACED, "replaced by a newer connection")
            self.connections[agent.id] = conn
            if self.on_agent_held is not None:
                # Before _register reads the open commands: a command committed after that
                # read is published to a channel this replica already listens on.
                await self.on_agent_held(agent.id)
            async with self._admission:
                await self._register(agent.id, hello, conn)
            await self._read_loop(conn)
        except WebSocketDisconnect:
            pass
        finally:
            await self._on_disconnect(conn)

    async def _error(self, conn: AgentConnection, code: str, message: str) -> None:
        await conn.send(protocol.ErrorMessage(code=code, message=message))

    async def _receive_hello(
        self, ws: WebSocket, conn: AgentConnection, agent: Agent
    ) -> protocol.Hello | None:
        try:
            raw = await asyncio.wait_for(_receive_text(ws), HELLO_TIMEOUT)
        except TimeoutError:
            await self._error(conn, "hello_timeout", "no hello within 10 s")
            await self._close(conn, CLOSE_PROTOCOL, "no hello")
            return None
        except _FrameTooLarge:
            await self._error(
                conn, "frame_too_large", f"control frames are limited to {MAX_AGENT_FRAME} bytes"
            )
            await self._close(conn, CLOSE_PROTOCOL, "frame_too_large")
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
            log.warning(
                "agent_hello_refused agent_id=%s code=%s reason=%s", agent.id, exc.code, exc.message
            )
            await self._error(conn, exc.code, exc.message)
            await self._close(conn, CLOSE_PROTOCOL, exc.code)
            return None
        return msg

    async def _register(self, agent_id: str, hello: protocol.Hello, conn: AgentConnection) -> None:
        at = datetime.now(UTC)
        async with self.state.db() as db:
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
            agent.connected_replica = self.state.replica_id
            agent.healthy = True
            await db.commit()
            keep = await self.state.lifecycle.reconcile(db, agent_id, hello.inventory)
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
                        AgentCommand.status.in_(("pending", "sent", "acked")),
                    )
                    .order_by(AgentCommand.created_at)
                )
            ).all()
        await conn.send(
            protocol.Welcome(
                agent_id=agent_id,
                heartbeat_seconds=self.state.settings.agent_heartbeat_seconds,
                keep=keep,
                home_owners=home_owners,
            )
        )
        log.info(
            "agent_connected agent_id=%s cluster_id=%s templates=%d inventory=%d keep=%d "
            "resend=%d replica=%s",
            agent_id,
            hello.cluster_id,
            len(hello.templates),
            len(hello.inventory),
            len(keep),
            len(open_cmds),
            self.state.replica_id,
        )
        if hello.isolation.mode == "insecure-shared-user":
            log.warning(
                "agent_insecure agent_id=%s isolation=%s detail=%r: its sessions run as the "
                "agent's own user, unsandboxed",
                agent_id,
                hello.isolation.mode,
                hello.isolation.detail,
            )
        for cmd_id in open_cmds:
            await self.dispatch(cmd_id, retry=True)
        self.state.lifecycle.wake_placer()

    async def _read_loop(self, conn: AgentConnection) -> None:
        lifecycle = self.state.lifecycle
        while True:
            try:
                raw = await _receive_text(conn.ws)
            except _FrameTooLarge:
                await self._error(
                    conn,
                    "frame_too_large",
                    f"control frames are limited to {MAX_AGENT_FRAME} bytes",
                )
                continue
            if raw is None:
                await self._error(conn, "binary_frame", "control messages are JSON text frames")
                continue
            try:
                msg = protocol.parse_agent_message(raw)
            except protocol.ProtocolError as exc:
                await self._error(conn, exc.code, exc.message)
                continue
            if isinstance(msg, protocol.Heartbeat):
                self._beats[conn.agent_id] = (datetime.now(UTC), msg)
            elif isinstance(msg, protocol.Ack):
                lifecycle.submit_ack(conn.agent_id, msg)
            elif isinstance(msg, protocol.Result):
                lifecycle.submit_result(conn.agent_id, msg)
            elif isinstance(msg, protocol.SessionStatus):
                await lifecycle.on_session_status(conn.agent_id, msg)
            elif isinstance(msg, protocol.StreamFailed):
                self.state.streams.agent_failed(msg.stream_id, msg.error)
            elif isinstance(msg, protocol.ErrorMessage):
                log.warning(
                    "agent_reported_error agent_id=%s code=%s message=%s",
                    conn.agent_id,
                    msg.code,
                    msg.message,
                )
            else:
                await self._error(conn, "unexpected_message", f"{msg.type} is only valid first")

    async def _close(self, conn: AgentConnection, code: int, reason: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            conn.queue.put_nowait(None)
        if conn.writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(conn.writer), 2)
        with contextlib.suppress(Exception):
            await conn.ws.close(code=code, reason=reason)

    async def _on_disconnect(self, conn: AgentConnection) -> None:
        if conn.writer is not None:
            conn.queue.put_nowait(None) if not conn.queue.full() else conn.writer.cancel()
        if self.connections.get(conn.agent_id) is conn:
            del self.connections[conn.agent_id]
            if self.on_agent_released is not None:
                with contextlib.suppress(Exception):
                    await self.on_agent_released(conn.agent_id)
            with contextlib.suppress(Exception):
                async with self.state.db() as db:
                    await db.execute(
                        update(Agent)
                        .where(
                            Agent.id == conn.agent_id,
                            Agent.connected_replica == self.state.replica_id,
                        )
                        .values(connected_replica="", last_seen=datetime.now(UTC))
                    )
                    await db.commit()
            log.info("agent_disconnected agent_id=%s", conn.agent_id)

    async def disconnect(
        self, agent_id: str, code: str, message: str, local_only: bool = False
    ) -> None:
        conn = self.connections.get(agent_id)
        if conn is None:
            if self.remote_disconnect is not None and not local_only:
                await self.remote_disconnect(agent_id, code, message)
            return
        await self._error(conn, code, message)
        await self._close(conn, CLOSE_REVOKED, code)

    # ---- delivery -------------------------------------------------------------------------

    def is_connected(self, agent_id: str) -> bool:
        return agent_id in self.connections

    async def send_to_agent(self, agent_id: str, msg: Any) -> bool:
        conn = self.connections.get(agent_id)
        if conn is not None:
            await conn.send(msg)
            return True
        if self.remote_send_many is not None:
            return (await self.remote_send_many([(agent_id, msg)]))[0]
        return False

    async def dispatch(self, command_id: str, retry: bool = False) -> bool:
        """Send one command to its agent if reachable; the row records the attempt."""
        async with self.state.db() as db:
            cmd = await db.get(AgentCommand, command_id)
            if cmd is None or cmd.status not in OPEN_STATUSES:
                return False
            agent_id, msg = cmd.agent_id, command_message(cmd)
        sent = await self.send_to_agent(agent_id, msg)
        if sent:
            await self._record_sent([command_id])
            log.info(
                "command_sent command_id=%s agent_id=%s session_id=%s action=%s retry=%s",
                command_id,
                agent_id,
                msg.session_id,
                msg.action,
                retry,
            )
        return sent

    async def dispatch_many(self, commands: list[AgentCommand]) -> None:
        """Send freshly committed commands without waiting for a slow agent or a database
        connection: the caller is a user's request that may still hold one, and taking a
        second could starve the pool under load. One UPDATE, in the background, records all
        that reached an agent; a command that did not stays pending for the retry loop."""
        sent: list[str] = []
        remote: list[tuple[str, str, protocol.Command]] = []
        for cmd in commands:
            msg = command_message(cmd)
            conn = self.connections.get(cmd.agent_id)
            if conn is not None:
                if conn.offer(msg):
                    sent.append(cmd.id)
            else:
                remote.append((cmd.id, cmd.agent_id, msg))
        if remote and self.remote_send_many is not None:
            delivered = await self.remote_send_many([(agent, msg) for _, agent, msg in remote])
            sent += [cid for (cid, _, _), ok in zip(remote, delivered, strict=True) if ok]
        if sent:
            task = asyncio.create_task(self._record_sent_later(sent))
            self._recording.add(task)
            task.add_done_callback(self._recording.discard)

    async def _record_sent_later(self, command_ids: list[str]) -> None:
        try:
            await self._record_sent(command_ids)
        except Exception as exc:  # the result (or the timeout loop) settles the row anyway
            log.warning("record_sent_failed count=%d error=%r", len(command_ids), exc)

    async def _record_sent(self, command_ids: list[str]) -> None:
        """Conditional on the row still being open: with several replicas the result may have
        been recorded already by the replica holding the agent, and must not be overwritten."""
        at = datetime.now(UTC)
        async with self.state.db() as db:
            # Row locks in primary-key order, the order every other writer of these rows
            # (result batches flush sorted by key) takes them: a bare UPDATE ... IN locks in
            # scan order and deadlocked against result batches under load.
            await db.execute(
                select(AgentCommand.id)
                .where(AgentCommand.id.in_(command_ids))
                .order_by(AgentCommand.id)
                .with_for_update()
            )
            await db.execute(
                update(AgentCommand)
                .where(AgentCommand.id.in_(command_ids), AgentCommand.status.in_(OPEN_STATUSES))
                .values(
                    status=case(
                        (AgentCommand.status == "pending", "sent"), else_=AgentCommand.status
                    ),
                    attempts=AgentCommand.attempts + 1,
                    sent_at=at,
                    deadline=at + timedelta(seconds=self.state.settings.command_timeout_seconds),
                )
            )
            await db.commit()

    # ---- heartbeats -----------------------------------------------------------------------

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
        async with self.state.db() as db:
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
            self.state.lifecycle.wake_placer()
        return len(rows)

    async def close_all(self) -> None:
        for conn in list(self.connections.values()):
            await self._close(conn, 1001, "control plane shutting down")
