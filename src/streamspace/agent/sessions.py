"""The sessions this agent runs, as far as the agent itself knows (the backend owns them), and
one turn per session so a stop never races the start before it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from streamspace.protocol import Load, SessionSpec


@dataclass
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class SessionTable:
    def __init__(self) -> None:
        # Running sessions -> the spec that started them (None: adopted from the inventory).
        self._running: dict[str, SessionSpec | None] = {}
        self._turns: dict[str, _Turn] = {}

    def started(self, session_id: str, spec: SessionSpec) -> None:
        self._running[session_id] = spec

    def ended(self, session_id: str) -> None:
        self._running.pop(session_id, None)

    def busy(self, session_id: str) -> bool:
        """True while some work on the session holds or waits for its turn."""
        return session_id in self._turns

    @contextlib.asynccontextmanager
    async def turn(self, session_id: str) -> AsyncIterator[None]:
        """Serialise work on one session (a stop must not race the start before it)."""
        turn = self._turns.setdefault(session_id, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if turn.users == 0:
                self._turns.pop(session_id, None)

    def reconcile(self, running: set[str], keep: set[str]) -> None:
        """After Welcome: adopt the running sessions the control plane keeps, and forget those
        no longer running unless a command is working on them."""
        for session_id in running & keep:
            self._running.setdefault(session_id, None)
        for session_id in list(self._running):
            if session_id not in running and session_id not in self._turns:
                self._running.pop(session_id, None)

    def load(self) -> Load:
        specs = [s for s in self._running.values() if s is not None]
        return Load(
            sessions=len(self._running),
            cpu_millis=sum(s.resources.cpu_millis for s in specs),
            memory_mb=sum(s.resources.memory_mb for s in specs),
        )
