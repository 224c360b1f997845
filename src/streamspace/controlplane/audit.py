"""Audit trail: every mutating call adds a row in the same transaction as its change. A
request made with an API key names the key (`detail.api_key`)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.db.models import AuditLog, User


def record(
    db: AsyncSession,
    *,
    actor: User | None,
    action: str,
    resource_type: str,
    resource_id: str = "",
    request: Request | None = None,
    status_code: int = 200,
    **detail: Any,
) -> None:
    key = getattr(request.state, "api_key", None) if request is not None else None
    if key is not None:
        detail = {**detail, "api_key": key}
    db.add(
        AuditLog(
            actor_id=actor.id if actor else None,
            actor=actor.username if actor else "",
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            detail=detail,
            ip=(request.client.host if request is not None and request.client else ""),
            status_code=status_code,
        )
    )
