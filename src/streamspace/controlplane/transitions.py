"""Where a session changes state: each transition with its session event, the commands that
go with it, and the commit that writes them together and then tells the UI and the agent.

Placement, agent results and timeouts (placement.py, results.py, timeouts.py) all change
sessions through `Transitions`; the state machine (statemachine.py) decides what is legal.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session as OrmSession

from streamspace import logs, protocol
from streamspace.config import Settings
from streamspace.controlplane import grouppolicy
from streamspace.controlplane.catalog import TemplateSpec
from streamspace.controlplane.events import EventBus
from streamspace.controlplane.hub import Hub
from streamspace.controlplane.statemachine import State, check_transition
from streamspace.controlplane.views import session_view
from streamspace.db import onestatement
from streamspace.db.models import AgentCommand, CommandStatus, SessionEvent, Template, User
from streamspace.db.models import Session as SessionRow

log = logs.get_logger("streamspace.lifecycle")

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


class Transitions:
    def __init__(self, *, settings: Settings, events: EventBus, hub: Hub) -> None:
        self.settings = settings
        self.events = events
        self.hub = hub
        self._usernames: dict[str, str] = {}

    def event(
        self, db: AsyncSession, session: SessionRow, kind: str, message: str, **data: Any
    ) -> None:
        db.info.setdefault(EVENTS_KEY, []).append(
            {"session_id": session.id, "kind": kind, "message": message, "data": data, "at": now()}
        )
        log.event("session_event", session_id=session.id, kind=kind, message=message)

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
                log.warning("dispatch_failed", count=len(commands), error=exc)

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
            image=image.image_launch() if image else None,
            display=tpl.display,
            resources=protocol.Resources(
                cpu_millis=session.cpu_millis, memory_mb=session.memory_mb
            ),
            persistent_home=session.persistent_home,
            network=tpl.network,
            home_limit_mb=session.home_limit_mb,
            node_selector=tpl.launch.kubernetes.node_selector if tpl.launch.kubernetes else {},
            tolerations=tpl.launch.kubernetes.tolerations if tpl.launch.kubernetes else [],
            clipboard=protocol.Clipboard(
                copy_in=await grouppolicy.allowed(
                    db, self.settings, session.owner_id, "clipboard_in"
                ),
                copy_out=await grouppolicy.allowed(
                    db, self.settings, session.owner_id, "clipboard_out"
                ),
            ),
        )

    # ---- requested transitions ----------------------------------------------------------

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
