"""The backend contract every session runtime implements (modelled on JupyterHub's Spawner).

All methods are idempotent: starting a running session returns its endpoint, stopping a stopped
one succeeds. Methods never block the event loop; blocking work goes through asyncio.to_thread.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Iterable

from streamspace.protocol import BackendKind, CatalogEntry, Endpoint, InventoryItem, SessionSpec


class BackendError(Exception):
    """A failure the user can act on; the message is shown to them verbatim."""


class Backend(abc.ABC):
    kind: BackendKind

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
    def runnable_templates(self, catalog: Iterable[CatalogEntry]) -> list[str]:
        """Names of templates whose launch spec this host can actually run."""

    async def healthy(self) -> tuple[bool, str]:
        """Whether the backend can take new sessions (e.g. engine reachable), and why not."""
        return True, ""

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release clients; running sessions are left running."""


async def rfb_answers(port: int, host: str = "127.0.0.1", read_timeout: float = 2.0) -> bool:
    """True if host:port sends an RFB 3.x banner: the readiness probe every backend uses."""
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        banner = await asyncio.wait_for(reader.readexactly(12), read_timeout)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return banner.startswith(b"RFB 003.")
