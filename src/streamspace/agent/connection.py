"""The control connection: catalog, Hello, Welcome, then read commands and send heartbeats
until the connection drops or the agent stops. `Backoff` spaces the reconnects out.

Reading never awaits slow work: a Command is acknowledged at once and handed to the command
runner, an OpenStream to the stream tunnel in its own task.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

import streamspace
from streamspace import logs, protocol
from streamspace.agent.backends.base import Backend
from streamspace.agent.commands import CommandRunner
from streamspace.agent.enrolment import Enrolment
from streamspace.agent.errors import (
    CREDENTIAL_ERROR_CODES,
    FATAL_ERROR_CODES,
    AgentError,
    CredentialRejected,
    TransientError,
)
from streamspace.agent.outbox import Outbox, Wire
from streamspace.agent.server import Server
from streamspace.agent.sessions import SessionTable
from streamspace.agent.state import AgentState
from streamspace.agent.tasks import Background
from streamspace.agent.tunnel import StreamTunnel
from streamspace.protocol import (
    Ack,
    Capacity,
    CatalogEntry,
    Command,
    ErrorMessage,
    Heartbeat,
    Hello,
    InventoryItem,
    OpenStream,
    ProtocolError,
    Welcome,
)

log = logs.get_logger(__name__)

MIN_HEARTBEAT_SECONDS = 0.01
CATALOG_REFRESH_HEARTBEATS = 6
"""Every this many heartbeats the catalog is read again: a template an admin adds or changes
is then reported runnable (or not) within a minute at the default interval, without a
reconnect, and the control plane's catalog says so."""


