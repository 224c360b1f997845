"""Login, token refresh (rotating, replay-detecting), logout, me, password change.

Browsers get the refresh token as a cookie that no page script can read (HttpOnly,
SameSite=Strict, sent only to the refresh path, Secure over TLS), so an XSS cannot carry it
away; the access token lives in the page's memory. A cookie refresh also needs the
`X-StreamSpace-CSRF` header and, when the browser names one, a same-origin `Origin`: another
site cannot trigger it. Clients that are not browsers (the CLI) ask for the refresh token in
the JSON body at login and send it back in the body; a cookie refresh never answers with a
body token, and the other ways to get one need the password.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.controlplane import audit, security
from streamspace.controlplane.api.auth_directory import (
    ask_directory,
    provision_login,
    still_in_directory,
    uses_directory,
)
from streamspace.controlplane.api.mfagate import demand_second_step
from streamspace.controlplane.api.schemas import (
    LoginIn,
    LogoutIn,
    PasswordChangeIn,
    RefreshDelivery,
    RefreshIn,
    TokenOut,
    UserOut,
)
from streamspace.controlplane.browser import is_tls, origin_allowed
from streamspace.controlplane.deps import DbDep, StateDep, UserDep, client_ip, writer_turn
from streamspace.controlplane.loginthrottle import TooManyFailures
from streamspace.controlplane.passwords import require_strong
from streamspace.controlplane.problems import Problem, problem_response
from streamspace.controlplane.provisioning import LDAP, Provisioned, uses_outside_password
from streamspace.controlplane.revocation import end_sign_ins
from streamspace.controlplane.security import (
    hash_password,
    make_access_token,
    random_secret,
    sha256,
)
from streamspace.controlplane.state import AppState
from streamspace.db.models import RefreshToken, SignIn, User
from streamspace.db.types import new_id

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])

REFRESH_COOKIE = "streamspace_refresh"
REFRESH_PATH = "/api/v1/auth/refresh"
CSRF_HEADER = "X-StreamSpace-CSRF"


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, kind="unauthorized")


USER_AGENT_KEPT = 512


async def issue_tokens(
    state: AppState,
    db: AsyncSession,
    user: User,
    *,
    request: Request,
    method: str,
    family_id: str | None = None,
) -> tuple[TokenOut, str]:
    """A new access token, and a new refresh token (returned apart: where it goes depends on
    the client, see `token_response`). Without `family_id` this is a new sign-in (a `SignIn`
    row, `method` saying how it was made); with one, that sign-in is renewed."""
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=state.settings.refresh_token_ttl_seconds)
    sign_in = await db.get(SignIn, family_id) if family_id is not None else None
    if sign_in is None:
        sign_in = SignIn(
            id=family_id or new_id(),
            user_id=user.id,
            method=method[:32],
            user_agent=request.headers.get("user-agent", "")[:USER_AGENT_KEPT],
            created_at=now,
        )
        db.add(sign_in)
    sign_in.ip = client_ip(request)[:64]
    sign_in.last_used_at = now
    sign_in.expires_at = expires
    ttl = state.settings.access_token_ttl_seconds
    access, _ = make_access_token(
        state.secret,
        user_id=user.id,
        role=user.role,
        token_version=user.token_version,
        ttl_seconds=ttl,
        sign_in=sign_in.id,
    )
    refresh = random_secret(32)
    db.add(
        RefreshToken(
            user_id=user.id,
            family_id=sign_in.id,
            token_hash=sha256(refresh),
            expires_at=expires,
        )
    )
    return TokenOut(access_token=access, expires_in=ttl, user=UserOut.model_validate(user)), refresh


def first_factor(user: User) -> str:
    """How a user who reached the second step gave the first: their directory's password or
    ours."""
    return "ldap" if user.auth_source == LDAP else "password"


def token_response(
    request: Request,
    state: AppState,
    tokens: TokenOut,
    refresh: str,
    delivery: RefreshDelivery,
) -> JSONResponse:
    if delivery == "body":
        with_refresh = tokens.model_copy(update={"refresh_token": refresh})
        return JSONResponse(with_refresh.model_dump(mode="json"))
    resp = JSONResponse(tokens.model_dump(mode="json", exclude={"refresh_token"}))
    set_refresh_cookie(request, state, resp, refresh)
    return resp


def set_refresh_cookie(request: Request, state: AppState, resp: Response, refresh: str) -> None:
    resp.set_cookie(
        REFRESH_COOKIE,
        refresh,
        max_age=state.settings.refresh_token_ttl_seconds,
        path=REFRESH_PATH,
        secure=is_tls(request.scope),
        httponly=True,
        samesite="strict",
    )


def forget_refresh_cookie(request: Request, resp: Response) -> Response:
    resp.delete_cookie(
        REFRESH_COOKIE,
        path=REFRESH_PATH,
        secure=is_tls(request.scope),
        httponly=True,
        samesite="strict",
    )
    return resp


@router.post("/login", response_model=TokenOut)
async def login(body: LoginIn, request: Request, state: StateDep, db: DbDep) -> JSONResponse:
    try:
        attempt = state.login_throttle.admit(body.username, client_ip(request))
    except TooManyFailures as exc:
        wait = exc.retry_after_header
        raise Problem(
            429,
            "Too many requests",
            f"too many failed login attempts from this address; try again in {wait} s",
            kind="rate-limited",
            headers={"Retry-After": str(wait)},
        ) from None
    user = await db.scalar(select(User).where(func.lower(User.username) == body.username.lower()))
    directory: Provisioned | None = None
    via_directory = uses_directory(state, user)
    async with contextlib.AsyncExitStack() as held:
        if via_directory:
            entry = await ask_directory(request, state, db, body.username, body.password)
            if entry is not None:
                # The account's read-then-write: on SQLite, which has no row locks, in the turn.
                await held.enter_async_context(writer_turn(state, db))
                directory = await provision_login(db, entry, state.settings)
            user = directory.user if directory is not None else None
        elif not await _password_matches(user, body.password):
            user = None
        if user is None:
            audit.record(
                db,
                actor=None,
                action="auth.login_failed",
                resource_type="user",
                resource_id=body.username,
                request=request,
                status_code=401,
                method="ldap" if via_directory else "password",
            )
            await db.commit()
            raise _unauthorized("wrong username or password")
        state.login_throttle.succeeded(attempt)
        if not user.is_active:
            raise _unauthorized("this account is disabled")
        if directory is None and security.needs_rehash(user.password_hash):
            user.password_hash = await asyncio.to_thread(hash_password, body.password)
        # What the password step settled (a rehash, a directory account and its groups) is
        # kept whether or not a second step follows.
        await db.commit()
        if directory is not None and directory.role_changed:
            state.revocations.revoke(
                user.id, f"signed out: the directory groups changed the role to {user.role}"
            )
        await demand_second_step(
            db, state.settings, state.secret, user, body.refresh_token_delivery
        )
        method = "ldap" if directory is not None else "password"
        tokens, refresh = await issue_tokens(state, db, user, request=request, method=method)
        audit.record(
            db,
            actor=user,
            action="auth.login",
            resource_type="user",
            resource_id=user.id,
            request=request,
            **({"method": method} | _directory_detail(directory)),
        )
        await db.commit()
    return token_response(request, state, tokens, refresh, body.refresh_token_delivery)


async def _password_matches(user: User | None, password: str) -> bool:
    has_password = user is not None and user.password_hash != security.NO_PASSWORD
    stored = user.password_hash if user is not None and has_password else security.dummy_hash()
    # Verified whether or not the user exists (never short-circuited): the same work either way.
    matches = await asyncio.to_thread(security.verify_password, stored, password)
    return user is not None and matches


def _directory_detail(directory: Provisioned | None) -> dict[str, Any]:
    if directory is None:
        return {}
    return {
        "method": "ldap",
        "created": directory.created,
        "role": directory.user.role,
        "groups_joined": directory.groups_joined,
        "groups_left": directory.groups_left,
    }


def _cookie_refresh_token(request: Request, state: AppState) -> str:
    if request.headers.get(CSRF_HEADER) is None:
        raise Problem(
            403,
            "Forbidden",
            f"a cookie refresh needs the {CSRF_HEADER} header (the web UI sends it); "
            "other clients send their refresh_token in the body",
            kind="csrf",
        )
    if not origin_allowed(request, state.settings):
        raise Problem(
            403,
            "Forbidden",
            f"cross-origin refresh refused: Origin {request.headers.get('origin')!r}",
            kind="cross-origin",
        )
    token = request.cookies.get(REFRESH_COOKIE)
    if not token or len(token) > 512:
        raise _unauthorized("no refresh token (log in at POST /api/v1/auth/login)")
    return token


@router.post("/refresh", response_model=TokenOut)
async def refresh(
    request: Request, state: StateDep, db: DbDep, body: RefreshIn | None = None
) -> Response:
    if body is not None and body.refresh_token is not None:
        return await _rotate(request, state, db, body.refresh_token, "body")
    presented = _cookie_refresh_token(request, state)
    try:
        return await _rotate(request, state, db, presented, "cookie")
    except Problem as exc:
        if exc.status != 401:
            raise
        # A dead cookie is of no further use: let the browser drop it.
        return forget_refresh_cookie(
            request, problem_response(request, 401, exc.title, exc.detail, exc.kind)
        )


async def _rotate(
    request: Request, state: AppState, db: AsyncSession, presented: str, delivery: RefreshDelivery
) -> Response:
    now = datetime.now(UTC)
    row = await db.scalar(select(RefreshToken).where(RefreshToken.token_hash == sha256(presented)))
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        raise _unauthorized("refresh token is invalid, expired or revoked; log in again")
    if row.used_at is not None:
        await db.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == row.family_id)
            .values(revoked_at=now)
        )
        await db.execute(
            update(SignIn)
            .where(SignIn.id == row.family_id, SignIn.revoked_at.is_(None))
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
    user = await db.get(User, row.user_id)
    if user is None or not user.is_active:
        raise _unauthorized("user no longer exists or is disabled")
    # Asked before the claim below writes: no write lock is held while the directory answers.
    if user.auth_source == LDAP and not await still_in_directory(state, user):
        await end_sign_ins(db, user)
        audit.record(
            db,
            actor=None,
            action="auth.refresh_refused",
            resource_type="user",
            resource_id=user.id,
            request=request,
            status_code=401,
            method="ldap",
            reason="the directory no longer has the account",
        )
        await db.commit()
        state.revocations.revoke(user.id, "signed out: the directory no longer has the account")
        raise _unauthorized("user no longer exists or is disabled")
    claimed = await db.execute(
        update(RefreshToken)
        .where(RefreshToken.id == row.id, RefreshToken.used_at.is_(None))
        .values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        await db.rollback()
        raise _unauthorized("refresh token was already used")
    tokens, refresh_token = await issue_tokens(
        state, db, user, request=request, method="", family_id=row.family_id
    )
    await db.commit()
    return token_response(request, state, tokens, refresh_token, delivery)


@router.post("/logout", status_code=204)
async def logout(
    request: Request, user: UserDep, state: StateDep, db: DbDep, body: LogoutIn | None = None
) -> Response:
    """Revokes every refresh token of the user and every access token issued so far, closes
    the user's open viewer and event streams, and drops the refresh cookie. Authenticated by
    the bearer token, which a cross-site page cannot send."""
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
    return forget_refresh_cookie(request, Response(status_code=204))


@router.get("/me", response_model=UserOut)
async def me(user: UserDep) -> User:
    return user


@router.post("/password", response_model=TokenOut)
async def change_password(
    body: PasswordChangeIn, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> Response:
    if uses_outside_password(user.auth_source):
        where = "the directory's" if user.auth_source == LDAP else "your identity provider's"
        raise Problem(
            400,
            "Bad request",
            f"your password is {where}: change it there",
            kind="bad-request",
        )
    if not await asyncio.to_thread(
        security.verify_password, user.password_hash, body.current_password
    ):
        raise Problem(403, "Forbidden", "current password is wrong", kind="wrong-password")
    if body.new_password == body.current_password:
        raise Problem(
            422,
            "Invalid request",
            "new_password: must differ from the current one",
            kind="invalid-request",
        )
    await require_strong(
        body.new_password, (user.username, user.display_name, user.email), "new_password"
    )
    user.password_hash = await asyncio.to_thread(hash_password, body.new_password)
    await end_sign_ins(db, user)
    tokens, refresh_token = await issue_tokens(state, db, user, request=request, method="password")
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
    return token_response(request, state, tokens, refresh_token, body.refresh_token_delivery)
