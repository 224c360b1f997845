"""Sessions that end on their own (the desktop was closed, the container died): the backend's
exit watch tells the agent, which tells the control plane with a reliable SessionStatus."""

from __future__ import annotations

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
        self._watching = False

    @property
    def watching(self) -> bool:
        return self._watching

    async def start(self) -> None:
        """Hand the backend our callback (`Backend.watch_exits`); the watch then runs inside
        the backend until it is closed. A failure is logged and tried again on the next
        connection attempt: the agent must still serve its running sessions without it."""
        try:
            await self._backend.watch_exits(self._on_session_exit)
        except Exception:
            log.exception("exit_monitor_failed", agent_id=self._identity.agent_id)
            return
        self._watching = True

    def reset(self) -> None:
        """The agent stopped: its next run hands the callback over again, in case the backend
        was closed meanwhile (watch_exits is idempotent)."""
        self._watching = False

    async def _on_session_exit(self, session_id: str, reason: str) -> None:
        self._sessions.ended(session_id)
        log.event(
            "session_exited",
            agent_id=self._identity.agent_id,
            session_id=session_id,
            reason=reason,
        )
        self._outbox.send(SessionStatus(session_id=session_id, state="exited", reason=reason))
