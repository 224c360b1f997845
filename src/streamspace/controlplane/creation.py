"""What a new session is made of: the user's request, filled in from the template, the user and
the settings, and the errors a create can meet besides quotas (quotas.py).

`Lifecycle.create_session` is where these are put together under the writer turn; this module
holds the parts that need no turn, so the defaults can be tested as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.config import Settings
from streamspace.controlplane.catalog import TemplateSpec, spec_of
from streamspace.controlplane.statemachine import State
from streamspace.db.models import Session as SessionRow
from streamspace.db.models import Template, User


class UnknownTemplate(Exception):
    """The template asked for does not exist or is disabled (a 422 over HTTP, problems.py)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"template: {name!r} does not exist")


class TemplateUnavailable(Exception):
    """No agent that takes sessions now can run the template (a 409 over HTTP): queued, the
    session would only wait for the queue timeout. A full agent does not make it unavailable."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"template {name!r} cannot run now: {reason}")


class CreateInFlight(Exception):
    """Another create with the same Idempotency-Key got its insert in first and has not
    committed yet (a 409 over HTTP): the caller may try again and get that session."""

    def __init__(self) -> None:
        super().__init__("a session with this Idempotency-Key is being created")


@dataclass(frozen=True)
class NewSession:
    """A user's request for a session; what it leaves unset comes from `new_session_row`."""

    template: str
    tags: list[str] = field(default_factory=list)
    cluster_id: str | None = None
    cpu_millis: int | None = None
    memory_mb: int | None = None
    persistent_home: bool = True
    idle_timeout_seconds: int | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Created:
    session: SessionRow
    new: bool
    """False: an earlier create with the same Idempotency-Key made `session`."""


async def enabled_template(db: AsyncSession, name: str) -> TemplateSpec:
    row = await db.scalar(select(Template).where(Template.name == name))
    if row is None or not row.enabled:
        raise UnknownTemplate(name)
    return spec_of(row)


async def by_idempotency_key(db: AsyncSession, owner: User, key: str | None) -> SessionRow | None:
    if not key:
        return None
    return await db.scalar(
        select(SessionRow).where(SessionRow.owner_id == owner.id, SessionRow.idempotency_key == key)
    )


def new_session_row(
    request: NewSession, tpl: TemplateSpec, owner: User, settings: Settings
) -> SessionRow:
    """The pending row: resources from the request, else the template; the idle timeout from the
    request, else the owner, else the template, else the settings."""
    return SessionRow(
        owner_id=owner.id,
        template_name=tpl.name,
        state=State.PENDING.value,
        requested_cluster_id=request.cluster_id,
        tags=request.tags,
        cpu_millis=request.cpu_millis or tpl.resources.cpu_millis,
        memory_mb=request.memory_mb or tpl.resources.memory_mb,
        persistent_home=request.persistent_home,
        idle_timeout_seconds=request.idle_timeout_seconds
        or owner.idle_timeout_seconds
        or tpl.idle_timeout_seconds
        or settings.default_idle_timeout_seconds,
        max_duration_seconds=tpl.max_duration_seconds or settings.default_max_duration_seconds,
        idempotency_key=request.idempotency_key,
        status_message="waiting for the scheduler",
    )


def created_message(session: SessionRow) -> str:
    """The first event of a session's history."""
    message = f"requested {session.template_name} ({session.cpu_millis} mCPU, "
    message += f"{session.memory_mb} MiB)"
    if session.requested_cluster_id:
        message += f" in cluster {session.requested_cluster_id}"
    return message
