"""Users, groups and quotas: admin-only management, plus each user's own quota view."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from streamspace.controlplane import audit
from streamspace.controlplane.api.schemas import (
    GroupIn,
    GroupOut,
    GroupPatchIn,
    Page,
    QuotaIn,
    QuotaOut,
    QuotaUsageOut,
    UserCreateIn,
    UserOut,
    UserPatchIn,
)
from streamspace.controlplane.deps import AdminDep, DbDep, StateDep, UserDep, writer_turn
from streamspace.controlplane.passwords import require_strong
from streamspace.controlplane.problems import bad_request, conflict, not_found
from streamspace.controlplane.provisioning import uses_outside_password
from streamspace.controlplane.quotas import usage, user_limits
from streamspace.controlplane.revocation import end_sign_ins
from streamspace.controlplane.security import NO_PASSWORD, hash_password
from streamspace.db.models import Group, GroupMembership, Quota, User

router = APIRouter(prefix="/api/v1", tags=["users"])

POLICY_SWITCHES = (
    "allow_upload",
    "allow_download",
    "clipboard_in",
    "clipboard_out",
    "allow_microphone",
)


async def find_user(db: DbDep, user_id: str) -> User:
    user = await db.get(User, user_id)
    if user is None:
        user = await db.scalar(select(User).where(func.lower(User.username) == user_id.lower()))
    if user is None:
        raise not_found("user", user_id)
    return user


@router.get("/users", response_model=Page[UserOut])
async def list_users(
    _: AdminDep,
    db: DbDep,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
    q: str | None = Query(None, max_length=64, description="username contains"),
) -> Page[UserOut]:
    stmt = select(User)
    if q:
        stmt = stmt.where(User.username.contains(q))
    total = await db.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = (await db.scalars(stmt.order_by(User.username).limit(limit).offset(offset))).all()
    nxt = offset + limit if offset + limit < total else None
    return Page[UserOut](
        items=[UserOut.model_validate(u) for u in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=nxt,
    )


@router.post("/users", response_model=UserOut, status_code=201)
async def create_user(body: UserCreateIn, request: Request, admin: AdminDep, db: DbDep) -> User:
    taken = await db.scalar(
        select(User.username).where(func.lower(User.username) == body.username.lower())
    )
    if taken is not None:
        by = "" if taken == body.username else f" by {taken!r} (case does not count)"
        raise conflict(f"username {body.username!r} is taken{by}")
    if body.password is None:
        password_hash = NO_PASSWORD
    else:
        await require_strong(body.password, (body.username, body.display_name, body.email))
        password_hash = await asyncio.to_thread(hash_password, body.password)
    user = User(
        username=body.username,
        password_hash=password_hash,
        display_name=body.display_name,
        email=body.email,
        role=body.role,
        service_account=body.service_account,
    )
    db.add(user)
    try:
        await db.flush()
    except IntegrityError as exc:
        await db.rollback()
        raise conflict(f"username {body.username!r} is taken") from exc
    audit.record(
        db,
        actor=admin,
        action="user.create",
        resource_type="user",
        resource_id=user.id,
        request=request,
        username=user.username,
        role=user.role,
    )
    await db.commit()
    return user


@router.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: str, _: AdminDep, db: DbDep) -> User:
    return await find_user(db, user_id)


@router.patch("/users/{user_id}", response_model=UserOut)
async def patch_user(
    user_id: str, body: UserPatchIn, request: Request, admin: AdminDep, state: StateDep, db: DbDep
) -> User:
    """Disabling a user signs them out everywhere and hibernates their sessions; a new
    password signs them out everywhere; a role change ends their access tokens (a refresh gets
    one with the new role) and closes their open viewer and event streams."""
    async with writer_turn(state, db):
        user = await find_user(db, user_id)
        changes = body.model_dump(exclude_unset=True)
        if user.id == admin.id and (
            changes.get("role", "admin") != "admin" or changes.get("is_active") is False
        ):
            raise bad_request("you cannot demote or disable yourself")
        revoked = ""
        disabling = changes.get("is_active") is False and user.is_active
        if "password" in changes and user.service_account:
            raise bad_request("password: a service account has none (it uses API keys)")
        if "password" in changes and uses_outside_password(user.auth_source):
            where = "the directory's" if user.auth_source == "ldap" else "an identity provider's"
            raise bad_request(f"password: this user logs in with {where} password")
        if "password" in changes:
            password = changes.pop("password")
            await require_strong(
                password,
                (
                    user.username,
                    changes.get("display_name") or user.display_name,
                    changes.get("email") or user.email,
                ),
            )
            user.password_hash = await asyncio.to_thread(hash_password, password)
            await end_sign_ins(db, user)
            revoked = f"signed out: the password was reset by {admin.username}"
        if disabling:
            if not revoked:
                await end_sign_ins(db, user)
            revoked = f"signed out: the account was disabled by {admin.username}"
        elif "role" in changes and changes["role"] != user.role:
            user.token_version += 1
            revoked = revoked or f"signed out: the role changed to {changes['role']}"
        for key, value in changes.items():
            setattr(user, key, value)
        audit.record(
            db,
            actor=admin,
            action="user.update",
            resource_type="user",
            resource_id=user.id,
            request=request,
            fields=sorted(body.model_dump(exclude_unset=True)),
        )
        # The sign-out is committed and announced before any session goes down: a session
        # stopped first would close the user's viewers as an ordinary end of session, before
        # they could be told why.
        await db.commit()
        if revoked:
            state.revocations.revoke(user.id, revoked)
        if disabling:
            why = f"the owner's account was disabled by {admin.username}"
            await state.lifecycle.end_owner_sessions(db, user.id, why, hibernate=True)
    return user


@router.delete("/users/{user_id}", status_code=204)
async def delete_user(
    user_id: str, request: Request, admin: AdminDep, state: StateDep, db: DbDep
) -> Response:
    """Stops the user's sessions (each gets an event saying why), deletes the user with
    everything they own, and closes their open viewer and event streams."""
    async with writer_turn(state, db):
        user = await find_user(db, user_id)
        if user.id == admin.id:
            raise bad_request("you cannot delete yourself")
        why = f"the owner's account was deleted by {admin.username}"
        # Signed out everywhere first (committed, then announced), then the sessions stopped and
        # the user deleted: see patch_user for why the order matters.
        await end_sign_ins(db, user)
        await db.commit()
        state.revocations.revoke(user.id, "signed out: the account was deleted")
        stopped = await state.lifecycle.end_owner_sessions(db, user.id, why, hibernate=False)
        # The sessions' rows go with the user (ON DELETE CASCADE) and their stop commands with
        # them; the agent has those already, or stops the sessions as unknown when it next
        # reconnects. Their stop events were published and logged; the audit entry lists them.
        await db.delete(user)
        audit.record(
            db,
            actor=admin,
            action="user.delete",
            resource_type="user",
            resource_id=user.id,
            request=request,
            username=user.username,
            sessions_stopped=[s.id for s in stopped],
        )
        await db.commit()
    state.revocations.revoke(user.id, "signed out: the account was deleted")
    return Response(status_code=204)


@router.post("/users/{user_id}/sign-out", status_code=204)
async def sign_out_user(
    user_id: str, request: Request, admin: AdminDep, state: StateDep, db: DbDep
) -> Response:
    """Sign the user out everywhere: every access and refresh token they hold stops working,
    and their open viewer and event streams close, on every replica."""
    user = await find_user(db, user_id)
    await end_sign_ins(db, user)
    audit.record(
        db,
        actor=admin,
        action="user.sign_out",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    await db.commit()
    state.revocations.revoke(user.id, f"signed out everywhere by {admin.username}")
    return Response(status_code=204)


async def _set_quota(
    db: DbDep, *, user_id: str | None, group_id: str | None, body: QuotaIn
) -> Quota:
    cond = Quota.user_id == user_id if user_id else Quota.group_id == group_id
    quota = await db.scalar(select(Quota).where(cond))
    if quota is None:
        quota = Quota(user_id=user_id, group_id=group_id, **body.model_dump())
        db.add(quota)
    else:
        for key, value in body.model_dump().items():
            setattr(quota, key, value)
    return quota


@router.put("/users/{user_id}/quota", response_model=QuotaOut)
async def put_user_quota(
    user_id: str, body: QuotaIn, request: Request, admin: AdminDep, db: DbDep
) -> Quota:
    user = await find_user(db, user_id)
    quota = await _set_quota(db, user_id=user.id, group_id=None, body=body)
    audit.record(
        db,
        actor=admin,
        action="quota.set",
        resource_type="user",
        resource_id=user.id,
        request=request,
        **body.model_dump(),
    )
    await db.commit()
    return quota


@router.delete("/users/{user_id}/quota", status_code=204)
async def delete_user_quota(user_id: str, request: Request, admin: AdminDep, db: DbDep) -> Response:
    user = await find_user(db, user_id)
    await db.execute(delete(Quota).where(Quota.user_id == user.id))
    audit.record(
        db,
        actor=admin,
        action="quota.delete",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    await db.commit()
    return Response(status_code=204)


@router.get("/users/{user_id}/quota", response_model=QuotaUsageOut)
async def get_user_quota(user_id: str, _: AdminDep, state: StateDep, db: DbDep) -> QuotaUsageOut:
    return await _quota_usage(db, await find_user(db, user_id), state)


@router.get("/me/quota", response_model=QuotaUsageOut)
async def my_quota(user: UserDep, state: StateDep, db: DbDep) -> QuotaUsageOut:
    return await _quota_usage(db, user, state)


async def _quota_usage(db: DbDep, user: User, state: StateDep) -> QuotaUsageOut:
    limits = await user_limits(db, user, state.settings)
    used = await usage(db, user_id=user.id)
    return QuotaUsageOut(
        limits=QuotaOut(
            max_sessions=limits.max_sessions,
            max_cpu_millis=limits.max_cpu_millis,
            max_memory_mb=limits.max_memory_mb,
            max_home_mb=limits.max_home_mb,
        ),
        source=limits.source,
        used_sessions=used.sessions,
        used_cpu_millis=used.cpu_millis,
        used_memory_mb=used.memory_mb,
    )


async def _group(db: DbDep, group_id: str) -> Group:
    group = await db.get(Group, group_id)
    if group is None:
        group = await db.scalar(select(Group).where(Group.name == group_id))
    if group is None:
        raise not_found("group", group_id)
    return group


async def _group_out(db: DbDep, group: Group) -> GroupOut:
    members = (
        await db.scalars(
            select(User.username)
            .join(GroupMembership, GroupMembership.user_id == User.id)
            .where(GroupMembership.group_id == group.id)
            .order_by(User.username)
        )
    ).all()
    quota = await db.scalar(select(Quota).where(Quota.group_id == group.id))
    return GroupOut(
        id=group.id,
        name=group.name,
        description=group.description,
        source=group.source,
        members=list(members),
        quota=QuotaOut.model_validate(quota) if quota else None,
        allow_upload=group.allow_upload,
        allow_download=group.allow_download,
        clipboard_in=group.clipboard_in,
        clipboard_out=group.clipboard_out,
        allow_microphone=group.allow_microphone,
    )


@router.get("/groups", response_model=list[GroupOut])
async def list_groups(_: AdminDep, db: DbDep) -> list[GroupOut]:
    groups = (await db.scalars(select(Group).order_by(Group.name))).all()
    return [await _group_out(db, g) for g in groups]


@router.post("/groups", response_model=GroupOut, status_code=201)
async def create_group(body: GroupIn, request: Request, admin: AdminDep, db: DbDep) -> GroupOut:
    if await db.scalar(select(Group.id).where(Group.name == body.name)):
        raise conflict(f"group {body.name!r} exists")
    group = Group(
        name=body.name,
        description=body.description,
        allow_upload=body.allow_upload,
        allow_download=body.allow_download,
        clipboard_in=body.clipboard_in,
        clipboard_out=body.clipboard_out,
        allow_microphone=body.allow_microphone,
    )
    db.add(group)
    await db.flush()
    audit.record(
        db,
        actor=admin,
        action="group.create",
        resource_type="group",
        resource_id=group.id,
        request=request,
        name=group.name,
    )
    await db.commit()
    return await _group_out(db, group)


@router.get("/groups/{group_id}", response_model=GroupOut)
async def get_group(group_id: str, _: AdminDep, db: DbDep) -> GroupOut:
    return await _group_out(db, await _group(db, group_id))


@router.patch("/groups/{group_id}", response_model=GroupOut)
async def patch_group(
    group_id: str, body: GroupPatchIn, request: Request, admin: AdminDep, db: DbDep
) -> GroupOut:
    group = await _group(db, group_id)
    if body.description is not None:
        group.description = body.description
    policy = {k: getattr(body, k) for k in POLICY_SWITCHES}
    policy = {k: v for k, v in policy.items() if k in body.model_fields_set}
    for key, value in policy.items():
        setattr(group, key, value)
    audit.record(
        db,
        actor=admin,
        action="group.update",
        resource_type="group",
        resource_id=group.id,
        request=request,
        **policy,
    )
    await db.commit()
    return await _group_out(db, group)


@router.delete("/groups/{group_id}", status_code=204)
async def delete_group(group_id: str, request: Request, admin: AdminDep, db: DbDep) -> Response:
    group = await _group(db, group_id)
    await db.delete(group)
    audit.record(
        db,
        actor=admin,
        action="group.delete",
        resource_type="group",
        resource_id=group.id,
        request=request,
        name=group.name,
    )
    await db.commit()
    return Response(status_code=204)


@router.put("/groups/{group_id}/members/{user_id}", response_model=GroupOut)
async def add_member(
    group_id: str, user_id: str, request: Request, admin: AdminDep, db: DbDep
) -> GroupOut:
    group = await _group(db, group_id)
    user = await find_user(db, user_id)
    if await db.get(GroupMembership, (group.id, user.id)) is None:
        db.add(GroupMembership(group_id=group.id, user_id=user.id))
    audit.record(
        db,
        actor=admin,
        action="group.add_member",
        resource_type="group",
        resource_id=group.id,
        request=request,
        user=user.username,
    )
    await db.commit()
    return await _group_out(db, group)


@router.delete("/groups/{group_id}/members/{user_id}", response_model=GroupOut)
async def remove_member(
    group_id: str, user_id: str, request: Request, admin: AdminDep, db: DbDep
) -> GroupOut:
    group = await _group(db, group_id)
    user = await find_user(db, user_id)
    await db.execute(
        delete(GroupMembership).where(
            GroupMembership.group_id == group.id, GroupMembership.user_id == user.id
        )
    )
    audit.record(
        db,
        actor=admin,
        action="group.remove_member",
        resource_type="group",
        resource_id=group.id,
        request=request,
        user=user.username,
    )
    await db.commit()
    return await _group_out(db, group)


@router.put("/groups/{group_id}/quota", response_model=QuotaOut)
async def put_group_quota(
    group_id: str, body: QuotaIn, request: Request, admin: AdminDep, db: DbDep
) -> Quota:
    group = await _group(db, group_id)
    quota = await _set_quota(db, user_id=None, group_id=group.id, body=body)
    audit.record(
        db,
        actor=admin,
        action="quota.set",
        resource_type="group",
        resource_id=group.id,
        request=request,
        **body.model_dump(),
    )
    await db.commit()
    return quota


@router.delete("/groups/{group_id}/quota", status_code=204)
async def delete_group_quota(
    group_id: str, request: Request, admin: AdminDep, db: DbDep
) -> Response:
    group = await _group(db, group_id)
    await db.execute(delete(Quota).where(Quota.group_id == group.id))
    audit.record(
        db,
        actor=admin,
        action="quota.delete",
        resource_type="group",
        resource_id=group.id,
        request=request,
    )
    await db.commit()
    return Response(status_code=204)
