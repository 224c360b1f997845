"""Login, token refresh (rotating, replay-detecting), logout, me, password change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.controlplane import audit
from streamspace.controlplane.api.schemas import (
    LoginIn,
    LogoutIn,
    PasswordChangeIn,
    RefreshIn,
    TokenOut,
    UserOut,
)
from streamspace.controlplane.deps import DbDep, StateDep, UserDep, client_ip
from streamspace.controlplane.problems import Problem
from streamspace.controlplane.revocation import end_sign_ins
from streamspace.controlplane.security import (
    hash_password,
    make_access_token,
    random_secret,
    sha256,
    verify_password,
)
from streamspace.controlplane.state import AppState
from streamspace.db.models import RefreshToken, User
from streamspace.db.types import new_id

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, kind="unauthorized")


async def issue_tokens(
    state: AppState, db: AsyncSession, user: User, family_id: str | None = None
) -> TokenOut:
    ttl = state.settings.access_token_ttl_seconds
    access, _ = make_access_token(
        state.secret,
        user_id=user.id,
        role=user.role,
        token_version=user.token_version,
        ttl_seconds=ttl,
    )
    refresh = random_secret(32)
    db.add(
        RefreshToken(
            user_id=user.id,
            family_id=family_id or new_id(),
            token_hash=sha256(refresh),
            expires_at=datetime.now(UTC)
            + timedelta(seconds=state.settings.refresh_token_ttl_seconds),
        )
    )
    return TokenOut(
        access_token=access,
        expires_in=ttl,
        refresh_token=refresh,
        user=UserOut.model_validate(user),
    )


IP_LIMIT_FACTOR = 10
"""Many users may share one address (NAT), so the per-IP limit is looser than the per-user one."""


def _check_rate(state: AppState, ip_key: str, user_key: str) -> None:
    wait = max(
        state.limiter.retry_after(user_key),
        state.limiter.retry_after(ip_key, state.limiter.limit * IP_LIMIT_FACTOR),
    )
    if wait > 0:
        raise Problem(
            429,
            "Too many requests",
            f"too many failed login attempts; try again in {int(wait) + 1} s",
            kind="rate-limited",
            headers={"Retry-After": str(int(wait) + 1)},
        )


@router.post("/login", response_model=TokenOut)
async def login(body: LoginIn, request: Request, state: StateDep, db: DbDep) -> TokenOut:
    ip_key, user_key = f"ip:{client_ip(request)}", f"user:{body.username.lower()}"
    _check_rate(state, ip_key, user_key)
    user = await db.scalar(select(User).where(User.username == body.username))
    if user is None or not verify_password(user.password_hash, body.password):
        state.limiter.hit(ip_key)
        state.limiter.hit(user_key)
        audit.record(
            db,
            actor=None,
            action="auth.login_failed",
            resource_type="user",
            resource_id=body.username,
            request=request,
            status_code=401,
        )
        await db.commit()
        raise _unauthorized("wrong username or password")
    if not user.is_active:
        raise _unauthorized("this account is disabled")
    state.limiter.reset(user_key)
    tokens = await issue_tokens(state, db, user)
    audit.record(
        db,
        actor=user,
        action="auth.login",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    await db.commit()
    return tokens


@router.post("/refresh", response_model=TokenOut)
async def refresh(body: RefreshIn, request: Request, state: StateDep, db: DbDep) -> TokenOut:
    now = datetime.now(UTC)
    row = await db.scalar(
        select(RefreshToken).where(RefreshToken.token_hash == sha256(body.refresh_token))
    )
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        raise _unauthorized("refresh token is invalid, expired or revoked; log in again")
    if row.used_at is not None:
        await db.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == row.family_id)
            .values(revoked_at=now)
        )
        audit.record(
            db,
            actor=None,
            action="auth.refresh_reuse",
            resource_type="user",
            resource_id=row.user_id,
            request=request,
            status_code=401,
        )
        await db.commit()
        raise _unauthorized("refresh token was already used; all its sessions are revoked")
    claimed = await db.execute(
        update(RefreshToken)
        .where(RefreshToken.id == row.id, RefreshToken.used_at.is_(None))
        .values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        await db.rollback()
        raise _unauthorized("refresh token was already used")
    user = await db.get(User, row.user_id)
    if user is None or not user.is_active:
        raise _unauthorized("user no longer exists or is disabled")
    tokens = await issue_tokens(state, db, user, family_id=row.family_id)
    await db.commit()
    return tokens


@router.post("/logout", status_code=204)
async def logout(
    request: Request, user: UserDep, state: StateDep, db: DbDep, body: LogoutIn | None = None
) -> None:
    """Revokes every refresh token of the user and every access token issued so far, and closes
    the user's open viewer and event streams."""
    await end_sign_ins(db, user)
    audit.record(
        db,
        actor=user,
        action="auth.logout",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    await db.commit()
    state.revocations.revoke(user.id, "signed out (logged out)")


@router.get("/me", response_model=UserOut)
async def me(user: UserDep) -> User:
    return user


@router.post("/password", response_model=TokenOut)
async def change_password(
    body: PasswordChangeIn, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> TokenOut:
    if not verify_password(user.password_hash, body.current_password):
        raise Problem(403, "Forbidden", "current password is wrong", kind="wrong-password")
    if body.new_password == body.current_password:
        raise Problem(
            422,
            "Invalid request",
            "new_password: must differ from the current one",
            kind="invalid-request",
        )
    user.password_hash = hash_password(body.new_password)
    await end_sign_ins(db, user)
    tokens = await issue_tokens(state, db, user)
    audit.record(
        db,
        actor=user,
        action="auth.password_change",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    await db.commit()
    state.revocations.revoke(user.id, "signed out: the password was changed")
    return tokens
