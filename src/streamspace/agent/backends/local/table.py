"""The sessions a LocalBackend holds in memory, shared by its parts (launcher, monitor, reaper):
their records, the processes this agent instance spawned, and one lock per session."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field

from streamspace.agent.backends.local.records import SessionRecord


@dataclass
class LocalSessions:
    records: dict[str, SessionRecord] = field(default_factory=dict)
    spawned: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Session processes this agent instance started (absent after an agent restart)."""
    stopped: set[str] = field(default_factory=set)
    """Sessions stopped here, so status() says "stopped" rather than "unknown"."""
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, session_id: str) -> asyncio.Lock:
        """Held by start, stop and hibernate; the monitor never checks a session under it."""
        return self._locks.setdefault(session_id, asyncio.Lock())
