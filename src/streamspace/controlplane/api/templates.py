"""Template catalog: everyone reads the enabled templates they may launch; admins create,
replace and delete, and see every template with the groups it is limited to
(`allowed_groups`, controlplane.entitlements).

Each template says whether an agent can run it now (`available`, `unavailable_reason`), for the
cluster the caller names or any. Users do not see the unavailable ones unless
`catalog_hide_unavailable` is off; admins always do, with the reason.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from streamspace.controlplane import audit
from streamspace.controlplane.availability import availability
from streamspace.controlplane.catalog import TemplateSpec, apply_spec, spec_of
from streamspace.controlplane.deps import AdminDep, DbDep, StateDep, UserDep
from streamspace.controlplane.entitlements import entitled, group_names
from streamspace.controlplane.problems import bad_request, conflict, not_found
from streamspace.controlplane.scheduler import Availability
from streamspace.db.models import Template, User

router = APIRouter(prefix="/api/v1/templates", tags=["templates"])


class TemplateOut(BaseModel):
    name: str
    display_name: str
    category: str
    description: str
    icon: str
    tags: list[str]
    enabled: bool
    source: str
    spec: dict[str, Any]
    allowed_groups: list[str] = Field(
        description="who may launch it: members of these groups (and admins); empty: everyone"
    )
    available: bool = Field(
        description="an agent that takes sessions (online, or reconnecting) reported it can run "
        "it; a session may still queue while such agents are full"
    )
    unavailable_reason: str | None = Field(
        description="why no agent can run it now, e.g. no agent has `gimp` installed"
    )


ClusterQuery = Query(
    None, max_length=64, description="availability in this cluster; default: in any cluster"
)


def _out(row: Template, can: Availability) -> TemplateOut:
    return TemplateOut(
        name=row.name,
        display_name=row.display_name,
        category=row.category,
        description=row.description,
        icon=row.icon,
        tags=list(row.tags),
        enabled=row.enabled,
        source=row.source,
        spec=row.spec,
        allowed_groups=list(row.spec.get("allowed_groups") or []),
        available=can.available,
        unavailable_reason=can.reason,
    )


async def _availability(
    db: DbDep, state: StateDep, rows: list[Template], cluster_id: str | None = None
) -> dict[str, Availability]:
    return await availability(db, state.settings, [spec_of(r) for r in rows], cluster_id)


def _hidden(
    row: Template, can: Availability, user: User, groups: set[str], state: StateDep
) -> bool:
    if user.role == "admin":
        return False
    if not row.enabled or not entitled(spec_of(row), user, groups):
        return True
    return not can.available and state.settings.catalog_hide_unavailable


async def _get(db: DbDep, name: str) -> Template:
    row = await db.scalar(select(Template).where(Template.name == name))
    if row is None:
        raise not_found("template", name)
    return row


@router.get("", response_model=list[TemplateOut])
async def list_templates(
    user: UserDep,
    state: StateDep,
    db: DbDep,
    category: str | None = None,
    tag: str | None = None,
    cluster_id: str | None = ClusterQuery,
) -> list[TemplateOut]:
    rows = [
        row
        for row in (await db.scalars(select(Template).order_by(Template.category, Template.name)))
        if (not category or row.category == category) and (not tag or tag in row.tags)
    ]
    can = await _availability(db, state, rows, cluster_id)
    groups = await group_names(db, user.id)
    return [
        _out(row, can[row.name])
        for row in rows
        if not _hidden(row, can[row.name], user, groups, state)
    ]


@router.get("/{name}", response_model=TemplateOut)
async def get_template(
    name: str, user: UserDep, state: StateDep, db: DbDep, cluster_id: str | None = ClusterQuery
) -> TemplateOut:
    row = await _get(db, name)
    can = (await _availability(db, state, [row], cluster_id))[row.name]
    if _hidden(row, can, user, await group_names(db, user.id), state):
        raise not_found("template", name)
    return _out(row, can)


@router.post("", response_model=TemplateOut, status_code=201)
async def create_template(
    spec: TemplateSpec, request: Request, admin: AdminDep, state: StateDep, db: DbDep
) -> TemplateOut:
    if await db.scalar(select(Template.id).where(Template.name == spec.name)):
        raise conflict(f"template {spec.name!r} exists; use PUT to replace it")
    row = Template()
    apply_spec(row, spec, "api")
    db.add(row)
    audit.record(
        db,
        actor=admin,
        action="template.create",
        resource_type="template",
        resource_id=spec.name,
        request=request,
    )
    await db.commit()
    return _out(row, (await _availability(db, state, [row]))[row.name])


@router.put("/{name}", response_model=TemplateOut)
async def replace_template(
    name: str, spec: TemplateSpec, request: Request, admin: AdminDep, state: StateDep, db: DbDep
) -> TemplateOut:
    if spec.name != name:
        raise bad_request(f"name in the body ({spec.name!r}) differs from the URL ({name!r})")
    row = await db.scalar(select(Template).where(Template.name == name))
    created = row is None
    if row is None:
        row = Template()
        db.add(row)
    apply_spec(row, spec, "api")
    audit.record(
        db,
        actor=admin,
        action="template.create" if created else "template.update",
        resource_type="template",
        resource_id=name,
        request=request,
    )
    await db.commit()
    return _out(row, (await _availability(db, state, [row]))[row.name])


@router.delete("/{name}", status_code=204)
async def delete_template(name: str, request: Request, admin: AdminDep, db: DbDep) -> Response:
    row = await _get(db, name)
    await db.delete(row)
    audit.record(
        db,
        actor=admin,
        action="template.delete",
        resource_type="template",
        resource_id=name,
        request=request,
    )
    await db.commit()
    return Response(status_code=204)
