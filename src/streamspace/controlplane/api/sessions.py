"""Sessions API. The owner always comes from the token; every access is checked per resource."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy import exists, func, literal_column, select, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.controlplane import audit, entitlements, grouppolicy
from streamspace.controlplane.api.schemas import (
    ConnectOut,
    Page,
    SessionCreateIn,
    SessionPatchIn,
    _clean_tags,
)
from streamspace.controlplane.catalog import spec_of
from streamspace.controlplane.creation import NewSession
from streamspace.controlplane.deps import (
    CreateTurnDep,
    DbDep,
    StateDep,
    UserDep,
    one_statement,
)
from streamspace.controlplane.problems import Problem, bad_request, conflict, not_found
from streamspace.controlplane.state import AppState
from streamspace.controlplane.statemachine import ACTIVE_STATES, State
from streamspace.controlplane.views import SessionOut, session_view
from streamspace.controlplane.writerturn import SLOT_KEY
from streamspace.db.models import Session as SessionRow
from streamspace.db.models import SessionEvent, Template, User

router = APIRouter(prefix="/api/v1/sessions", tags=["sessions"])


async def load_owned(db: AsyncSession, session_id: str, user: User) -> SessionRow:
    """The session if `user` may act on it; 404 (not 403) for other people's sessions."""
    if len(session_id) > 64:
        raise bad_request("session id is too long")
    session = await db.get(SessionRow, session_id)
    if session is None or (session.owner_id != user.id and user.role != "admin"):
        raise not_found("session", session_id)
    return session


async def _view(
    db: AsyncSession, state: AppState, row: SessionRow, with_events: bool = False
) -> SessionOut:
    events = None
    if with_events:
        events = list(
            (
                await db.scalars(
                    select(SessionEvent)
                    .where(SessionEvent.session_id == row.id)
                    .order_by(SessionEvent.id.desc())
                    .limit(50)
                )
            ).all()
        )
        events.reverse()
    return session_view(row, await state.lifecycle.owner_name(db, row.owner_id), events)


def _tag_filter(db: AsyncSession, tag: str):  # type: ignore[no-untyped-def]
    if db.get_bind().dialect.name == "postgresql":
        return type_coerce(SessionRow.tags, JSONB).contains([tag])
    each = func.json_each(SessionRow.tags).table_valued("value")
    return exists(select(literal_column("1")).select_from(each).where(each.c.value == tag))


@router.post("", response_model=SessionOut, status_code=201)
async def create_session(
    body: SessionCreateIn,
    request: Request,
    response: Response,
    _turn: CreateTurnDep,
    user: UserDep,
    state: StateDep,
    db: DbDep,
    idempotency_key: str | None = Header(None, max_length=128),
) -> SessionOut:
    res = body.resources
    wanted = NewSession(
        template=body.template,
        tags=body.clean_tags(),
        cluster_id=body.cluster_id,
        cpu_millis=res.cpu_millis if res else None,
        memory_mb=res.memory_mb if res else None,
        persistent_home=body.persistent_home,
        idle_timeout_seconds=body.idle_timeout_seconds,
        idempotency_key=idempotency_key,
    )

    def record(session: SessionRow) -> None:
        audit.record(
            db,
            actor=user,
            action="session.create",
            resource_type="session",
            resource_id=session.id,
            request=request,
            status_code=201,
            template=session.template_name,
        )

    created = await state.lifecycle.create_session(db, user, wanted, record)
    if created.new:
        response.headers["Location"] = f"/api/v1/sessions/{created.session.id}"
    else:
        response.status_code = 200
    return await _view(db, state, created.session)


