"""Which templates an agent can run now, read from the agents' rows.

Availability comes from the database, not from the sockets this replica holds: with several
replicas an agent's socket may be on another one, and its row (templates it reported, last
seen, draining, healthy) is the one truth every replica shares. The decision itself is the
scheduler's (`Placer.availability`), over the same snapshots a placement round reads.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.config import Settings
from streamspace.controlplane import scheduler
from streamspace.controlplane.catalog import TemplateSpec
from streamspace.controlplane.statemachine import ON_AGENT_STATES, State
from streamspace.controlplane.views import status_of
from streamspace.db.models import Agent
from streamspace.db.models import Session as SessionRow
from streamspace.db.types import utcnow


async def agent_snapshots(
    db: AsyncSession, settings: Settings, *, usage: bool = True
) -> list[scheduler.AgentSnapshot]:
    """Every enrolled agent as the scheduler sees it; `usage` adds what its sessions hold.

    Plain column rows, not ORM objects: this runs for every placement round and loading a
    fleet of agents as tracked instances cost tens of ms of event-loop time each time."""
    at = utcnow()
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
    used = await _usage(db) if usage else {}
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
        holds = used.get(agent_id, (0, 0, 0))
        status = status_of(False, last_seen, connected_replica, settings, at)
        snaps.append(
            scheduler.AgentSnapshot(
                id=agent_id,
                name=name,
                cluster_id=cluster_id,
                backend=backend,
                online=status == "online",
                stale=status == "stale",
                draining=draining,
                healthy=healthy,
                templates=frozenset(templates),
                max_sessions=max_sessions,
                cpu_millis=cpu_millis,
                memory_mb=memory_mb,
                used_sessions=holds[0],
                used_cpu_millis=holds[1],
                used_memory_mb=holds[2],
            )
        )
    return snaps


async def _usage(db: AsyncSession) -> dict[str, tuple[int, int, int]]:
    rows = await db.execute(
        select(
            SessionRow.agent_id,
            func.count(SessionRow.id),
            func.coalesce(func.sum(SessionRow.cpu_millis), 0),
            func.coalesce(func.sum(SessionRow.memory_mb), 0),
        )
        .where(
            SessionRow.agent_id.is_not(None),
            SessionRow.state.in_(
                [s.value for s in ON_AGENT_STATES if s != State.HIBERNATED] + [State.STOPPING.value]
            ),
        )
        .group_by(SessionRow.agent_id)
    )
    return {str(row[0]): (int(row[1]), int(row[2]), int(row[3])) for row in rows}


def needs_of(spec: TemplateSpec) -> scheduler.TemplateNeeds:
    entry = spec.catalog_entry()
    return scheduler.TemplateNeeds(
        name=spec.name,
        local_command=entry.local.command[0] if entry.local else None,
        image=entry.image.image if entry.image else None,
    )


async def availability(
    db: AsyncSession,
    settings: Settings,
    specs: Iterable[TemplateSpec],
    cluster_id: str | None = None,
) -> dict[str, scheduler.Availability]:
    """Each template's availability now (in `cluster_id`, if given), from one agents query.
    Capacity is not read: a full agent still makes a template available (it queues)."""
    placer = scheduler.Placer(await agent_snapshots(db, settings, usage=False))
    return {spec.name: placer.availability(needs_of(spec), cluster_id) for spec in specs}
