"""Sessions that end on their own (the desktop was closed, the container died): the backend's
exit monitor tells the agent, which tells the control plane with a reliable SessionStatus."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from streamspace import logs
from streamspace.agent.backends.base import Backend
from streamspace.agent.enrolment import Enrolment
from streamspace.agent.outbox import Outbox
from streamspace.agent.sessions import SessionTable
from streamspace.protocol import SessionStatus

log = logs.get_logger(__name__)


class ExitWatch:
    def __init__(
        self,
        *,
        backend: Backend,
        sessions: SessionTable,
        outbox: Outbox,
        identity: Enrolment,
    ) -> None:
        self._backend = backend
        self._sessions = sessions
        self._outbox = outbox
        self._identity = identity
        self._task: asyncio.Task[None] | None = None
        self._chained_on_exit: Callable[[str, str], Awaitable[None]] | None = None

    @property
    def watching(self) -> bool:
        return self._task is not None

    def take_task(self) -> asyncio.Task[None] | None:
        """The monitor's task, for the caller to cancel; the next `start` starts a new one."""
        task, self._task = self._task, None
        return task

    def start(self) -> None:
        """Hook the backend's exit monitor if it has one (optional beyond the Backend ABC).

        Two shapes are supported: `start_monitor(on_exit)`, and (LocalBackend) an `on_exit`
        attribute plus an argument-less, idempotent `start_monitor()`. Either may return at once
        (monitor runs in the backend) or run until cancelled (it then lives in our task).
        """
        start_monitor = getattr(self._backend, "start_monitor", None)
        if not callable(start_monitor):
            return
        try:
            takes_callback = bool(inspect.signature(start_monitor).parameters)
        except (TypeError, ValueError):
            takes_callback = False
        if not takes_callback:
            previous = getattr(self._backend, "on_exit", None)
            if previous is not None and previous != self._on_session_exit:
                self._chained_on_exit = previous
            self._backend.on_exit = self._on_session_exit  # type: ignore[attr-defined]

        async def monitor() -> None:
            try:
                if takes_callback:
                    await start_monitor(self._on_session_exit)
                else:
                    await start_monitor()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("exit_monitor_failed", agent_id=self._identity.agent_id)

        self._task = asyncio.create_task(monitor(), name="agent-monitor")

    async def _on_session_exit(self, session_id: str, reason: str) -> None:
        self._sessions.ended(session_id)
        log.event(
            "session_exited",
            agent_id=self._identity.agent_id,
            session_id=session_id,
            reason=reason,
        )
        self._outbox.send(SessionStatus(session_id=session_id, state="exited", reason=reason))
        if self._chained_on_exit is not None:
            # Whoever set the backend's callback before us still gets told.
            await self._chained_on_exit(session_id, reason)
