"""Agent results: what the agents say happened, applied to the sessions they answer.

Results, acks and start milestones are queued by the agent socket and applied in batches, in
the order they came, one transaction for everything that has arrived: a milestone costs the
agent's read loop nothing, and the ones just before a start's Result share its commit. Also
here: a (re)connecting agent's inventory reconciled with the database, a session the agent
reports ended, and the sessions of a revoked agent.
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace import logs, protocol
from streamspace.controlplane.placement import Placement
from streamspace.controlplane.statemachine import ACTIVE_STATES, ON_AGENT_STATES, State
from streamspace.controlplane.transitions import Transitions, now
from streamspace.db.engine import Database
from streamspace.db.models import OPEN_COMMAND_STATUSES, AgentCommand, CommandStatus
from streamspace.db.models import Session as SessionRow

log = logs.get_logger("streamspace.lifecycle")

PROGRESS_STATES = frozenset({State.SCHEDULED.value, State.STARTING.value, State.WAKING.value})
Queued = protocol.Result | protocol.Ack | protocol.SessionProgress


class Results:
    def __init__(self, *, db: Database, transitions: Transitions, placement: Placement) -> None:
        self.db = db
        self.transitions = transitions
        self.placement = placement
        self._results: asyncio.Queue[tuple[str, Queued]] = asyncio.Queue()

    def submit_ack(self, agent_id: str, ack: protocol.Ack) -> None:
        """An ack moves a scheduled session to starting (the agent has the command)."""
        self._results.put_nowait((agent_id, ack))

    def submit_result(self, agent_id: str, result: protocol.Result) -> None:
        self._results.put_nowait((agent_id, result))

    def submit_progress(self, agent_id: str, progress: protocol.SessionProgress) -> None:
        self._results.put_nowait((agent_id, progress))

    async def process(self) -> None:
        """Apply agent results in batches: one transaction for everything that has arrived."""
        while True:
            batch = [await self._results.get()]
            while not self._results.empty() and len(batch) < 500:
                batch.append(self._results.get_nowait())
            try:
                await self.on_results(batch)
            except Exception as exc:
                log.warning("results_batch_failed", size=len(batch), error=exc)
                for agent_id, result in batch:
                    with contextlib.suppress(Exception):
                        await self.on_results([(agent_id, result)])

    async def on_results(self, batch: list[tuple[str, Queued]]) -> None:
        async with self.db() as db:
            ids = [r.command_id for _, r in batch if not isinstance(r, protocol.SessionProgress)]
            cmds = (
                {
                    c.id: c
                    for c in (
                        await db.scalars(select(AgentCommand).where(AgentCommand.id.in_(ids)))
                    ).all()
                }
                if ids
                else {}
            )
            session_ids = {c.session_id for c in cmds.values() if c.session_id}
            session_ids |= {
                r.session_id for _, r in batch if isinstance(r, protocol.SessionProgress)
            }
            sessions: dict[str, SessionRow] = {}
            if session_ids:
                rows = await db.scalars(select(SessionRow).where(SessionRow.id.in_(session_ids)))
                sessions = {s.id: s for s in rows.all()}
            changed: dict[str, SessionRow] = {}
            new_cmds: list[AgentCommand] = []
            freed = False
            for agent_id, result in batch:
                if isinstance(result, protocol.SessionProgress):
                    self._record_progress(db, sessions.get(result.session_id), agent_id, result)
                    continue
                cmd = cmds.get(result.command_id)
                if isinstance(result, protocol.Ack):
                    session = sessions.get(cmd.session_id or "") if cmd else None
                    if (
                        cmd is not None
                        and cmd.agent_id == agent_id
                        and cmd.action == "start"
                        and session is not None
                        and session.state == State.SCHEDULED
                    ):
                        self.transitions.transition(
                            db, session, State.STARTING, "agent is starting the session"
                        )
                        changed[session.id] = session
                    continue
                if cmd is None or cmd.agent_id != agent_id:
                    log.warning(
                        "result_unknown_command", agent_id=agent_id, command_id=result.command_id
                    )
                    continue
                if cmd.status in (CommandStatus.SUCCEEDED, CommandStatus.FAILED):
                    continue
                late_start = result.ok and cmd.action in ("start", "wake")
                if cmd.status == CommandStatus.TIMED_OUT and not late_start:
                    continue
                cmd.status = (CommandStatus.SUCCEEDED if result.ok else CommandStatus.FAILED).value
                cmd.error = result.error
                cmd.completed_at = now()
                freed = freed or cmd.action in ("stop", "hibernate") or not result.ok
                session = sessions.get(cmd.session_id or "")
                if session is not None:
                    self._apply_result(db, session, cmd, result, agent_id, new_cmds)
                    changed[session.id] = session
            await self.transitions.commit(db, list(changed.values()), new_cmds)
            if freed:
                self.placement.wake_placer()

    def _apply_result(
        self,
        db: AsyncSession,
        session: SessionRow,
        cmd: AgentCommand,
        result: protocol.Result,
        agent_id: str,
        cmds: list[AgentCommand],
    ) -> None:
        st = session.state
        agent = agent_id
        if cmd.action in ("start", "wake"):
            if st in (State.SCHEDULED, State.STARTING, State.WAKING):
                if result.ok and result.endpoint is not None:
                    session.endpoint_host = result.endpoint.describe()
                    session.endpoint_port = result.endpoint.port
                    session.started_at = session.started_at or now()
                    session.last_activity = now()
                    verb = "started" if cmd.action == "start" else "woke"
                    self.transitions.transition(
                        db, session, State.RUNNING, f"{verb} on agent {agent}"
                    )
                else:
                    self.transitions.transition(
                        db,
                        session,
                        State.FAILED,
                        f"{cmd.action} failed on agent {agent}: {result.error}",
                    )
            elif result.ok and st in (State.FAILED, State.STOPPED) and session.agent_id:
                cmds.append(self.transitions.new_command(db, session, "stop"))
                self.transitions.event(
                    db,
                    session,
                    "cleanup",
                    f"late {cmd.action} result; stopping the leftover on agent {agent}",
                )
        elif cmd.action == "hibernate" and st == State.HIBERNATING:
            if result.ok:
                self.transitions.transition(db, session, State.HIBERNATED, "hibernated; home kept")
            else:
                self.transitions.transition(
                    db, session, State.FAILED, f"hibernate failed: {result.error}"
                )
        elif cmd.action == "stop" and st == State.STOPPING:
            if result.ok:
                self.transitions.transition(db, session, State.STOPPED, f"stopped on agent {agent}")
            else:
                self.transitions.transition(
                    db, session, State.FAILED, f"stop failed: {result.error}"
                )
        elif cmd.action == "stop" and st == State.HIBERNATED and result.ok:
            # A stop asked for while the session was hibernating, overwritten by the hibernate
            # result read before it: the agent has stopped it, so it is stopped, not hibernated.
            self.transitions.transition(
                db, session, State.STOPPING, "stop requested while hibernating"
            )
            self.transitions.transition(db, session, State.STOPPED, f"stopped on agent {agent}")

    async def on_session_status(self, agent_id: str, msg: protocol.SessionStatus) -> None:
        async with self.db() as db:
            session = await db.get(SessionRow, msg.session_id)
            if session is None or session.agent_id != agent_id:
                return
            if msg.state in ("exited", "stopped") and session.state == State.RUNNING:
                reason = msg.reason or "the session's processes exited"
                self.transitions.transition(
                    db, session, State.FAILED, f"session ended on agent {agent_id}: {reason}"
                )
                cmd = self.transitions.new_command(db, session, "stop")
                await self.transitions.commit(db, [session], [cmd])
                self.placement.wake_placer()

    def _record_progress(
        self,
        db: AsyncSession,
        session: SessionRow | None,
        agent_id: str,
        msg: protocol.SessionProgress,
    ) -> None:
        """A start milestone, recorded as a `progress` session event while the session is
        being started or woken on that agent; for any other session (another agent's, one
        already running or stopped) it is stale or false and dropped."""
        if session is None or session.agent_id != agent_id:
            return
        if session.state not in PROGRESS_STATES:
            return
        self.transitions.event(db, session, "progress", msg.message, agent_id=agent_id)

    async def reconcile(
        self, db: AsyncSession, agent_id: str, inventory: list[protocol.InventoryItem]
    ) -> list[str]:
        """Align the database with what a (re)connecting agent really runs.

        Returns the inventory ids the agent must keep; it stops every other one.
        """
        reported = {item.session_id: item for item in inventory}
        rows = (
            await db.scalars(
                select(SessionRow).where(
                    SessionRow.agent_id == agent_id,
                    SessionRow.state.in_([s.value for s in ACTIVE_STATES]),
                )
            )
        ).all()
        keep: list[str] = []
        changed: list[SessionRow] = []
        open_cmds = set(
            (
                await db.scalars(
                    select(AgentCommand.session_id).where(
                        AgentCommand.agent_id == agent_id,
                        AgentCommand.status.in_(OPEN_COMMAND_STATUSES),
                    )
                )
            ).all()
        )
        for session in rows:
            item = reported.get(session.id)
            if session.state == State.RUNNING:
                if item is None or item.state != "running":
                    seen = "not running" if item is None else item.state
                    self.transitions.transition(
                        db,
                        session,
                        State.FAILED,
                        f"agent {agent_id} reconnected and the session was {seen} there",
                    )
                    changed.append(session)
                    if item is not None:
                        continue
                else:
                    if item.endpoint is not None and (
                        item.endpoint.describe(),
                        item.endpoint.port,
                    ) != (session.endpoint_host, session.endpoint_port):
                        session.endpoint_host = item.endpoint.describe()
                        session.endpoint_port = item.endpoint.port
                    keep.append(session.id)
            elif item is not None and (session.state in ON_AGENT_STATES or session.id in open_cmds):
                keep.append(session.id)
        changed += await self._fail_replaced(db, agent_id, set(reported) - {s.id for s in rows})
        await self.transitions.commit(db, changed)
        return keep

    async def _fail_replaced(
        self, db: AsyncSession, agent_id: str, session_ids: set[str]
    ) -> list[SessionRow]:
        """Sessions this agent reports that the database places on another agent: that one was
        replaced by this one (enrolled again under a new identity with the same session
        state). They fail, saying so, and leave the old identity; this agent stops them (they
        are not in its `keep`). Left alone they stayed `running` on an agent that never comes
        back."""
        if not session_ids:
            return []
        rows = (
            await db.scalars(
                select(SessionRow).where(
                    SessionRow.id.in_(sorted(session_ids)),
                    SessionRow.agent_id.is_not(None),
                    SessionRow.agent_id != agent_id,
                    SessionRow.state.in_([s.value for s in ACTIVE_STATES]),
                )
            )
        ).all()
        for session in rows:
            old = session.agent_id
            why = (
                f"agent {old} was replaced by agent {agent_id} (enrolled again under a new "
                "identity); the session was stopped"
            )
            self.transitions.transition(db, session, State.FAILED, why, replaced_by=agent_id)
            session.agent_id = None
        return list(rows)

    async def fail_agent_sessions(self, db: AsyncSession, agent_id: str, reason: str) -> int:
        """Sessions on an agent that can never answer again (revoked) fail with the reason and
        leave it: a stop then ends them at once instead of waiting on that agent for minutes."""
        rows = (
            await db.scalars(
                select(SessionRow).where(
                    SessionRow.agent_id == agent_id,
                    SessionRow.state.in_([s.value for s in ACTIVE_STATES]),
                )
            )
        ).all()
        for session in rows:
            self.transitions.transition(db, session, State.FAILED, reason, agent_id=agent_id)
            session.agent_id = None
        await db.execute(
            update(AgentCommand)
            .where(
                AgentCommand.agent_id == agent_id,
                AgentCommand.status.in_(OPEN_COMMAND_STATUSES),
            )
            .values(status=CommandStatus.FAILED.value, completed_at=now(), error=reason)
        )
        await self.transitions.commit(db, list(rows))
        return len(rows)
