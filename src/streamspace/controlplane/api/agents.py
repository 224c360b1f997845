"""Agents: one-time join tokens, enrolment, credentials, drain/revoke, and their sockets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request, WebSocket
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace import protocol
from streamspace.config import Settings
from streamspace.controlplane import audit
from streamspace.controlplane.agentauth import authenticate, make_credential
from streamspace.controlplane.api.schemas import AgentOut, CredentialOut, JoinTokenIn, JoinTokenOut
from streamspace.controlplane.browser import origin_allowed
from streamspace.controlplane.catalog import TemplateSpec
from streamspace.controlplane.deps import AdminDep, DbDep, OperatorDep, StateDep
from streamspace.controlplane.problems import Problem, not_found
from streamspace.controlplane.security import random_secret, sha256
from streamspace.controlplane.state import AppState
from streamspace.controlplane.streams import CLOSE_DENIED
from streamspace.controlplane.views import agent_status
from streamspace.db.models import Agent, JoinToken, Template

router = APIRouter(tags=["agents"])


def agent_view(agent: Agent, state: AppState) -> AgentOut:
    return AgentOut(
        id=agent.id,
        name=agent.name,
        cluster_id=agent.cluster_id,
        cluster_name=agent.cluster_name,
        region=agent.region,
        backend=agent.backend,
        status=agent_status(agent, state.settings),
        last_seen=agent.last_seen,
        draining=agent.draining,
        revoked=agent.revoked,
        healthy=agent.healthy,
        health_detail=agent.health_detail,
        capacity={
            "max_sessions": agent.capacity_sessions,
            "cpu_millis": agent.capacity_cpu_millis,
            "memory_mb": agent.capacity_memory_mb,
        },
        load={
            "sessions": agent.load_sessions,
            "cpu_millis": agent.load_cpu_millis,
            "memory_mb": agent.load_memory_mb,
        },
        templates=list(agent.templates),
        version=agent.version,
        isolation=agent.isolation,
        isolation_detail=agent.isolation_detail,
        limits_enforced=agent.limits_enforced,
        created_at=agent.created_at,
    )


async def mint_join_token(
    db: AsyncSession, settings: Settings, created_by: str | None, ttl_seconds: int | None = None
) -> tuple[str, datetime]:
    token = "ssj_" + random_secret(24)
    expires = datetime.now(UTC) + timedelta(seconds=ttl_seconds or settings.join_token_ttl_seconds)
    db.add(JoinToken(token_hash=sha256(token), created_by=created_by, expires_at=expires))
    return token, expires


@router.post("/api/v1/agents/join-tokens", response_model=JoinTokenOut, status_code=201)
async def create_join_token(
    body: JoinTokenIn, request: Request, admin: AdminDep, state: StateDep, db: DbDep
) -> JoinTokenOut:
    token, expires = await mint_join_token(db, state.settings, admin.id, body.ttl_seconds)
    audit.record(
        db,
        actor=admin,
        action="agent.join_token",
        resource_type="agent",
        request=request,
        status_code=201,
        expires_at=expires.isoformat(),
    )
    await db.commit()
    base = str(request.base_url).rstrip("/")
    return JoinTokenOut(
        token=token,
        expires_at=expires,
        command=(  # the token in the environment: on the command line `ps` shows it to all
            f"STREAMSPACE_JOIN_TOKEN={token} streamspace agent --server {base} "
            "--cluster-id CLUSTER --cluster-name 'Cluster name' --backend local"
        ),
    )


@router.post(protocol.AGENT_ENROLL_PATH, response_model=protocol.EnrollResponse, status_code=201)
async def enroll(
    body: protocol.EnrollRequest, request: Request, state: StateDep, db: DbDep
) -> protocol.EnrollResponse:
    """Exchange a one-time join token for this agent's own credential (shown only here)."""
    now = datetime.now(UTC)
    row = await db.scalar(select(JoinToken).where(JoinToken.token_hash == sha256(body.join_token)))
    if row is None:
        raise Problem(401, "Unauthorized", "join token is not valid", kind="invalid-join-token")
    if row.used_at is not None:
        raise Problem(
            401,
            "Unauthorized",
            "join token was already used; mint a new one",
            kind="invalid-join-token",
        )
    if row.expires_at <= now:
        raise Problem(
            401, "Unauthorized", "join token expired; mint a new one", kind="invalid-join-token"
        )
    claimed = await db.execute(
        update(JoinToken)
        .where(JoinToken.id == row.id, JoinToken.used_at.is_(None))
        .values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise Problem(401, "Unauthorized", "join token was already used", kind="invalid-join-token")
    secret = random_secret(32)
    agent = Agent(
        name=body.name,
        cluster_id=body.cluster_id,
        cluster_name=body.cluster_name,
        region=body.region,
        backend=body.backend,
        credential_hash=sha256(secret),
    )
    db.add(agent)
    await db.flush()
    row.agent_id = agent.id
    audit.record(
        db,
        actor=None,
        action="agent.enroll",
        resource_type="agent",
        resource_id=agent.id,
        request=request,
        status_code=201,
        cluster_id=body.cluster_id,
        name=body.name,
    )
    await db.commit()
    return protocol.EnrollResponse(agent_id=agent.id, credential=make_credential(agent.id, secret))


@router.get(protocol.AGENT_CATALOG_PATH, response_model=protocol.Catalog)
async def agent_catalog(request: Request, state: StateDep, db: DbDep) -> protocol.Catalog:
    agent = await authenticate(state.db, request.headers.get("authorization", ""))
    if agent is None:
        raise Problem(401, "Unauthorized", "agent credential rejected", kind="unauthorized")
    rows = (await db.scalars(select(Template).where(Template.enabled.is_(True)))).all()
    return protocol.Catalog(
        templates=[TemplateSpec.model_validate(r.spec).catalog_entry() for r in rows]
    )


@router.get("/api/v1/agents", response_model=list[AgentOut])
async def list_agents(
    _: OperatorDep,
    state: StateDep,
    db: DbDep,
    cluster_id: str | None = None,
    include_revoked: bool = False,
) -> list[AgentOut]:
    stmt = select(Agent).order_by(Agent.cluster_id, Agent.name)
    if cluster_id:
        stmt = stmt.where(Agent.cluster_id == cluster_id)
    if not include_revoked:
        stmt = stmt.where(Agent.revoked.is_(False))
    return [agent_view(a, state) for a in (await db.scalars(stmt)).all()]


async def _agent(db: DbDep, agent_id: str) -> Agent:
    agent = await db.get(Agent, agent_id) if len(agent_id) <= 64 else None
    if agent is None:
        raise not_found("agent", agent_id)
    return agent


@router.get("/api/v1/agents/{agent_id}", response_model=AgentOut)
async def get_agent(agent_id: str, _: OperatorDep, state: StateDep, db: DbDep) -> AgentOut:
    return agent_view(await _agent(db, agent_id), state)


@router.post("/api/v1/agents/{agent_id}/drain", response_model=AgentOut)
async def drain_agent(
    agent_id: str, request: Request, user: OperatorDep, state: StateDep, db: DbDep
) -> AgentOut:
    """No new sessions are placed on a draining agent; running ones keep running."""
    agent = await _agent(db, agent_id)
    agent.draining = True
    audit.record(
        db,
        actor=user,
        action="agent.drain",
        resource_type="agent",
        resource_id=agent.id,
        request=request,
    )
    await db.commit()
    return agent_view(agent, state)


@router.post("/api/v1/agents/{agent_id}/undrain", response_model=AgentOut)
async def undrain_agent(
    agent_id: str, request: Request, user: OperatorDep, state: StateDep, db: DbDep
) -> AgentOut:
    agent = await _agent(db, agent_id)
    agent.draining = False
    audit.record(
        db,
        actor=user,
        action="agent.undrain",
        resource_type="agent",
        resource_id=agent.id,
        request=request,
    )
    await db.commit()
    state.lifecycle.wake_placer()
    return agent_view(agent, state)


async def revoke(state: AppState, db: AsyncSession, agent: Agent, reason: str) -> None:
    """The agent's credential stops working for good, its socket is closed and its sessions
    fail with `reason` (they can no longer be reached). Commits."""
    agent.revoked = True
    agent.credential_hash = sha256(random_secret(32))
    await db.commit()
    await state.hub.disconnect(agent.id, "revoked", "this agent's credential was revoked")
    await state.lifecycle.fail_agent_sessions(db, agent.id, reason)


@router.post("/api/v1/agents/{agent_id}/revoke", response_model=AgentOut)
async def revoke_agent(
    agent_id: str, request: Request, admin: AdminDep, state: StateDep, db: DbDep
) -> AgentOut:
    """For `streamspace up`'s own agent the process enrols it again under a new identity (its
    sessions fail like those of any revoked agent), so the product keeps working."""
    agent = await _agent(db, agent_id)
    audit.record(
        db,
        actor=admin,
        action="agent.revoke",
        resource_type="agent",
        resource_id=agent.id,
        request=request,
    )
    await revoke(
        state, db, agent, f"agent {agent.name} was revoked; its sessions can no longer be reached"
    )
    return agent_view(agent, state)


@router.post("/api/v1/agents/{agent_id}/rotate-credential", response_model=CredentialOut)
async def rotate_credential(
    agent_id: str, request: Request, admin: AdminDep, state: StateDep, db: DbDep
) -> CredentialOut:
    """A new credential, shown once; the old one stops working (the agent is disconnected).
    `streamspace up`'s own agent is handed the new one in-process and reconnects with it, its
    sessions untouched."""
    agent = await _agent(db, agent_id)
    if agent.revoked:
        raise Problem(409, "Conflict", "agent is revoked; enrol a new one", kind="conflict")
    secret = random_secret(32)
    agent.credential_hash = sha256(secret)
    audit.record(
        db,
        actor=admin,
        action="agent.rotate_credential",
        resource_type="agent",
        resource_id=agent.id,
        request=request,
    )
    await db.commit()
    credential = make_credential(agent.id, secret)
    embedded = state.local_agent.serving(agent.id)
    if embedded is not None:
        await embedded.adopt_credential(credential)
    await state.hub.disconnect(
        agent.id, "credential_rotated", "credential rotated; restart the agent with the new one"
    )
    return CredentialOut(agent_id=agent.id, credential=credential)


@router.websocket(protocol.AGENT_CONNECT_PATH)
async def agent_socket(ws: WebSocket) -> None:
    await ws.app.state.ss.agents.serve(ws)


@router.websocket(protocol.AGENT_STREAM_PATH_PREFIX + "{stream_id}")
async def agent_stream_socket(ws: WebSocket, stream_id: str) -> None:
    await ws.app.state.ss.streams.serve_agent(ws, stream_id)


@router.websocket("/api/v1/streams/ws")
async def browser_stream_socket(ws: WebSocket) -> None:
    await _browser_stream(ws, "vnc")


@router.websocket("/api/v1/streams/audio")
async def browser_audio_socket(ws: WebSocket) -> None:
    """The session's sound: one framed Opus packet per message (docs/streaming.md#sound)."""
    await _browser_stream(ws, "audio")


@router.websocket("/api/v1/streams/microphone")
async def browser_microphone_socket(ws: WebSocket) -> None:
    """The browser's microphone into the session, framed like the sound, when the user's
    groups allow it (docs/streaming.md#microphone)."""
    await _browser_stream(ws, "microphone")


async def _browser_stream(ws: WebSocket, purpose: protocol.ViewerPurpose) -> None:
    state: AppState = ws.app.state.ss
    if not origin_allowed(ws, state.settings):
        # Before the ticket is looked at: a page on another site learns nothing and burns
        # nothing (cross-site WebSocket hijacking).
        await ws.close(code=CLOSE_DENIED, reason="cross-origin viewer refused")
        return
    await state.streams.serve_browser(ws, purpose)
