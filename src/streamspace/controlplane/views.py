"""What a session and an agent look like from outside: the API's answers and the UI's live
events are built from the same views, below both the API and the lifecycle."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from streamspace.controlplane.statemachine import allowed_actions
from streamspace.db.models import Agent, SessionEvent
from streamspace.db.models import Session as SessionRow


class SessionEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    at: datetime
    kind: str
    message: str
    data: dict[str, Any]


class SessionOut(BaseModel):
    id: str
    owner_id: str
    owner: str
    template: str
    state: str
    agent_id: str | None
    cluster_id: str | None
    requested_cluster_id: str | None
    tags: list[str]
    resources: dict[str, int]
    persistent_home: bool
    idle_timeout_seconds: int
    max_duration_seconds: int
    failure_reason: str
    allowed_actions: list[str]
    created_at: datetime
    updated_at: datetime
    state_changed_at: datetime
    started_at: datetime | None
    last_activity: datetime
    status_message: str = ""
    events: list[SessionEventOut] | None = None


def session_view(
    row: SessionRow, owner: str, events: list[SessionEvent] | None = None
) -> SessionOut:
    return SessionOut(
        id=row.id,
        owner_id=row.owner_id,
        owner=owner,
        template=row.template_name,
        state=row.state,
        agent_id=row.agent_id,
        cluster_id=row.cluster_id,
        requested_cluster_id=row.requested_cluster_id,
        tags=list(row.tags),
        resources={"cpu_millis": row.cpu_millis, "memory_mb": row.memory_mb},
        persistent_home=row.persistent_home,
        idle_timeout_seconds=row.idle_timeout_seconds,
        max_duration_seconds=row.max_duration_seconds,
        failure_reason=row.failure_reason,
        status_message=row.status_message,
        allowed_actions=allowed_actions(row.state),
        created_at=row.created_at,
        updated_at=row.updated_at,
        state_changed_at=row.state_changed_at,
        started_at=row.started_at,
        last_activity=row.last_activity,
        events=[SessionEventOut.model_validate(e) for e in events] if events is not None else None,
    )


def agent_status(agent: Agent, settings: Any, at: datetime | None = None) -> str:
    """online / stale / offline, derived from last_seen only (plus whether a socket is held)."""
    return status_of(agent.revoked, agent.last_seen, agent.connected_replica, settings, at)


def status_of(
    revoked: bool,
    last_seen: datetime | None,
    connected_replica: str | None,
    settings: Any,
    at: datetime | None = None,
) -> str:
    if revoked:
        return "revoked"
    if last_seen is None:
        return "offline"
    age = ((at or datetime.now(UTC)) - last_seen).total_seconds()
    if connected_replica and age <= settings.agent_stale_after_seconds:
        return "online"
    if age <= settings.agent_offline_after_seconds:
        return "stale"
    return "offline"
