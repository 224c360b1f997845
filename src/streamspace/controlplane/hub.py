"""Agent hub: the agent sockets this replica holds, and command delivery to any agent.

An agent held here gets its frames straight into its connection's queue (one writer task per
connection); one held by another replica through `Peers`. The socket's own protocol (hello,
registration, the read loop) is `agentsocket.AgentEndpoint`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import WebSocket
from sqlalchemy import case, select, update

from streamspace import logs, protocol
from streamspace.config import Settings
from streamspace.controlplane.peers import Peers
from streamspace.db.engine import Database
from streamspace.db.models import OPEN_COMMAND_STATUSES, Agent, AgentCommand, CommandStatus

log = logs.get_logger("streamspace.hub")
SENT = CommandStatus.SENT.value

SEND_QUEUE = 1000
CLOSE_REVOKED = 4403
CLOSE_PROTOCOL = 4400
CLOSE_REPLACED = 4409


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

    async def error(self, code: str, message: str) -> None:
        await self.send(protocol.ErrorMessage(code=code, message=message))

    async def write_loop(self) -> None:
        try:
            while True:
                frame = await self.queue.get()
                if frame is None:
                    return
                await self.ws.send_text(frame)
        except Exception as exc:  # a dead socket ends the writer; the reader notices too
            log.event("agent_writer_stopped", agent_id=self.agent_id, error=exc)
        finally:
            self.closed.set()

    async def close(self, code: int, reason: str) -> None:
        """Let the writer send what is queued (2 s at most), then close the socket."""
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        if self.writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.writer), 2)
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=reason)


class Hub:
    def __init__(self, *, db: Database, settings: Settings, replica_id: str, peers: Peers) -> None:
        self.db = db
        self.settings = settings
        self.replica_id = replica_id
        self.peers = peers
        self.connections: dict[str, AgentConnection] = {}
        self._recording: set[asyncio.Task[None]] = set()

    # ---- holding sockets ------------------------------------------------------------------

    async def hold(self, conn: AgentConnection) -> None:
        """This replica now serves the agent through `conn` (a previous socket is closed)."""
        old = self.connections.get(conn.agent_id)
        if old is not None:
            await old.close(CLOSE_REPLACED, "replaced by a newer connection")
        self.connections[conn.agent_id] = conn
        # Before the caller reads the open commands: a command committed after that read is
        # published to a channel this replica already listens on.
        await self.peers.agent_held(conn.agent_id)

    async def release(self, conn: AgentConnection) -> None:
        """The socket ended: stop its writer and, if it was still the agent's, let go of it."""
        if conn.writer is not None:
            conn.queue.put_nowait(None) if not conn.queue.full() else conn.writer.cancel()
        if self.connections.get(conn.agent_id) is not conn:
            return
        del self.connections[conn.agent_id]
        with contextlib.suppress(Exception):
            await self.peers.agent_released(conn.agent_id)
        with contextlib.suppress(Exception):
            async with self.db() as db:
                await db.execute(
                    update(Agent)
                    .where(
                        Agent.id == conn.agent_id,
                        Agent.connected_replica == self.replica_id,
                    )
                    .values(connected_replica="", last_seen=datetime.now(UTC))
                )
                await db.commit()
        log.event("agent_disconnected", agent_id=conn.agent_id)

    async def disconnect(
        self, agent_id: str, code: str, message: str, local_only: bool = False
    ) -> None:
        conn = self.connections.get(agent_id)
        if conn is None:
            if not local_only:
                await self.peers.disconnect_agent(agent_id, code, message)
            return
        await conn.error(code, message)
        await conn.close(CLOSE_REVOKED, code)

    async def close_all(self) -> None:
        for conn in list(self.connections.values()):
            await conn.close(1001, "control plane shutting down")

    # ---- delivery -------------------------------------------------------------------------

    def is_connected(self, agent_id: str) -> bool:
        return agent_id in self.connections

    async def send_to_agent(self, agent_id: str, msg: Any) -> bool:
        conn = self.connections.get(agent_id)
        if conn is not None:
            await conn.send(msg)
            return True
        return (await self.peers.send_many([(agent_id, msg)]))[0]

    async def dispatch(self, command_id: str, retry: bool = False) -> bool:
        """Send one command to its agent if reachable; the row records the attempt."""
        async with self.db() as db:
            cmd = await db.get(AgentCommand, command_id)
            if cmd is None or cmd.status not in OPEN_COMMAND_STATUSES:
                return False
            agent_id, msg = cmd.agent_id, command_message(cmd)
        sent = await self.send_to_agent(agent_id, msg)
        if sent:
            await self._record_sent([command_id])
            log.event(
                "command_sent",
                command_id=command_id,
                agent_id=agent_id,
                session_id=msg.session_id,
                action=msg.action,
                retry=retry,
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
        if remote:
            delivered = await self.peers.send_many([(agent, msg) for _, agent, msg in remote])
            sent += [cid for (cid, _, _), ok in zip(remote, delivered, strict=True) if ok]
        if sent:
            task = asyncio.create_task(self._record_sent_later(sent))
            self._recording.add(task)
            task.add_done_callback(self._recording.discard)

    async def _record_sent_later(self, command_ids: list[str]) -> None:
        try:
            await self._record_sent(command_ids)
        except Exception as exc:  # the result (or the timeout loop) settles the row anyway
            log.warning("record_sent_failed", count=len(command_ids), error=exc)

    async def _record_sent(self, command_ids: list[str]) -> None:
        """Conditional on the row still being open: with several replicas the result may have
        been recorded already by the replica holding the agent, and must not be overwritten."""
        at = datetime.now(UTC)
        async with self.db() as db:
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
                .where(
                    AgentCommand.id.in_(command_ids), AgentCommand.status.in_(OPEN_COMMAND_STATUSES)
                )
                .values(
                    status=case(
                        (
                            AgentCommand.status == CommandStatus.PENDING.value,
                            CommandStatus.SENT.value,
                        ),
                        else_=AgentCommand.status,
                    ),
                    attempts=AgentCommand.attempts + 1,
                    sent_at=at,
                    deadline=at + timedelta(seconds=self.settings.command_timeout_seconds),
                )
            )
            await db.commit()