@router.get("", response_model=Page[SessionOut])
async def list_sessions(
    user: UserDep,
    state: StateDep,
    db: DbDep,
    all: bool = Query(False, description="admins and operators: everyone's sessions"),
    state_filter: str | None = Query(
        None, alias="state", max_length=200, description="comma-separated states"
    ),
    active: bool | None = Query(None, description="only active (not stopped/failed)"),
    tag: str | None = Query(None, max_length=64),
    template: str | None = Query(None, max_length=64),
    owner: str | None = Query(None, max_length=64, description="with all=true: by username"),
    limit: int = Query(50, ge=1, le=200),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Response:
    stmt = select(SessionRow)
    if all:
        if user.role not in ("admin", "operator"):
            raise Problem(
                403, "Forbidden", "all=true needs the admin or operator role", kind="forbidden"
            )
        if owner:
            stmt = stmt.join(User, User.id == SessionRow.owner_id).where(User.username == owner)
    else:
        stmt = stmt.where(SessionRow.owner_id == user.id)
    if state_filter:
        wanted = [s.strip() for s in state_filter.split(",") if s.strip()]
        bad = [s for s in wanted if s not in State.__members__.values()]
        if bad:
            raise Problem(
                422,
                "Invalid request",
                f"state: unknown state {bad[0]!r}; one of " + ", ".join(s.value for s in State),
                kind="invalid-request",
            )
        stmt = stmt.where(SessionRow.state.in_(wanted))
    if active is not None:
        states = [s.value for s in ACTIVE_STATES]
        stmt = stmt.where(
            SessionRow.state.in_(states) if active else SessionRow.state.not_in(states)
        )
    if tag:
        stmt = stmt.where(_tag_filter(db, tag))
    if template:
        stmt = stmt.where(SessionRow.template_name == template)
    total = await db.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = (
        await db.scalars(
            stmt.order_by(SessionRow.created_at.desc(), SessionRow.id).limit(limit).offset(offset)
        )
    ).all()
    owners = {r.owner_id for r in rows} - {user.id}
    names = {user.id: user.username}
    if owners:
        query = select(User.id, User.username).where(User.id.in_(owners))
        names.update(dict((await db.execute(query)).all()))
    page = Page[SessionOut](
        items=[session_view(r, names.get(r.owner_id, "")) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )
    # Serialised once here; FastAPI would validate the 50 items a second time.
    return Response(page.model_dump_json(), media_type="application/json")


@router.get("/{session_id}", response_model=SessionOut)
async def get_session(session_id: str, user: UserDep, state: StateDep, db: DbDep) -> SessionOut:
    return await _view(db, state, await load_owned(db, session_id, user), with_events=True)


@router.patch("/{session_id}", response_model=SessionOut)
async def patch_session(
    session_id: str,
    body: SessionPatchIn,
    request: Request,
    user: UserDep,
    state: StateDep,
    db: DbDep,
) -> SessionOut:
    session = await load_owned(db, session_id, user)
    if body.tags is not None:
        session.tags = _clean_tags(body.tags)
    if body.idle_timeout_seconds is not None:
        session.idle_timeout_seconds = body.idle_timeout_seconds
    if body.max_duration_seconds is not None:
        if user.role != "admin":
            raise Problem(
                403, "Forbidden", "only admins may change max_duration_seconds", kind="forbidden"
            )
        session.max_duration_seconds = body.max_duration_seconds
    audit.record(
        db,
        actor=user,
        action="session.update",
        resource_type="session",
        resource_id=session.id,
        request=request,
        fields=sorted(body.model_dump(exclude_unset=True)),
    )
    await state.lifecycle.commit(db, [session])
    return await _view(db, state, session)


async def _owner_entitled(db: AsyncSession, session: SessionRow, caller: User) -> None:
    """A wake starts the app again, so its owner must still be entitled to the template: a
    session hibernated before the owner left the template's groups stays asleep (it can still
    be stopped). Running sessions are left running."""
    row = await db.scalar(select(Template).where(Template.name == session.template_name))
    if row is None:
        return
    owner = caller if caller.id == session.owner_id else await db.get(User, session.owner_id)
    if owner is not None:
        await entitlements.require(db, owner, spec_of(row))


async def _act(
    action: str, session_id: str, request: Request, user: User, state: AppState, db: AsyncSession
) -> SessionOut:
    """stop / hibernate / wake: load with the owner check, audit, hand to the lifecycle."""

    async def read() -> tuple[SessionRow, str]:
        session = await load_owned(db, session_id, user)
        if action == "wake":
            await _owner_entitled(db, session, user)
        who = "you" if session.owner_id == user.id else f"admin {user.username}"
        audit.record(
            db,
            actor=user,
            action=f"session.{action}",
            resource_type="session",
            resource_id=session.id,
            request=request,
            status_code=202,
        )
        return session, f"{action} requested by {who}"

    return await _view(db, state, await state.lifecycle.act(db, action, read))


@router.delete("/{session_id}", response_model=SessionOut, status_code=202)
@one_statement
async def stop_session(
    session_id: str, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> SessionOut:
    return await _act("stop", session_id, request, user, state, db)


@router.post("/{session_id}/hibernate", response_model=SessionOut, status_code=202)
@one_statement
async def hibernate_session(
    session_id: str, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> SessionOut:
    return await _act("hibernate", session_id, request, user, state, db)


@router.post("/{session_id}/wake", response_model=SessionOut, status_code=202)
@one_statement
async def wake_session(
    session_id: str, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> SessionOut:
    return await _act("wake", session_id, request, user, state, db)


@router.post("/{session_id}/connect", response_model=ConnectOut)
async def connect_session(
    session_id: str, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> ConnectOut:
    session = await load_owned(db, session_id, user)
    if session.state != State.RUNNING:
        raise conflict(
            f"cannot connect to a session that is {session.state}", current_state=session.state
        )
    ticket, expires = await state.streams.issue_ticket(session.id, user.id, user.token_version)
    microphone = await grouppolicy.allowed(db, state.settings, user.id, "microphone")
    audit.record(
        db,
        actor=user,
        action="session.connect",
        resource_type="session",
        resource_id=session.id,
        request=request,
    )
    await db.commit()
    return ConnectOut(
        ticket=ticket,
        ws_path="/api/v1/streams/ws",
        expires_at=expires,
        viewer_url=f"/#/view/{session.id}",
        microphone=microphone,
    )


@router.get(
    "/{session_id}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the session's screen"}},
)
async def session_thumbnail(session_id: str, user: UserDep, state: StateDep, db: DbDep) -> Response:
    """A small JPEG of a running session's screen, for the Sessions list (see
    controlplane.thumbnails); read-only, so not audited, and never cached by the browser or a
    proxy: it is a picture of someone's desktop."""
    session = await load_owned(db, session_id, user)
    if session.state != State.RUNNING or session.agent_id is None:
        raise conflict(
            f"a session that is {session.state} has no thumbnail", current_state=session.state
        )
    agent_id = session.agent_id
    # The capture can take a second: wait for it without holding a connection or a slot.
    await db.close()
    slot = db.info.get(SLOT_KEY)
    if slot is not None:
        slot.release()
    try:
        image = await state.thumbnails.get(session.id, agent_id)
    except ConnectionError as exc:
        raise Problem(
            503,
            "Service unavailable",
            f"no thumbnail now: {exc}",
            kind="thumbnail-unavailable",
            headers={"Retry-After": "5"},
        ) from exc
    return Response(image, media_type="image/jpeg", headers={"Cache-Control": "private, no-store"})
