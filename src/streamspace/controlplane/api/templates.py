"""Template catalog: everyone reads enabled templates; admins create, replace and delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sqlalchemy import select

from streamspace.controlplane import audit
from streamspace.controlplane.catalog import TemplateSpec, apply_spec
from streamspace.controlplane.deps import AdminDep, DbDep, UserDep
from streamspace.controlplane.problems import bad_request, conflict, not_found
from streamspace.db.models import Template

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


def _out(row: Template) -> TemplateOut:
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
    )


async def _get(db: DbDep, name: str) -> Template:
    row = await db.scalar(select(Template).where(Template.name == name))
    if row is None:
        raise not_found("template", name)
    return row


@router.get("", response_model=list[TemplateOut])
async def list_templates(
    user: UserDep, db: DbDep, category: str | None = None, tag: str | None = None
) -> list[TemplateOut]:
    rows = (await db.scalars(select(Template).order_by(Template.category, Template.name))).all()
    out = []
    for row in rows:
        if not row.enabled and user.role != "admin":
            continue
        if category and row.category != category:
            continue
        if tag and tag not in row.tags:
            continue
        out.append(_out(row))
    return out


@router.get("/{name}", response_model=TemplateOut)
async def get_template(name: str, user: UserDep, db: DbDep) -> TemplateOut:
    row = await _get(db, name)
    if not row.enabled and user.role != "admin":
        raise not_found("template", name)
    return _out(row)


@router.post("", response_model=TemplateOut, status_code=201)
async def create_template(
    spec: TemplateSpec, request: Request, admin: AdminDep, db: DbDep
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
    return _out(row)


@router.put("/{name}", response_model=TemplateOut)
async def replace_template(
    name: str, spec: TemplateSpec, request: Request, admin: AdminDep, db: DbDep
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
    return _out(row)


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
