"""The agent process: enrol once, then hold one outbound WebSocket to the control plane.

The agent only ever dials out (control connection and one WebSocket per viewer stream), so
hosts behind NAT or firewalls can join the fleet. Everything the control plane asks for is a
`Command`; the agent acknowledges it at once, runs it in its own task, and answers with a
`Result` that survives reconnects. Sessions are owned by the backend and keep running while the
agent is disconnected; on reconnect the agent reports its inventory and the control plane says
which sessions it still knows (`Welcome.keep`), the rest are stopped.

`Agent` is embeddable: no signal handling, no process exit, no blocking calls, so `streamspace
up` can run it next to the control plane in one event loop. Fatal conditions (revoked
credential, refused enrolment, unsupported protocol) surface as `AgentError`, whose message is
meant for humans.

`Agent` only coordinates; each part lives in its own module and is handed what it uses:
`enrolment` (who we are), `connection` (the control connection and its backoff), `commands`
(commands -> backend calls -> Results), `tunnel` (viewer streams), `exits` (sessions that end
on their own), `progress` (start milestones as they happen), `outbox` (what survives a
disconnect), `sessions` (what runs here).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from streamspace import logs
from streamspace.agent.backends.base import Backend, VNCStream
from streamspace.agent.commands import CommandRunner
from streamspace.agent.connection import Backoff, ControlConnection
from streamspace.agent.enrolment import Enrolment
from streamspace.agent.errors import AgentError, CredentialRejected, TransientError
from streamspace.agent.exits import ExitWatch
from streamspace.agent.outbox import Outbox
from streamspace.agent.progress import ProgressRelay
from streamspace.agent.server import Server
from streamspace.agent.sessions import SessionTable
from streamspace.agent.tasks import Background
from streamspace.agent.tunnel import StreamTunnel
from streamspace.protocol import BackendKind, Capacity

log = logs.get_logger(__name__)

__all__ = ["Agent", "AgentConfig", "AgentError", "CredentialRejected"]


def _default_capacity() -> Capacity:
    return Capacity(max_sessions=10, cpu_millis=8000, memory_mb=16384)


@dataclass
class AgentConfig:
    """How to reach the control plane and what this agent offers it."""

    server: str
    state_dir: Path
    name: str
    cluster_id: str
    cluster_name: str
    region: str = ""
    backend: BackendKind = "local"
    capacity: Capacity = field(default_factory=_default_capacity)
    max_concurrent_commands: int = 8
    join_token: str | None = field(default=None, repr=False)
    reenrol: Callable[[str], Awaitable[str]] | None = field(default=None, repr=False)
    """Only for an agent embedded in its control plane (`streamspace up`): given the identity
    whose credential was rejected, a fresh join token to enrol again with, instead of giving
    up. A separate agent never re-enrols on its own: its operator decides."""
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 10.0
    handshake_timeout_seconds: float = 15.0
    http_timeout_seconds: float = 15.0
    tcp_connect_timeout_seconds: float = 10.0


class Agent:
    """Runs one agent identity against one control plane until `stop()` or a fatal error."""

    def __init__(self, config: AgentConfig, backend: Backend) -> None:
        if config.backend != backend.kind:
            raise ValueError(
                f"config.backend={config.backend!r} but the backend is {backend.kind!r}"
            )
        if config.max_concurrent_commands < 1:
            raise ValueError("max_concurrent_commands must be at least 1")
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        server = Server(
            config.server,
            http_timeout=config.http_timeout_seconds,
            handshake_timeout=config.handshake_timeout_seconds,
        )
        self._enrolment = enrolment = Enrolment(
            server=server,
            state_dir=config.state_dir,
            name=config.name,
            cluster_id=config.cluster_id,
            cluster_name=config.cluster_name,
            region=config.region,
            backend=backend.kind,
            join_token=config.join_token,
            reenrol=config.reenrol,
        )
        self._outbox = outbox = Outbox()
        sessions = SessionTable()
        self._background = background = Background(identity=enrolment)
        self._commands = commands = CommandRunner(
            backend=backend,
            sessions=sessions,
            outbox=outbox,
            identity=enrolment,
            max_concurrent=config.max_concurrent_commands,
        )
        self._exits = ExitWatch(
            backend=backend, sessions=sessions, outbox=outbox, identity=enrolment
        )
        backend.report_progress(ProgressRelay(outbox=outbox, identity=enrolment).on_progress)
        self._tunnel = tunnel = StreamTunnel(
            backend=backend,
            server=server,
            identity=enrolment,
            outbox=outbox,
            connect_timeout=config.tcp_connect_timeout_seconds,
        )
        self._backoff = backoff = Backoff(
            initial=config.backoff_initial_seconds, maximum=config.backoff_max_seconds
        )
        self._connection = ControlConnection(
            server=server,
            identity=enrolment,
            backend=backend,
            capacity=config.capacity,
            sessions=sessions,
            outbox=outbox,
            commands=commands,
            tunnel=tunnel,
            background=background,
            backoff=backoff,
            stopping=self._stopping,
            handshake_timeout=config.handshake_timeout_seconds,
        )

    # ---- public API ----------------------------------------------------------------------

    @property
    def agent_id(self) -> str | None:
        """The enrolled identity, known once `run()` has loaded or obtained it."""
        return self._enrolment.agent_id

    @property
    def connected(self) -> bool:
        """True between the control plane's Welcome and the next disconnect."""
        return self._outbox.connected

    async def run(self) -> None:
        """Enrol if needed, then stay connected (reconnecting with backoff) until stopped.

        Returns after `stop()`; raises AgentError on a fatal condition. A stop requested before
        `run()` makes it return at once.
        """
        if self._running:
            raise RuntimeError("Agent.run() is already running")
        self._running = True
        self._done.clear()
        try:
            await self._main()
        finally:
            await self._shutdown()
            self._running = False
            self._stopping.clear()
            self._done.set()

    async def stop(self) -> None:
        """Disconnect and wait for `run()` to return; sessions keep running in the backend."""
        self._stopping.set()
        if self._running:
            await self._done.wait()

    async def adopt_credential(self, credential: str) -> None:
        """Use a credential rotated by the control plane this agent is embedded in: stored
        first, so the reconnect after the rotation's disconnect presents it."""
        await self._enrolment.adopt(credential)

    async def open_session(self, session_id: str) -> VNCStream:
        """A connection to a session's VNC server for one viewer, through the backend.

        Called for dialled-back streams and directly by a control plane embedding this agent
        (`streamspace up`), whose viewers then need no loopback WebSocket hop.
        """
        return await self._tunnel.open_session(session_id)

    async def thumbnail(self, session_id: str) -> bytes:
        """A small JPEG of the session's screen; called like `open_session` by an embedding
        control plane (remote agents send it over a dialled-back stream instead)."""
        return await self._tunnel.thumbnail(session_id)

    # ---- main loop -----------------------------------------------------------------------

    async def _main(self) -> None:
        self._backoff.reset()
        while not self._stopping.is_set():
            try:
                state = await self._enrolment.ensure()
                if not self._exits.watching:
                    await self._exits.start()
                await self._connection.run_once(state)
            except CredentialRejected as exc:
                if not self._enrolment.can_reenrol:
                    raise
                await self._enrolment.forget(exc)
                self._outbox.clear()
                continue
            except TransientError as exc:
                log.warning("control_plane_unavailable", agent_id=self.agent_id, error=exc)
            except (AgentError, asyncio.CancelledError):
                raise
            except Exception:
                # A bug (ours or the backend's) must not take the agent down: its sessions keep
                # running and still need a control connection. Log loudly and retry.
                log.exception("connection_attempt_crashed", agent_id=self.agent_id)
            if self._stopping.is_set():
                break
            delay = self._backoff.next_delay()
            log.event("reconnecting", agent_id=self.agent_id, delay=f"{delay:.2f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _shutdown(self) -> None:
        self._exits.reset()
        tasks = [*self._commands.tasks, *self._background.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._outbox.forget_wire()
        log.event("agent_stopped", agent_id=self.agent_id)
