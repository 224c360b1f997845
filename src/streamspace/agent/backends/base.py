"""The backend contract every session runtime implements (modelled on JupyterHub's Spawner).

All methods are idempotent: starting a running session returns its endpoint, stopping a stopped
one succeeds. Methods never block the event loop; blocking work goes through asyncio.to_thread.
"""

from __future__ import annotations

import abc
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
