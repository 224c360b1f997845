"""API keys: each user's own (`/api/v1/auth/api-keys`), and an admin's for service accounts
(`/api/v1/users/{id}/api-keys`). The key itself is shown once, in the creation answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.controlplane import apikeys, audit
from streamspace.controlplane.api.schemas import ApiKeyCreatedOut, ApiKeyIn, ApiKeyOut, Page
from streamspace.controlplane.api.users import find_user
from streamspace.controlplane.deps import AdminDep, DbDep, StateDep, UserDep
from streamspace.controlplane.problems import Problem, bad_request, conflict, not_found
from streamspace.db.models import ApiKey, User

router = APIRouter(tags=["api-keys"])

MAX_KEYS_PER_USER = 50
MAX_LIFETIME = timedelta(days=3650)


def _out(row: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(
        id=row.id,
        name=row.name,
        prefix=apikeys.display_prefix(row.id),
        scopes=list(row.scopes),
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        created_by=row.created_by,
    )


async def _create(
    db: AsyncSession, request: Request, *, owner: User, actor: User, body: ApiKeyIn
) -> ApiKeyCreatedOut:
    if "admin" in body.scopes and owner.role != "admin":
        raise Problem(
            403,
            "Forbidden",
            f"scopes: 'admin' needs an owner with the admin role ({owner.username} is "
            f"{owner.role}); a key never exceeds its owner",
            kind="forbidden",
        )
    now = datetime.now(UTC)
    if body.expires_at is not None:
        if body.expires_at.tzinfo is None:
            raise bad_request("expires_at: give a time zone (e.g. 2027-01-01T00:00:00Z)")
        if body.expires_at <= now:
            raise bad_request("expires_at: must be in the future")
        if body.expires_at > now + MAX_LIFETIME:
            raise bad_request("expires_at: at most 10 years from now")
    held = await db.scalar(select(func.count()).where(ApiKey.user_id == owner.id)) or 0
    if held >= MAX_KEYS_PER_USER:
        raise conflict(
            f"{owner.username} already has {held} API keys (at most {MAX_KEYS_PER_USER}); "
            "delete one first"
        )
    new = apikeys.make_key()
    row = ApiKey(
        id=new.id,
        user_id=owner.id,
        name=body.name,
        secret_hash=new.secret_hash,
        scopes=sorted(set(body.scopes)),
        expires_at=body.expires_at,
        created_by=actor.id,
        created_at=now,
    )
    db.add(row)
    audit.record(
        db,
        actor=actor,
        action="api_key.create",
        resource_type="api_key",
        resource_id=row.id,
        request=request,
        owner=owner.id,
        scopes=row.scopes,
    )
    await db.commit()
    return ApiKeyCreatedOut(**_out(row).model_dump(), key=new.token)


async def _page(db: AsyncSession, owner_id: str, limit: int, offset: int) -> Page[ApiKeyOut]:
    where = ApiKey.user_id == owner_id
    total = await db.scalar(select(func.count()).where(where)) or 0
    rows = (
        await db.scalars(
            select(ApiKey)
            .where(where)
            .order_by(ApiKey.created_at, ApiKey.id)
            .limit(limit)
            .offset(offset)
        )
    ).all()
    return Page[ApiKeyOut](
        items=[_out(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )


@router.post("/api/v1/auth/api-keys", response_model=ApiKeyCreatedOut, status_code=201)
async def create_key(
    body: ApiKeyIn, request: Request, user: UserDep, db: DbDep
) -> ApiKeyCreatedOut:
    return await _create(db, request, owner=user, actor=user, body=body)


@router.get("/api/v1/auth/api-keys", response_model=Page[ApiKeyOut])
async def list_keys(
    user: UserDep,
    db: DbDep,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[ApiKeyOut]:
    return await _page(db, user.id, limit, offset)


@router.delete("/api/v1/auth/api-keys/{key_id}", status_code=204)
async def delete_key(
    key_id: str, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> Response:
    """Revokes the key at once on this replica, and on the others within the auth cache's
    lifetime. Admins may delete anyone's key; others see only their own."""
    row = await db.get(ApiKey, key_id)
    if row is None or (row.user_id != user.id and user.role != "admin"):
        raise not_found("API key", key_id)
    await db.delete(row)
    audit.record(
        db,
        actor=user,
        action="api_key.delete",
        resource_type="api_key",
        resource_id=key_id,
        request=request,
        owner=row.user_id,
    )
    await db.commit()
    state.api_keys.forget(key_id)
    return Response(status_code=204)


@router.post("/api/v1/users/{user_id}/api-keys", response_model=ApiKeyCreatedOut, status_code=201)
async def create_service_key(
    user_id: str, body: ApiKeyIn, request: Request, admin: AdminDep, db: DbDep
) -> ApiKeyCreatedOut:
    """Only for service accounts: a person's keys are made by that person."""
    owner = await find_user(db, user_id)
    if not owner.service_account:
        raise conflict(
            f"{owner.username} is not a service account; people create their own keys "
            "(POST /api/v1/auth/api-keys)"
        )
    return await _create(db, request, owner=owner, actor=admin, body=body)


@router.get("/api/v1/users/{user_id}/api-keys", response_model=Page[ApiKeyOut])
async def list_user_keys(
    user_id: str,
    _: AdminDep,
    db: DbDep,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[ApiKeyOut]:
    owner = await find_user(db, user_id)
    return await _page(db, owner.id, limit, offset)
