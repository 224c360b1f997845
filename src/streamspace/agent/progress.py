"""Start milestones from the backend to the control plane, as they happen.

A backend that knows where a slow start is ("scheduled on node n1", "pulling image …",
"container started", "VNC ready") calls back here, and the milestone goes out as a
SessionProgress on the live connection. It is news, not state: one lost in a reconnect is not
resent (the start's Result, which is reliable, says how it ended)."""

from __future__ import annotations

from streamspace import logs
from streamspace.agent.enrolment import Enrolment
from streamspace.agent.outbox import Outbox
from streamspace.protocol import PROGRESS_MAX, SessionProgress

log = logs.get_logger(__name__)


class ProgressRelay:
    def __init__(self, *, outbox: Outbox, identity: Enrolment) -> None:
        self._outbox = outbox
        self._identity = identity

    async def on_progress(self, session_id: str, message: str) -> None:
        if not message:
            return
        log.event(
            "session_progress_sent",
            agent_id=self._identity.agent_id,
            session_id=session_id,
            message=message,
        )
        self._outbox.send_if_connected(
            SessionProgress(session_id=session_id, message=message[:PROGRESS_MAX])
        )