class Backoff:
    """Exponential with jitter so a fleet does not reconnect in lockstep after an outage."""

    def __init__(self, *, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self) -> float:
        base = min(self._maximum, self._initial * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        return random.uniform(base / 2, base)


class ControlConnection:
    def __init__(
        self,
        *,
        server: Server,
        identity: Enrolment,
        backend: Backend,
        capacity: Capacity,
        sessions: SessionTable,
        outbox: Outbox,
        commands: CommandRunner,
        tunnel: StreamTunnel,
        background: Background,
        backoff: Backoff,
        stopping: asyncio.Event,
        handshake_timeout: float,
    ) -> None:
        self._server = server
        self._identity = identity
        self._backend = backend
        self._capacity = capacity
        self._sessions = sessions
        self._outbox = outbox
        self._commands = commands
        self._tunnel = tunnel
        self._background = background
        self._backoff = backoff
        self._stopping = stopping
        self._handshake_timeout = handshake_timeout
        self._catalog: list[CatalogEntry] = []
        self._last_templates: list[str] = []

    async def run_once(self, state: AgentState) -> None:
        """One connection from catalog fetch to disconnect (or until the agent stops)."""
        catalog = await self._server.fetch_catalog(state.credential)
        self._catalog = list(catalog.templates)
        templates = self._backend.runnable_templates(self._catalog)
        try:
            inventory = await self._backend.inventory()
            legacy_homes = await self._backend.legacy_home_names()
        except Exception as exc:
            raise TransientError(f"backend inventory failed: {type(exc).__name__}: {exc}") from exc
        hello = Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            agent_id=state.agent_id,
            cluster_id=state.cluster_id,
            cluster_name=state.cluster_name,
            region=state.region,
            backend=self._backend.kind,
            capacity=self._capacity,
            templates=templates,
            inventory=inventory,
            version=streamspace.__version__,
            isolation=self._backend.isolation(),
            legacy_homes=legacy_homes,
        )
        url = self._server.ws_base + protocol.AGENT_CONNECT_PATH
        try:
            ws = await self._server.dial(url, self._identity.credential)
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise CredentialRejected("agent credential rejected (revoked?)") from exc
            raise TransientError(str(exc)) from exc
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise TransientError(f"cannot connect to {url}: {exc}") from exc

        wire = Wire(ws)
        writer = asyncio.create_task(wire.write_loop(), name="agent-writer")
        try:
            wire.send(hello)
            welcome = await self._await_welcome(wire)
            if legacy_homes:
                # Before any command is read: a start must find its home where it now belongs.
                moved = await self._backend.migrate_homes(welcome.home_owners)
                log.event("homes_migrated", agent_id=self._identity.agent_id, homes=len(moved))
            self._on_welcome(wire, welcome, inventory, templates)
            await self._serve(wire, writer, welcome)
        finally:
            self._detach(wire)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await ws.close()

    async def _await_welcome(self, wire: Wire) -> Welcome:
        try:
            async with asyncio.timeout(self._handshake_timeout):
                while True:
                    raw = await wire.ws.recv()
                    try:
                        msg = protocol.parse_server_message(raw)
                    except ProtocolError as exc:
                        wire.send(ErrorMessage(code=exc.code, message=exc.message))
                        continue
                    if isinstance(msg, Welcome):
                        return msg
                    if isinstance(msg, ErrorMessage):
                        self._raise_if_fatal(msg)
                        raise TransientError(
                            f"control plane refused hello: {msg.code}: {msg.message}"
                        )
                    log.warning(
                        "message_before_welcome_ignored",
                        agent_id=self._identity.agent_id,
                        type=msg.type,
                    )
        except TimeoutError as exc:
            raise TransientError("no welcome from the control plane in time") from exc
        except ConnectionClosed as exc:
            raise TransientError(f"connection closed during handshake: {exc}") from exc

    def _raise_if_fatal(self, msg: ErrorMessage) -> None:
        if msg.code in FATAL_ERROR_CODES:
            log.error(
                "agent_refused",
                agent_id=self._identity.agent_id,
                code=msg.code,
                message=msg.message,
            )
            error = CredentialRejected if msg.code in CREDENTIAL_ERROR_CODES else AgentError
            raise error(f"control plane refused the agent ({msg.code}): {msg.message}")

    def _on_welcome(
        self,
        wire: Wire,
        welcome: Welcome,
        inventory: list[InventoryItem],
        templates: list[str],
    ) -> None:
        agent_id = self._identity.agent_id
        if welcome.agent_id != agent_id:
            log.warning(
                "welcome_agent_id_mismatch",
                agent_id=agent_id,
                welcome_agent_id=welcome.agent_id,
            )
        keep = set(welcome.keep)
        self._sessions.reconcile({i.session_id for i in inventory if i.state == "running"}, keep)
        orphans = [i.session_id for i in inventory if i.session_id not in keep]
        if orphans:
            self._background.spawn(self._commands.stop_orphans(orphans), "agent-orphans")
        self._last_templates = templates
        self._backoff.reset()
        self._outbox.attach(wire)
        log.event(
            "connected",
            agent_id=agent_id,
            server=self._server.url,
            sessions=len(inventory),
            kept=len(keep),
            heartbeat_seconds=welcome.heartbeat_seconds,
        )

    def _detach(self, wire: Wire) -> None:
        if self._outbox.detach(wire):
            log.event(
                "disconnected",
                agent_id=self._identity.agent_id,
                code=wire.ws.close_code,
                reason=wire.ws.close_reason or None,
            )

    async def _refresh_catalog(self) -> None:
        """The catalog as it is now; on failure the last one stays (a revoked credential also
        closes the socket, which ends this connection)."""
        try:
            catalog = await self._server.fetch_catalog(self._identity.credential)
        except Exception as exc:
            log.warning("catalog_refresh_failed", agent_id=self._identity.agent_id, error=exc)
            return
        self._catalog = list(catalog.templates)

    async def _serve(self, wire: Wire, writer: asyncio.Task[None], welcome: Welcome) -> None:
        reader = asyncio.create_task(self._read_loop(wire), name="agent-reader")
        heartbeat = asyncio.create_task(
            self._heartbeat_loop(wire, max(welcome.heartbeat_seconds, MIN_HEARTBEAT_SECONDS)),
            name="agent-heartbeat",
        )
        stopper = asyncio.create_task(self._stopping.wait(), name="agent-stop")
        watched: set[asyncio.Task[Any]] = {reader, writer, heartbeat, stopper}
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, heartbeat, stopper):
                task.cancel()
            await asyncio.gather(reader, heartbeat, stopper, return_exceptions=True)
        for task in done:
            if task is stopper or task.cancelled():
                continue
            exc = task.exception()
            if isinstance(exc, AgentError):
                raise exc
            if exc is not None and not isinstance(exc, ConnectionClosed):
                log.error(
                    "control_connection_failed",
                    agent_id=self._identity.agent_id,
                    error=exc,
                    exc_info=exc,
                )

    async def _read_loop(self, wire: Wire) -> None:
        async for raw in wire.ws:
            self._handle_frame(wire, raw)

    def _handle_frame(self, wire: Wire, raw: str | bytes) -> None:
        """Dispatch one frame without awaiting anything: slow work always goes to a task."""
        try:
            msg = protocol.parse_server_message(raw)
        except ProtocolError as exc:
            log.warning(
                "malformed_frame",
                agent_id=self._identity.agent_id,
                code=exc.code,
                error=exc.message,
            )
            wire.send(ErrorMessage(code=exc.code, message=exc.message))
            return
        if isinstance(msg, Command):
            wire.send(Ack(command_id=msg.command_id))
            self._commands.submit(msg)
        elif isinstance(msg, OpenStream):
            self._background.spawn(self._tunnel.run(msg), f"agent-stream-{msg.stream_id}")
        elif isinstance(msg, ErrorMessage):
            self._raise_if_fatal(msg)
            log.warning(
                "server_error",
                agent_id=self._identity.agent_id,
                code=msg.code,
                message=msg.message,
            )
        else:
            log.warning("unexpected_message", agent_id=self._identity.agent_id, type=msg.type)

    async def _heartbeat_loop(self, wire: Wire, interval: float) -> None:
        beats = 0
        while True:
            await asyncio.sleep(interval)
            beats += 1
            if beats % CATALOG_REFRESH_HEARTBEATS == 0:
                await self._refresh_catalog()
            try:
                healthy, detail = await self._backend.healthy()
            except Exception as exc:
                healthy, detail = False, f"health check failed: {type(exc).__name__}: {exc}"
            templates: list[str] | None = None
            try:
                current = self._backend.runnable_templates(self._catalog)
            except Exception:
                log.exception("runnable_templates_failed", agent_id=self._identity.agent_id)
                current = self._last_templates
            if current != self._last_templates:
                templates = self._last_templates = current
            wire.send(
                Heartbeat(
                    load=self._sessions.load(), healthy=healthy, detail=detail, templates=templates
                )
            )
