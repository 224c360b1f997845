"""The timeout paths: every transitional state is left by an agent result or, failing that,
here, so no session stays stuck; and the idle culler (hibernate when idle, stop at the
maximum duration). Run by the lease holder's loops.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from streamspace.config import Settings
from streamspace.controlplane.hub import Hub
from streamspace.controlplane.statemachine import State
from streamspace.controlplane.transitions import Transitions, now
from streamspace.db.engine import Database
from streamspace.db.models import OPEN_COMMAND_STATUSES, AgentCommand, CommandStatus
from streamspace.db.models import Session as SessionRow


class Timeouts:
    def __init__(
        self, *, settings: Settings, db: Database, hub: Hub, transitions: Transitions
    ) -> None:
        self.settings = settings
        self.db = db
        self.hub = hub
        self.transitions = transitions

    async def expire(self) -> None:
        await self._expire_commands()
        await self._expire_states()

    async def _expire_commands(self) -> None:
        at = now()
        async with self.db() as db:
            overdue = (
                await db.scalars(
                    select(AgentCommand)
                    .where(
                        AgentCommand.status.in_(OPEN_COMMAND_STATUSES),
                        AgentCommand.deadline < at,
                    )
                    .limit(500)
                )
            ).all()
            resend: list[AgentCommand] = []
            changed: list[SessionRow] = []
            timeout = self.settings.command_timeout_seconds
            max_attempts = self.settings.command_max_attempts
            for cmd in overdue:
                too_old = cmd.created_at < at - timedelta(seconds=timeout * (max_attempts + 1))
                if cmd.attempts < max_attempts and not too_old:
                    cmd.deadline = at + timedelta(seconds=timeout)
                    resend.append(cmd)
                    continue
                cmd.status = CommandStatus.TIMED_OUT.value
                cmd.completed_at = at
                cmd.error = (
                    f"agent {cmd.agent_id} did not complete {cmd.action} after "
                    f"{cmd.attempts} attempts"
                )
                session = await db.get(SessionRow, cmd.session_id) if cmd.session_id else None
                if session is not None and session.state in (
                    State.SCHEDULED,
                    State.STARTING,
                    State.WAKING,
                    State.HIBERNATING,
                    State.STOPPING,
                ):
                    self.transitions.transition(db, session, State.FAILED, cmd.error)
                    changed.append(session)
            await db.commit()
            await self.transitions.publish(db, changed)
        for cmd in resend:
            await self.hub.dispatch(cmd.id, retry=True)

    async def _expire_states(self) -> None:
        at = now()
        s = self.settings
        limits = {
            State.SCHEDULED: s.starting_timeout_seconds,
            State.STARTING: s.starting_timeout_seconds,
            State.WAKING: s.starting_timeout_seconds,
            State.HIBERNATING: s.stopping_timeout_seconds,
            State.STOPPING: s.stopping_timeout_seconds,
            State.PENDING: s.queue_timeout_seconds,
        }
        async with self.db() as db:
            changed: list[SessionRow] = []
            for st, seconds in limits.items():
                rows = (
                    await db.scalars(
                        select(SessionRow)
                        .where(
                            SessionRow.state == st.value,
                            SessionRow.state_changed_at < at - timedelta(seconds=seconds),
                        )
                        .limit(500)
                    )
                ).all()
                for session in rows:
                    if st == State.PENDING:
                        why = session.status_message.removeprefix("waiting for capacity: ")
                        msg = f"no agent could take it within {int(seconds)} s ({why or 'queue'})"
                    else:
                        msg = f"stuck {st.value} for {int(seconds)} s; giving up"
                    self.transitions.transition(db, session, State.FAILED, msg, kind="timeout")
                    changed.append(session)
            if changed:
                await db.execute(
                    update(AgentCommand)
                    .where(
                        AgentCommand.session_id.in_([c.id for c in changed]),
                        AgentCommand.status.in_(OPEN_COMMAND_STATUSES),
                    )
                    .values(
                        status=CommandStatus.TIMED_OUT.value,
                        completed_at=at,
                        error="session timed out",
                    )
                )
            await db.commit()
            await self.transitions.publish(db, changed)

    async def cull(self) -> None:
        """Hibernate sessions idle past idle_timeout; stop those past max_duration."""
        at = now()
        async with self.db() as db:
            running = (
                await db.scalars(
                    select(SessionRow).where(
                        SessionRow.state.in_([State.RUNNING.value, State.HIBERNATED.value])
                    )
                )
            ).all()
            for session in running:
                age = (at - session.created_at).total_seconds()
                idle = (at - session.last_activity).total_seconds()
                if age > session.max_duration_seconds:
                    await self.transitions.request_stop(
                        db,
                        session,
                        f"reached its maximum duration of {session.max_duration_seconds} s; "
                        "stopped automatically",
                    )
                elif session.state == State.RUNNING and idle > session.idle_timeout_seconds:
                    await self.transitions.request_hibernate(
                        db,
                        session,
                        f"idle for {int(idle)} s (timeout {session.idle_timeout_seconds} s); "
                        "hibernated automatically",
                    )
