"""Read the audit log (admins)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from streamspace.controlplane.api.schemas import AuditOut, Page
from streamspace.controlplane.deps import AdminDep, DbDep
from streamspace.db.models import AuditLog

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=Page[AuditOut])
async def list_audit(
    _: AdminDep,
    db: DbDep,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
    action: str | None = Query(None, max_length=64),
    actor: str | None = Query(None, max_length=128),
    resource_type: str | None = Query(None, max_length=32),
) -> Page[AuditOut]:
    stmt = select(AuditLog)
    if action:
        stmt = stmt.where(AuditLog.action == action)
    if actor:
        stmt = stmt.where(AuditLog.actor == actor)
    if resource_type:
        stmt = stmt.where(AuditLog.resource_type == resource_type)
    total = await db.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = (await db.scalars(stmt.order_by(AuditLog.id.desc()).limit(limit).offset(offset))).all()
    return Page[AuditOut](
        items=[AuditOut.model_validate(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )
