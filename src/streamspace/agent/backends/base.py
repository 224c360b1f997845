"""The backend contract every session runtime implements (modelled on JupyterHub's Spawner).

All methods are idempotent: starting a running session returns its endpoint, stopping a stopped
one succeeds. Methods never block the event loop; blocking work goes through asyncio.to_thread.
The agent uses only what is declared here (no per-backend branches), and
tests/contract/test_backend_contract.py holds every backend to it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from streamspace.agent import vnc
from streamspace.config import Settings
from streamspace.protocol import (
    BackendKind,
    CatalogEntry,
    Endpoint,
    InventoryItem,
    Isolation,
    SessionSpec,
)

VNCStream = tuple[vnc.ByteStreamReader, vnc.ByteStreamWriter]

ExitCallback = Callable[[str, str], Awaitable[None]]
"""on_exit(session_id, reason): a running session ended without the agent asking."""

ProgressCallback = Callable[[str, str], Awaitable[None]]
"""on_progress(session_id, message): a start milestone the session just passed."""


@dataclass(frozen=True)
class BackendOptions:
    """What an agent's settings and command line say about its backend: everything a backend's
    `from_options` may build it from, so choosing one is a registry lookup (see registry.py)."""

    state_dir: Path
    settings: Settings
    docker_host: str | None = None
    """The engine API URL given on the command line (docker); None: $DOCKER_HOST or default."""


class BackendError(Exception):
    """A failure the user can act on; the message is shown to them verbatim."""


class NotSupportedByBackend(BackendError):
    """This backend cannot do what was asked at all (not a passing failure)."""


@dataclass(frozen=True)
class HomeAccess:
    """Where a session's home is on the agent's host and whose files it holds: file transfer
    opens paths under `root` only, acting as `uid`/`gid` (see agent/files.py)."""

    root: Path
    uid: int
    gid: int


@dataclass(frozen=True)
class SftpAccess:
    """A session's home reached over SFTP (a pod: its image's sshd, on the pod network), for
    file transfer: the agent logs in as `user` with `client_key` (OpenSSH private key) and
    trusts only `host_key` (OpenSSH public key line); paths are under `root` on that host."""

    host: str
    port: int
    user: str
    client_key: bytes
    host_key: str
    root: str


@dataclass(frozen=True)
class SoundServer:
    """Where the agent's encoder reaches a session's PulseAudio (see agent/audio.py): an
    O_PATH descriptor of its Unix socket, checked to be the session's own (local, docker; the
    receiver owns the descriptor), or a TCP address on the pod network with the session's auth
    cookie (kubernetes: the port is reachable inside the cluster, so it is not open)."""

    socket_fd: int | None = None
    host: str | None = None
    port: int = 0
    cookie: bytes = b""

    def close(self) -> None:
        if self.socket_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.socket_fd)


class Backend(abc.ABC):
    kind: BackendKind

    @classmethod
    @abc.abstractmethod
    def from_options(cls, options: BackendOptions) -> Self:
        """Build the backend an agent runs with (raises BackendError for bad settings)."""

    @abc.abstractmethod
    async def start(self, spec: SessionSpec) -> Endpoint:
        """Run the session (or return the endpoint of the one already running)."""

    @abc.abstractmethod
    async def stop(self, session_id: str) -> None:
        """Tear the session down completely; its persistent home stays."""

    @abc.abstractmethod
    async def hibernate(self, session_id: str) -> None:
        """Release compute but keep everything needed to wake (home, container)."""

    @abc.abstractmethod
    async def wake(self, spec: SessionSpec) -> Endpoint:
        """Bring a hibernated session back; same endpoint contract as start."""

    @abc.abstractmethod
    async def status(self, session_id: str) -> InventoryItem:
        """Current state of one session; state 'unknown' if this backend has never seen it."""

    @abc.abstractmethod
    async def inventory(self) -> list[InventoryItem]:
        """Every session this backend holds right now (running or hibernated)."""

    @abc.abstractmethod
    async def watch_exits(self, on_exit: ExitCallback) -> None:
        """Report every running session that ends on its own (the app exited, the container
        died) through `on_exit`, once per exit, never for a stop or hibernate the agent asked
        for. Returns once the watch runs; it runs inside the backend until `close()`. A second
        call replaces the callback. A failing callback is logged, never stops the watch."""

    def report_progress(self, on_progress: ProgressCallback) -> None:
        """Report start milestones ("scheduled on node n1", "pulling image …", "VNC ready")
        through `on_progress` as they happen. Optional: a backend whose starts take no steps
        worth naming keeps this default and reports nothing. A failing callback is logged,
        never fails the start."""
        return None

    async def remove_unknown(self, keep: set[str]) -> list[str]:
        """Stop every session this backend holds (running, hibernated or exited) whose id is
        not in `keep`; the sorted ids stopped.

        This default stops what `inventory()` lists; a backend that also holds sessions the
        inventory leaves out (one still starting) overrides it to include them.
        """
        removed = sorted({item.session_id for item in await self.inventory()} - keep)
        for session_id in removed:
            await self.stop(session_id)
        return removed

    @abc.abstractmethod
    def runnable_templates(self, catalog: Iterable[CatalogEntry]) -> list[str]:
        """Names of templates whose launch spec this host can actually run."""

    @abc.abstractmethod
    def isolation(self) -> Isolation:
        """What keeps this backend's sessions from the agent and from each other."""

    async def open_vnc(self, session_id: str, connect_timeout: float = 10.0) -> VNCStream:
        """A connection to the session's VNC server, past any per-session authentication, that
        offers the caller security type None (the viewer's stream ticket is its credential).

        The backend, not the control plane, says where the server is: an agent never connects
        to an address it is merely told. This default connects to the endpoint `status()`
        reports, without authentication; backends whose servers need a secret override it.
        """
        item = await self.status(session_id)
        if item.state != "running" or item.endpoint is None:
            raise BackendError(f"session {session_id} is not running on this agent")
        return await vnc.open_endpoint(item.endpoint, connect_timeout)

    async def home_access(self, session_id: str) -> HomeAccess | SftpAccess:
        """The session's home for file transfer: a directory on this host, or an SFTP server
        the session runs. Raises BackendError if the session is not here (or cannot serve its
        files now), NotSupportedByBackend if this backend cannot reach homes at all (this
        default)."""
        raise NotSupportedByBackend(f"file transfer is not supported by the {self.kind} backend")

    async def open_audio(self, session_id: str) -> SoundServer:
        """Where the agent's encoder connects to the session's sound server; the caller owns
        what it holds. Backends whose sessions have no sound server say so."""
        raise BackendError(f"sessions of the {self.kind} backend have no sound")

    async def healthy(self) -> tuple[bool, str]:
        """Whether the backend can take new sessions (e.g. engine reachable), and why not."""
        return True, ""

    async def legacy_home_names(self) -> list[str]:
        """Owner names of homes kept under the name-keyed layout of protocol version 1."""
        return []

    async def migrate_homes(self, owners: dict[str, str]) -> dict[str, str]:
        """Re-key those homes by the user ids the control plane gave for their names."""
        return {}

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release clients; running sessions are left running."""


async def rfb_answers(
    port: int | None = None,
    host: str = "127.0.0.1",
    read_timeout: float = 2.0,
    *,
    unix_path: str | None = None,
) -> bool:
    """True if the TCP port or Unix socket sends an RFB 3.x banner: every backend's readiness
    probe."""
    writer: asyncio.StreamWriter | None = None
    try:
        if unix_path is not None:
            opening = asyncio.open_unix_connection(unix_path)
        else:
            opening = asyncio.open_connection(host, port)
        reader, writer = await asyncio.wait_for(opening, 1.0)
        banner = await asyncio.wait_for(reader.readexactly(12), read_timeout)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return banner.startswith(b"RFB 003.")
