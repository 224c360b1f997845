"""Placement: queued sessions onto agents, in rounds run by the lease holder.

A round reads the pending sessions and a snapshot of the agents, asks the scheduler (pure,
scheduler.py) where each goes, and writes the decisions with their start commands. Anything
that may make a round place more (a new session, freed capacity, an agent back) wakes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from streamspace import logs
from streamspace.config import Settings
from streamspace.controlplane import availability, scheduler
from streamspace.controlplane.catalog import TemplateSpec
from streamspace.controlplane.peers import Peers
from streamspace.controlplane.statemachine import State
from streamspace.controlplane.transitions import Transitions
from streamspace.controlplane.writerturn import WriterTurn
from streamspace.db.engine import Database
from streamspace.db.models import AgentCommand, Template
from streamspace.db.models import Session as SessionRow
from streamspace.db.onestatement import ONE_STATEMENT_ONLY

log = logs.get_logger("streamspace.lifecycle")

REMOTE_WAKE_GAP_SECONDS = 0.02
SMALL_PLACEMENT_ROUND = 4
"""Sessions a placement round may hold to be written as one statement (3 rows each)."""


class Placement:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        write_db: Database,
        writer_turn: WriterTurn,
        peers: Peers,
        transitions: Transitions,
    ) -> None:
        self.settings = settings
        self.db = db
        self.write_db = write_db
        """For writes that are one statement (see db.engine.write_session_factory)."""
        self.writer_turn = writer_turn
        self.peers = peers
        self.transitions = transitions
        self._place_wakeup = asyncio.Event()
        self._last_remote_wake = -REMOTE_WAKE_GAP_SECONDS
        self._trailing_wake: asyncio.TimerHandle | None = None

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

    async def wait_for_work(self, max_wait: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._place_wakeup.wait(), max_wait)
        self._place_wakeup.clear()

    async def agent_snapshots(self, db: AsyncSession) -> list[scheduler.AgentSnapshot]:
        return await availability.agent_snapshots(db, self.settings)

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
                    self.transitions.event(
                        db, session, "queued", waiting, rejected=decision.rejected
                    )
                    changed.append(session)
                continue
            try:
                spec = await self.transitions.build_spec(db, session, templates)
            except LookupError as exc:
                self.transitions.transition(db, session, State.FAILED, str(exc))
                changed.append(session)
                continue
            scheduler.reserve(decision.agent, req)
            session.agent_id = decision.agent.id
            session.cluster_id = decision.agent.cluster_id
            self.transitions.transition(
                db,
                session,
                State.SCHEDULED,
                decision.reason,
                kind="placed",
                agent_id=decision.agent.id,
                cluster_id=decision.agent.cluster_id,
            )
            cmds.append(self.transitions.new_command(db, session, "start", spec))
            changed.append(session)
            placed += 1
        try:
            await self.transitions.commit(db, changed, cmds)
        except StaleDataError:
            log.event("placement_round_dropped", reason="session_changed", sessions=len(pending))
            self._place_wakeup.set()
            return 0
        return placed
