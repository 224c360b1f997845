"""Active sign-ins: the account security page's list, "sign out this one" and "sign out
everywhere".

A sign-in is one login and the refresh-token family it started (`SignIn`); the access tokens
it is given carry its id (claim `sid`), so the list can mark the caller's own. Ending one
revokes its refresh tokens and, through `token_version`, every access token of the user at
once (see `revocation.end_sign_in`); the other sign-ins renew theirs from their refresh
tokens. Only the owner's sign-ins are visible: another user's id is a 404, as for sessions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from ua_parser import parse

from streamspace.controlplane import audit
from streamspace.controlplane.api.auth import forget_refresh_cookie
from streamspace.controlplane.deps import ClaimsDep, DbDep, StateDep, UserDep
from streamspace.controlplane.problems import bad_request, not_found
from streamspace.controlplane.revocation import end_sign_in, end_sign_ins
from streamspace.db.models import SignIn

router = APIRouter(prefix="/api/v1/auth/sessions", tags=["auth"])


class SignInOut(BaseModel):
    id: str
    device: str = Field(
        description="browser and system, from the User-Agent, e.g. Firefox on Linux"
    )
    user_agent: str
    ip: str = Field(description="where it was last used from")
    method: str = Field(description="password, ldap or passkey; `+totp` etc. for a second factor")
    created_at: datetime
    last_used_at: datetime = Field(description="its login or its last token refresh")
    expires_at: datetime
    current: bool = Field(description="the sign-in this request was made with")


@lru_cache(maxsize=1024)
def device(user_agent: str) -> str:
    """A short name for a User-Agent: "Firefox 133 on Linux", "Safari 17 on Mac OS X"; a
    client that is not a browser is named by its first product token (`streamspace-cli`)."""
    if not user_agent:
        return "unknown device"
    found = parse(user_agent)
    browser = found.user_agent
    system = found.os
    if browser is None:
        return user_agent.split(" ", 1)[0].split("/", 1)[0][:64] or "unknown device"
    name = f"{browser.family} {browser.major}" if browser.major else browser.family
    return f"{name} on {system.family}" if system is not None else name


def _check_id(sign_in_id: str) -> None:
    if len(sign_in_id) > 64:
        raise bad_request("sign-in id is too long")


@router.get("", response_model=list[SignInOut])
async def list_sign_ins(user: UserDep, claims: ClaimsDep, db: DbDep) -> list[SignInOut]:
    now = datetime.now(UTC)
    rows = await db.scalars(
        select(SignIn)
        .where(SignIn.user_id == user.id, SignIn.revoked_at.is_(None), SignIn.expires_at > now)
        .order_by(SignIn.last_used_at.desc())
    )
    return [
        SignInOut(
            id=row.id,
            device=device(row.user_agent),
            user_agent=row.user_agent,
            ip=row.ip,
            method=row.method,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            expires_at=row.expires_at,
            current=row.id == claims.get("sid"),
        )
        for row in rows
    ]


@router.delete("/{sign_in_id}", status_code=204)
async def end_one(
    sign_in_id: str,
    request: Request,
    user: UserDep,
    claims: ClaimsDep,
    state: StateDep,
    db: DbDep,
) -> Response:
    """Sign out this one: at once, its refresh tokens and every access token of the user end
    and the user's open viewers close; the caller's own sign-in, when it is another, renews
    its access token with its refresh token."""
    _check_id(sign_in_id)
    row = await db.get(SignIn, sign_in_id)
    now = datetime.now(UTC)
    if row is None or row.user_id != user.id or row.revoked_at is not None or row.expires_at <= now:
        raise not_found("sign-in", sign_in_id)
    await end_sign_in(db, user, row.id)
    own = row.id == claims.get("sid")
    audit.record(
        db,
        actor=user,
        action="auth.sign_in_ended",
        resource_type="sign_in",
        resource_id=row.id,
        request=request,
        status_code=204,
        own=own,
    )
    await db.commit()
    state.revocations.revoke(user.id, "signed out: a sign-in of this account was ended")
    resp = Response(status_code=204)
    return forget_refresh_cookie(request, resp) if own else resp


@router.post("/revoke-all", status_code=204)
async def end_all(request: Request, user: UserDep, state: StateDep, db: DbDep) -> Response:
    """Sign out everywhere, this sign-in included."""
    await end_sign_ins(db, user)
    audit.record(
        db,
        actor=user,
        action="auth.sign_out_everywhere",
        resource_type="user",
        resource_id=user.id,
        request=request,
        status_code=204,
    )
    await db.commit()
    state.revocations.revoke(user.id, "signed out everywhere")
    return forget_refresh_cookie(request, Response(status_code=204))
