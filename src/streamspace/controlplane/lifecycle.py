"""Session lifecycle: placement, agent commands, their results and every timeout path.

The control plane owns the state machine. Each transitional state is left either by an agent
result (completion path) or by `expire` (timeout path), so no session stays stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm.exc import StaleDataError

from streamspace import protocol
from streamspace.config import Settings
from streamspace.controlplane import scheduler
from streamspace.controlplane.catalog import TemplateSpec
from streamspace.controlplane.events import EventBus
from streamspace.controlplane.hub import Hub
from streamspace.controlplane.peers import Peers
from streamspace.controlplane.statemachine import (
    ACTIVE_STATES,
    ON_AGENT_STATES,
    ActionContended,
    State,
    check_transition,
)
from streamspace.controlplane.views import session_view, status_of
from streamspace.controlplane.writerturn import WriterTurn
from streamspace.db import onestatement
from streamspace.db.engine import Database
from streamspace.db.models import (
    OPEN_COMMAND_STATUSES,
    Agent,
    AgentCommand,
    CommandStatus,
    SessionEvent,
    Template,
    User,
)
from streamspace.db.models import Session as SessionRow
from streamspace.db.onestatement import ONE_STATEMENT_ONLY

log = logging.getLogger("streamspace.lifecycle")

REMOTE_WAKE_GAP_SECONDS = 0.02
ACTION_ATTEMPTS = 3
"""How often a stop/hibernate/wake is decided again when the session changed under it."""
SMALL_PLACEMENT_ROUND = 4
"""Sessions a placement round may hold to be written as one statement (3 rows each)."""
EVENTS_KEY = "streamspace.session_events"
SESSION_EVENTS = cast(Table, SessionEvent.__table__)


@sa_event.listens_for(OrmSession, "before_commit")
def _write_session_events(sess: OrmSession) -> None:
    """Session events are written in one multi-row INSERT per transaction (they are the most
    numerous rows; building ORM objects for them dominated placement batches)."""
    rows = sess.info.pop(EVENTS_KEY, None)
    if rows:
        sess.flush()
        sess.execute(insert(SessionEvent), rows)


@sa_event.listens_for(OrmSession, "after_rollback")
def _drop_session_events(sess: OrmSession) -> None:
    sess.info.pop(EVENTS_KEY, None)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Changed:
    session: SessionRow


class Lifecycle:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        write_db: Database,
        writer_turn: WriterTurn,
        events: EventBus,
        hub: Hub,
        peers: Peers,
    ) -> None:
        self.settings = settings
        self.db = db
        self.write_db = write_db
        """For writes that are one statement (see db.engine.write_session_factory)."""
        self.writer_turn = writer_turn
        self.events = events
        self.hub = hub
        self.peers = peers
        self._place_wakeup = asyncio.Event()
        self._last_remote_wake = -REMOTE_WAKE_GAP_SECONDS
        self._trailing_wake: asyncio.TimerHandle | None = None
        self._results: asyncio.Queue[tuple[str, protocol.Result | protocol.Ack]] = asyncio.Queue()
        self._usernames: dict[str, str] = {}

    # ---- helpers ------------------------------------------------------------------------

    def event(
        self, db: AsyncSession, session: SessionRow, kind: str, message: str, **data: Any
    ) -> None:
        db.info.setdefault(EVENTS_KEY, []).append(
            {"session_id": session.id, "kind": kind, "message": message, "data": data, "at": now()}
        )
        log.info("session_event session_id=%s kind=%s message=%r", session.id, kind, message)

    def transition(
        self,
        db: AsyncSession,
        session: SessionRow,
        target: State,
        message: str,
        *,
        action: str | None = None,
        kind: str | None = None,
        record: bool = True,
        **data: Any,
    ) -> None:
        check_transition(session.state, target, action or target.value)
        previous = session.state
        session.state = target.value
        session.state_changed_at = now()
        if target == State.FAILED:
            session.failure_reason = message
        if target in (State.STOPPED, State.FAILED, State.HIBERNATED):
            session.endpoint_host = None
            session.endpoint_port = None
        if target != State.PENDING:
            session.status_message = message if target == State.FAILED else ""
        if record:
            self.event(db, session, kind or target.value, message, previous=previous, **data)

    async def owner_name(self, db: AsyncSession, owner_id: str) -> str:
        name = self._usernames.get(owner_id)
        if name is None:
            name = await db.scalar(select(User.username).where(User.id == owner_id)) or ""
            self._usernames[owner_id] = name
        return name

    async def publish(self, db: AsyncSession, sessions: list[SessionRow]) -> None:
        if not self.events.watched:
            return
        for s in sessions:
            view = session_view(s, await self.owner_name(db, s.owner_id))
            self.events.publish(
                {"type": "session", "session": view.model_dump(mode="json")}, owner_id=s.owner_id
            )

    async def commit(
        self,
        db: AsyncSession,
        sessions: list[SessionRow],
        commands: list[AgentCommand] | None = None,
    ) -> None:
        """Commit, then tell the UI and send the commands (never before the rows exist).

        The UI first: once an agent has a command its answer can arrive at any moment, and a
        watcher must not get the answer before the state it answers (the view is built from
        memory; owner names are cached). Sending takes no database connection; recording that
        it happened does, in the background."""
        events = db.info.get(EVENTS_KEY) or []
        if await onestatement.write_pending(db, [(SESSION_EVENTS, events)]):
            db.info.pop(EVENTS_KEY, None)
        await db.commit()
        await self.publish(db, sessions)
        if commands:
            try:
                await self.hub.dispatch_many(commands)
            except Exception as exc:  # the commands are stored; the retry loop sends them later
                log.warning("dispatch_failed count=%d error=%r", len(commands), exc)

    def new_command(
        self,
        db: AsyncSession,
        session: SessionRow,
        action: str,
        spec: protocol.SessionSpec | None = None,
    ) -> AgentCommand:
        assert session.agent_id is not None
        cmd = AgentCommand(
            agent_id=session.agent_id,
            session_id=session.id,
            action=action,
            payload={"spec": spec.model_dump(mode="json")} if spec else {},
            status=CommandStatus.PENDING.value,
            attempts=0,
            deadline=now() + timedelta(seconds=self.settings.command_timeout_seconds),
        )
        db.add(cmd)
        return cmd

    async def build_spec(
        self,
        db: AsyncSession,
        session: SessionRow,
        templates: dict[str, TemplateSpec] | None = None,
    ) -> protocol.SessionSpec:
        tpl = templates.get(session.template_name) if templates is not None else None
        if tpl is None:
            row = await db.scalar(select(Template).where(Template.name == session.template_name))
            if row is None:
                raise LookupError(f"template {session.template_name!r} no longer exists")
            tpl = TemplateSpec.model_validate(row.spec)
        image = tpl.launch.docker or tpl.launch.kubernetes
        return protocol.SessionSpec(
            session_id=session.id,
            user_id=session.owner_id,
            user=await self.owner_name(db, session.owner_id),
            template=tpl.name,
            local=protocol.LocalLaunch(**tpl.launch.local.model_dump())
            if tpl.launch.local
            else None,
            image=protocol.ImageLaunch(**image.model_dump()) if image else None,
            display=tpl.display,
            resources=protocol.Resources(
                cpu_millis=session.cpu_millis, memory_mb=session.memory_mb
            ),
            persistent_home=session.persistent_home,
            network=tpl.network,
            home_limit_mb=session.home_limit_mb,
        )

    # ---- user actions -------------------------------------------------------------------

    async def act(
        self,
        db: AsyncSession,
        action: str,
        read: Callable[[], Awaitable[tuple[SessionRow, str]]],
    ) -> SessionRow:
        """stop / hibernate / wake, as a user asked for it: `read` loads the session (and
        records the request in the same transaction) and says why.

        No row lock is taken: the write is a compare-and-set on the session row
        (db.onestatement). If the session changed between the read and the write (an agent's
        result, another request), nothing was written and the action is decided again on the
        fresh row, up to ACTION_ATTEMPTS times. SQLite has no row locks; there the decision and
        the write take this replica's writer turn."""
        request = {
            "stop": self.request_stop,
            "hibernate": self.request_hibernate,
            "wake": self.request_wake,
        }[action]
        async with self.writer_turn.taken_by(db):
            for _ in range(ACTION_ATTEMPTS):
                session, why = await read()
                try:
                    await request(db, session, why)
                except StaleDataError:
                    db.expunge_all()  # before the rollback, which would expire the caller's rows
                    await db.rollback()
                    continue
                return session
        raise ActionContended(action)

    async def request_stop(self, db: AsyncSession, session: SessionRow, why: str) -> None:
        cmds: list[AgentCommand] = []
        if session.state in (State.STOPPING, State.STOPPED):
            return
        if session.state == State.PENDING or (
            session.state == State.FAILED and session.agent_id is None
        ):
            self.transition(db, session, State.STOPPED, why, action="stop")
        else:
            self.transition(db, session, State.STOPPING, why, action="stop")
            if session.agent_id is not None:
                cmds.append(self.new_command(db, session, "stop"))
        await self.commit(db, [session], cmds)

    async def request_hibernate(self, db: AsyncSession, session: SessionRow, why: str) -> None:
        self.transition(db, session, State.HIBERNATING, why, action="hibernate")
        cmd = self.new_command(db, session, "hibernate")
        await self.commit(db, [session], [cmd])

    async def request_wake(self, db: AsyncSession, session: SessionRow, why: str) -> None:
        check_transition(session.state, State.WAKING, "wake")
        try:
            spec = await self.build_spec(db, session)
        except LookupError as exc:
            self.transition(db, session, State.FAILED, f"cannot wake: {exc}")
            await self.commit(db, [session])
            return
        self.transition(db, session, State.WAKING, why, action="wake")
        session.last_activity = now()
        cmd = self.new_command(db, session, "wake", spec)
        await self.commit(db, [session], [cmd])

    async def end_owner_sessions(
        self, db: AsyncSession, owner_id: str, why: str, *, hibernate: bool
    ) -> list[SessionRow]:
        """Hibernate (the owner was disabled) or stop (deleted) every active session of an owner,
        in the caller's transaction, and commit. With `hibernate`, a session that cannot
        hibernate now (queued, starting, waking) is stopped instead; one already on its way down
        is left alone. Returns the sessions changed."""
        query = select(SessionRow).where(
            SessionRow.owner_id == owner_id,
            SessionRow.state.in_([s.value for s in ACTIVE_STATES]),
        )
        if not self.writer_turn.sqlite:
            query = query.order_by(SessionRow.id).with_for_update()
        changed: list[SessionRow] = []
        cmds: list[AgentCommand] = []
        for session in (await db.scalars(query)).all():
            st = State(session.state)
            if st == State.STOPPING or (hibernate and st in (State.HIBERNATING, State.HIBERNATED)):
                continue
            if hibernate and st == State.RUNNING:
                self.transition(db, session, State.HIBERNATING, why, action="hibernate")
                cmds.append(self.new_command(db, session, "hibernate"))
            elif st == State.PENDING or session.agent_id is None:
                self.transition(db, session, State.STOPPED, why, action="stop")
            else:
                self.transition(db, session, State.STOPPING, why, action="stop")
                cmds.append(self.new_command(db, session, "stop"))
            changed.append(session)
        await self.commit(db, changed, cmds)
        if changed:
            self.wake_placer()
        return changed

    # ---- placement ----------------------------------------------------------------------

    def wake_placer(self, local_only: bool = False) -> None:
        """Run placement now; with several replicas the lease holder is told too, at most once
        per REMOTE_WAKE_GAP_SECONDS. A wake inside the gap is deferred to its end, not dropped:
        dropped, it left a session created just after a placement round's read waiting for
        some later wake (the loop interval at worst)."""
        self._place_wakeup.set()
        if local_only:
            return
        wait = self._last_remote_wake + REMOTE_WAKE_GAP_SECONDS - time.monotonic()
        if wait <= 0:
            self._send_remote_wake()
        elif self._trailing_wake is None:
            self._trailing_wake = asyncio.get_running_loop().call_later(
                wait, self._send_remote_wake
            )

    def _send_remote_wake(self) -> None:
        self._trailing_wake = None
        self._last_remote_wake = time.monotonic()
        self.peers.wake_placers()

    async def wait_for_placement_work(self, max_wait: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._place_wakeup.wait(), max_wait)
        self._place_wakeup.clear()

    async def agent_snapshots(self, db: AsyncSession) -> list[scheduler.AgentSnapshot]:
        """Plain column rows, not ORM objects: this runs for every placement round and loading
        a fleet of agents as tracked instances cost tens of ms of event-loop time each time."""
        at = now()
        agents = (
            await db.execute(
                select(
                    Agent.id,
                    Agent.name,
                    Agent.cluster_id,
                    Agent.backend,
                    Agent.last_seen,
                    Agent.connected_replica,
                    Agent.draining,
                    Agent.healthy,
                    Agent.templates,
                    Agent.capacity_sessions,
                    Agent.capacity_cpu_millis,
                    Agent.capacity_memory_mb,
                ).where(Agent.revoked.is_(False))
            )
        ).all()
        usage = {
            row[0]: (int(row[1]), int(row[2]), int(row[3]))
            for row in (
                await db.execute(
                    select(
                        SessionRow.agent_id,
                        func.count(SessionRow.id),
                        func.coalesce(func.sum(SessionRow.cpu_millis), 0),
                        func.coalesce(func.sum(SessionRow.memory_mb), 0),
                    )
                    .where(
                        SessionRow.agent_id.is_not(None),
                        SessionRow.state.in_(
                            [s.value for s in ON_AGENT_STATES if s != State.HIBERNATED]
                            + [State.STOPPING.value]
                        ),
                    )
                    .group_by(SessionRow.agent_id)
                )
            )
        }
        snaps = []
        for (
            agent_id,
            name,
            cluster_id,
            backend,
            last_seen,
            connected_replica,
            draining,
            healthy,
            templates,
            max_sessions,
            cpu_millis,
            memory_mb,
        ) in agents:
            used = usage.get(agent_id, (0, 0, 0))
            online = status_of(False, last_seen, connected_replica, self.settings, at)
            snaps.append(
                scheduler.AgentSnapshot(
                    id=agent_id,
                    name=name,
                    cluster_id=cluster_id,
                    backend=backend,
                    online=online == "online",
                    draining=draining,
                    healthy=healthy,
                    templates=frozenset(templates),
                    max_sessions=max_sessions,
                    cpu_millis=cpu_millis,
                    memory_mb=memory_mb,
                    used_sessions=used[0],
                    used_cpu_millis=used[1],
                    used_memory_mb=used[2],
                )
            )
        return snaps

    async def place_pending(self, limit: int = 1000) -> int:
        """Place queued sessions in creation order; returns how many were placed.

        A small round (the usual case: a session or two created since the last one) is written
        as one statement without a transaction (`write_db`), a compare-and-set per session row,
        so a session a user stopped meanwhile is not resurrected: the round is dropped and run
        again. A larger round is one transaction, its pending rows locked as they are read, so
        the ORM's batched flush stays fast for a burst of thousands. SQLite has no row locks:
        there the round holds the lock that user actions on sessions hold too."""
        if self.writer_turn.sqlite:
            async with self.writer_turn.held(), self.db() as db:
                return await self._place(db, await self._pending(db, limit))
        async with self.write_db() as db:
            pending = await self._pending(db, limit)
            if len(pending) <= SMALL_PLACEMENT_ROUND:
                return await self._place(db, pending)
        async with self.db() as db:
            return await self._place(db, await self._pending(db, limit))

    async def _pending(self, db: AsyncSession, limit: int) -> list[SessionRow]:
        query = (
            select(SessionRow)
            .where(SessionRow.state == State.PENDING.value)
            .order_by(SessionRow.created_at)
            .limit(limit)
        )
        if not db.info.get(ONE_STATEMENT_ONLY):
            query = query.with_for_update(skip_locked=True)
        return list((await db.scalars(query)).all())

    async def _place(self, db: AsyncSession, pending: list[SessionRow]) -> int:
        if not pending:
            return 0
        snaps = await self.agent_snapshots(db)
        templates = {
            t.name: TemplateSpec.model_validate(t.spec)
            for t in (await db.scalars(select(Template))).all()
        }
        placer = scheduler.Placer(snaps, self.settings.scheduler_strategy)
        changed: list[SessionRow] = []
        cmds: list[AgentCommand] = []
        placed = 0
        for session in pending:
            req = scheduler.Request(
                session_id=session.id,
                template=session.template_name,
                cpu_millis=session.cpu_millis,
                memory_mb=session.memory_mb,
                cluster_id=session.requested_cluster_id,
            )
            decision = placer.place(req)
            if decision.agent is None:
                waiting = f"waiting for capacity: {decision.reason}"
                if session.status_message != waiting:
                    session.status_message = waiting
                    self.event(db, session, "queued", waiting, rejected=decision.rejected)
                    changed.append(session)
                continue
            try:
                spec = await self.build_spec(db, session, templates)
            except LookupError as exc:
                self.transition(db, session, State.FAILED, str(exc))
                changed.append(session)
                continue
            scheduler.reserve(decision.agent, req)
            session.agent_id = decision.agent.id
            session.cluster_id = decision.agent.cluster_id
            self.transition(
                db,
                session,
                State.SCHEDULED,
                decision.reason,
                kind="placed",
                agent_id=decision.agent.id,
                cluster_id=decision.agent.cluster_id,
            )
            cmds.append(self.new_command(db, session, "start", spec))
            changed.append(session)
            placed += 1
        try:
            await self.commit(db, changed, cmds)
        except StaleDataError:
            log.info("placement_round_dropped reason=session_changed sessions=%d", len(pending))
            self._place_wakeup.set()
            return 0
        return placed

    # ---- agent messages -----------------------------------------------------------------

    def submit_ack(self, agent_id: str, ack: protocol.Ack) -> None:
        """An ack moves a scheduled session to starting (the agent has the command)."""
        self._results.put_nowait((agent_id, ack))

    def submit_result(self, agent_id: str, result: protocol.Result) -> None:
        self._results.put_nowait((agent_id, result))

    async def process_results(self) -> None:
        """Apply agent results in batches: one transaction for everything that has arrived."""
        while True:
            batch = [await self._results.get()]
            while not self._results.empty() and len(batch) < 500:
                batch.append(self._results.get_nowait())
            try:
                await self.on_results(batch)
            except Exception as exc:
                log.warning("results_batch_failed size=%d error=%r", len(batch), exc)
                for agent_id, result in batch:
                    with contextlib.suppress(Exception):
                        await self.on_results([(agent_id, result)])

    async def on_result(self, agent_id: str, result: protocol.Result) -> None:
        await self.on_results([(agent_id, result)])

    async def on_results(self, batch: list[tuple[str, protocol.Result | protocol.Ack]]) -> None:
        async with self.db() as db:
            ids = [r.command_id for _, r in batch]
            cmds = {
                c.id: c
                for c in (
                    await db.scalars(select(AgentCommand).where(AgentCommand.id.in_(ids)))
                ).all()
            }
            session_ids = {c.session_id for c in cmds.values() if c.session_id}
            sessions: dict[str, SessionRow] = {}
            if session_ids:
                rows = await db.scalars(select(SessionRow).where(SessionRow.id.in_(session_ids)))
                sessions = {s.id: s for s in rows.all()}
            changed: dict[str, SessionRow] = {}
            new_cmds: list[AgentCommand] = []
            freed = False
            for agent_id, result in batch:
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
                        self.transition(
                            db, session, State.STARTING, "agent is starting the session"
                        )
                        changed[session.id] = session
                    continue
                if cmd is None or cmd.agent_id != agent_id:
                    log.warning(
                        "result_unknown_command agent_id=%s command_id=%s",
                        agent_id,
                        result.command_id,
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
            await self.commit(db, list(changed.values()), new_cmds)
            if freed:
                self.wake_placer()

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
                    self.transition(db, session, State.RUNNING, f"{verb} on agent {agent}")
                else:
                    self.transition(
                        db,
                        session,
                        State.FAILED,
                        f"{cmd.action} failed on agent {agent}: {result.error}",
                    )
            elif result.ok and st in (State.FAILED, State.STOPPED) and session.agent_id:
                cmds.append(self.new_command(db, session, "stop"))
                self.event(
                    db,
                    session,
                    "cleanup",
                    f"late {cmd.action} result; stopping the leftover on agent {agent}",
                )
        elif cmd.action == "hibernate" and st == State.HIBERNATING:
            if result.ok:
                self.transition(db, session, State.HIBERNATED, "hibernated; home kept")
            else:
                self.transition(db, session, State.FAILED, f"hibernate failed: {result.error}")
        elif cmd.action == "stop" and st == State.STOPPING:
            if result.ok:
                self.transition(db, session, State.STOPPED, f"stopped on agent {agent}")
            else:
                self.transition(db, session, State.FAILED, f"stop failed: {result.error}")
        elif cmd.action == "stop" and st == State.HIBERNATED and result.ok:
            # A stop asked for while the session was hibernating, overwritten by the hibernate
            # result read before it: the agent has stopped it, so it is stopped, not hibernated.
            self.transition(db, session, State.STOPPING, "stop requested while hibernating")
            self.transition(db, session, State.STOPPED, f"stopped on agent {agent}")

    async def on_session_status(self, agent_id: str, msg: protocol.SessionStatus) -> None:
        async with self.db() as db:
            session = await db.get(SessionRow, msg.session_id)
            if session is None or session.agent_id != agent_id:
                return
            if msg.state in ("exited", "stopped") and session.state == State.RUNNING:
                reason = msg.reason or "the session's processes exited"
                self.transition(
                    db, session, State.FAILED, f"session ended on agent {agent_id}: {reason}"
                )
                cmd = self.new_command(db, session, "stop")
                await self.commit(db, [session], [cmd])
                self.wake_placer()

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
                    self.transition(
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
        await self.commit(db, changed)
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
            self.transition(db, session, State.FAILED, why, replaced_by=agent_id)
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
            self.transition(db, session, State.FAILED, reason, agent_id=agent_id)
            session.agent_id = None
        await db.execute(
            update(AgentCommand)
            .where(
                AgentCommand.agent_id == agent_id,
                AgentCommand.status.in_(OPEN_COMMAND_STATUSES),
            )
            .values(status=CommandStatus.FAILED.value, completed_at=now(), error=reason)
        )
        await self.commit(db, list(rows))
        return len(rows)

    # ---- timeout paths ------------------------------------------------------------------

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
                    self.transition(db, session, State.FAILED, cmd.error)
                    changed.append(session)
            await db.commit()
            await self.publish(db, changed)
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
                    self.transition(db, session, State.FAILED, msg, kind="timeout")
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
            await self.publish(db, changed)

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
                    await self.request_stop(
                        db,
                        session,
                        f"reached its maximum duration of {session.max_duration_seconds} s; "
                        "stopped automatically",
                    )
                elif session.state == State.RUNNING and idle > session.idle_timeout_seconds:
                    await self.request_hibernate(
                        db,
                        session,
                        f"idle for {int(idle)} s (timeout {session.idle_timeout_seconds} s); "
                        "hibernated automatically",
                    )
