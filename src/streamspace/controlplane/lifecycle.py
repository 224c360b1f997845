"""Session lifecycle: the coordinator of what happens to a session, and what users ask for.

The control plane owns the state machine. Each transitional state is left either by an agent
result (completion path, results.py) or by a timeout (timeouts.py), so no session stays stuck.
Sessions change state in transitions.py; placement.py puts queued ones onto agents.
`Lifecycle` is what the API uses: a new session (`create_session`), a user's stop, hibernate
or wake (`act`), an owner's sessions ended at once, and the few transitions helpers a handler
needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from streamspace.config import Settings
from streamspace.controlplane import availability, entitlements, quotas
from streamspace.controlplane.creation import (
    Created,
    CreateInFlight,
    NewSession,
    TemplateUnavailable,
    by_idempotency_key,
    created_message,
    enabled_template,
    new_session_row,
)
from streamspace.controlplane.placement import Placement
from streamspace.controlplane.results import Results
from streamspace.controlplane.statemachine import ACTIVE_STATES, ActionContended, State
from streamspace.controlplane.transitions import Transitions
from streamspace.controlplane.writerturn import WriterTurn
from streamspace.db.models import AgentCommand, User
from streamspace.db.models import Session as SessionRow

ACTION_ATTEMPTS = 3
"""How often a stop/hibernate/wake is decided again when the session changed under it."""


class Lifecycle:
    def __init__(
        self,
        *,
        settings: Settings,
        transitions: Transitions,
        placement: Placement,
        results: Results,
        writer_turn: WriterTurn,
    ) -> None:
        self.settings = settings
        self.transitions = transitions
        self.placement = placement
        self.results = results
        self.writer_turn = writer_turn

    # ---- for request handlers -----------------------------------------------------------

    def event(
        self, db: AsyncSession, session: SessionRow, kind: str, message: str, **data: Any
    ) -> None:
        self.transitions.event(db, session, kind, message, **data)

    async def commit(self, db: AsyncSession, sessions: list[SessionRow]) -> None:
        await self.transitions.commit(db, sessions)

    async def owner_name(self, db: AsyncSession, owner_id: str) -> str:
        return await self.transitions.owner_name(db, owner_id)

    def wake_placer(self) -> None:
        self.placement.wake_placer()

    async def fail_agent_sessions(self, db: AsyncSession, agent_id: str, reason: str) -> int:
        return await self.results.fail_agent_sessions(db, agent_id, reason)

    # ---- user actions -------------------------------------------------------------------

    async def create_session(
        self,
        db: AsyncSession,
        owner: User,
        request: NewSession,
        record: Callable[[SessionRow], None],
    ) -> Created:
        """A new pending session for `owner`, or the one an earlier request with the same
        Idempotency-Key made. `record` adds the caller's audit entry to the insert's
        transaction.

        The quota check and the insert are one read-then-write: on PostgreSQL the owner's and
        their groups' rows are locked first (quotas.lock_subjects), on SQLite this replica's
        writer turn is held, so concurrent creates cannot both fit under the same quota. Raises
        UnknownTemplate, entitlements.NotEntitled, TemplateUnavailable, quotas.QuotaExceeded or
        CreateInFlight.

        Availability is read before the turn, from the agents' rows: an agent that goes away
        right after leaves the session queued (as one that dies after placement would), and
        one that arrives right after only costs the caller a retry."""
        existing = await by_idempotency_key(db, owner, request.idempotency_key)
        if existing is not None:
            return Created(existing, new=False)
        tpl = await enabled_template(db, request.template)
        await entitlements.require(db, owner, tpl)
        can = (await availability.availability(db, self.settings, [tpl], request.cluster_id))[
            tpl.name
        ]
        if not can.available:
            raise TemplateUnavailable(tpl.name, can.reason or "no agent can run it")
        session = new_session_row(request, tpl, owner, self.settings)
        async with self.writer_turn.taken_by(db):
            await quotas.lock_subjects(db, owner)
            # A concurrent create with the same key may have committed while we waited.
            existing = await by_idempotency_key(db, owner, request.idempotency_key)
            if existing is not None:
                db.expunge(existing)  # before the rollback, which would expire it
                await db.rollback()
                return Created(existing, new=False)
            session.home_limit_mb = await quotas.check_can_create(
                db, owner, self.settings, session.cpu_millis, session.memory_mb
            )
            db.add(session)
            try:
                await db.flush()
            except IntegrityError as exc:
                await db.rollback()
                raise CreateInFlight() from exc
            self.transitions.event(db, session, "created", created_message(session))
            record(session)
            await self.transitions.commit(db, [session])
        self.placement.wake_placer()
        return Created(session, new=True)

    async def request_stop(self, db: AsyncSession, session: SessionRow, why: str) -> None:
        await self.transitions.request_stop(db, session, why)

    async def request_hibernate(self, db: AsyncSession, session: SessionRow, why: str) -> None:
        await self.transitions.request_hibernate(db, session, why)

    async def request_wake(self, db: AsyncSession, session: SessionRow, why: str) -> None:
        await self.transitions.request_wake(db, session, why)

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

    async def end_owner_sessions(
        self, db: AsyncSession, owner_id: str, why: str, *, hibernate: bool
    ) -> list[SessionRow]:
        """Hibernate (the owner was disabled) or stop (deleted) every active session of an owner,
        in the caller's transaction, and commit. With `hibernate`, a session that cannot
        hibernate now (queued, starting, waking) is stopped instead; one already on its way down
        is left alone. Returns the sessions changed."""
        return await self._end_sessions(db, SessionRow.owner_id == owner_id, why, hibernate)

    async def end_agent_sessions(self, db: AsyncSession, agent_id: str, why: str) -> list[str]:
        """Hibernate every active session on one agent (`streamspace up` shutting down: homes
        kept, no process left), as end_owner_sessions does; the ids of those changed."""
        changed = await self._end_sessions(db, SessionRow.agent_id == agent_id, why, True)
        return [s.id for s in changed]

    async def _end_sessions(
        self, db: AsyncSession, which: Any, why: str, hibernate: bool
    ) -> list[SessionRow]:
        query = select(SessionRow).where(
            which,
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
                self.transitions.transition(db, session, State.HIBERNATING, why, action="hibernate")
                cmds.append(self.transitions.new_command(db, session, "hibernate"))
            elif st == State.PENDING or session.agent_id is None:
                self.transitions.transition(db, session, State.STOPPED, why, action="stop")
            else:
                self.transitions.transition(db, session, State.STOPPING, why, action="stop")
                cmds.append(self.transitions.new_command(db, session, "stop"))
            changed.append(session)
        await self.transitions.commit(db, changed, cmds)
        if changed:
            self.placement.wake_placer()
        return changed
