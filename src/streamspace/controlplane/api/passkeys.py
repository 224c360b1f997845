"""Passkeys: register and remove them while signed in, use one as the second step of a
login, or sign in with one alone (a discoverable credential with user verification)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.controlplane import audit, passkeys
from streamspace.controlplane.api.auth import issue_tokens, token_response
from streamspace.controlplane.api.mfagate import required_by_policy
from streamspace.controlplane.api.schemas import (
    Page,
    PasskeyLoginIn,
    PasskeyOptionsOut,
    PasskeyOut,
    PasskeyRegisterIn,
    WebAuthnAnswerIn,
)
from streamspace.controlplane.browser import is_tls
from streamspace.controlplane.deps import DbDep, StateDep, UserDep, client_ip
from streamspace.controlplane.loginthrottle import TooManyFailures
from streamspace.controlplane.problems import Problem, conflict, not_found
from streamspace.controlplane.state import AppState
from streamspace.db.models import MfaTotp, Passkey, User, WebAuthnChallenge

router = APIRouter(tags=["auth"])
MAX_PASSKEYS = 20


def relying_party(request: Request, state: AppState) -> passkeys.RelyingParty:
    scheme = "https" if is_tls(request.scope) else "http"
    return passkeys.relying_party(
        state.settings.public_url,
        scheme,
        request.headers.get("host", ""),
        state.settings.mfa_issuer,
    )


def _refused(detail: str, status: int = 401) -> Problem:
    """401 while signing in; 400 to a signed-in caller, whose page takes a 401 for an ended
    sign-in."""
    title = "Unauthorized" if status == 401 else "Bad request"
    return Problem(status, title, detail, kind="passkey-refused")


async def new_challenge(db: AsyncSession, user_id: str | None, purpose: str, challenge: str) -> str:
    now = datetime.now(UTC)
    await db.execute(delete(WebAuthnChallenge).where(WebAuthnChallenge.expires_at < now))
    row = WebAuthnChallenge(
        user_id=user_id,
        purpose=purpose,
        challenge=challenge,
        expires_at=now + timedelta(seconds=passkeys.CHALLENGE_SECONDS),
    )
    db.add(row)
    await db.commit()
    return row.id


async def take_challenge(
    db: AsyncSession, challenge_id: str, purpose: str, user_id: str | None, status: int = 401
) -> str:
    """The challenge, used up: deleted (and committed) before the answer is checked, so it
    serves one attempt on whichever replica it reaches."""
    row = await db.get(WebAuthnChallenge, challenge_id)
    if (
        row is None
        or row.purpose != purpose
        or row.user_id != user_id
        or row.expires_at <= datetime.now(UTC)
    ):
        raise _refused("the passkey challenge is unknown, used or expired; start again", status)
    challenge = row.challenge
    taken = await db.execute(delete(WebAuthnChallenge).where(WebAuthnChallenge.id == challenge_id))
    await db.commit()
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        raise _refused("the passkey challenge was already used; start again", status)
    return challenge


async def user_passkeys(db: AsyncSession, user_id: str) -> list[Passkey]:
    return list(await db.scalars(select(Passkey).where(Passkey.user_id == user_id)))


async def _refusal(
    request: Request, db: AsyncSession, purpose: str, user_id: str | None, reason: str
) -> Problem:
    user = await db.get(User, user_id) if user_id is not None else None
    audit.record(
        db,
        actor=user,
        action="auth.mfa_failed" if purpose == "mfa" else "auth.login_failed",
        resource_type="user",
        resource_id=user_id or "",
        request=request,
        status_code=401,
        method="passkey",
        reason=reason,
    )
    await db.commit()
    return _refused(reason)


async def prove_with_passkey(
    request: Request,
    state: AppState,
    db: AsyncSession,
    answer: WebAuthnAnswerIn,
    *,
    purpose: str,
    user_id: str | None,
    require_verification: bool,
) -> Passkey:
    """The passkey that signed `answer`, its counter and last use updated (not committed). A
    refusal is audited (`auth.login_failed` for a passwordless sign-in, `auth.mfa_failed` for
    a second step) and committed with the challenge's use."""
    challenge = await take_challenge(db, answer.challenge_id, purpose, user_id)
    try:
        cred_id = passkeys.credential_id_of(answer.credential)
    except passkeys.PasskeyRefused as exc:
        raise await _refusal(request, db, purpose, user_id, str(exc)) from None
    key = await db.scalar(select(Passkey).where(Passkey.credential_id == cred_id))
    if key is None or (user_id is not None and key.user_id != user_id):
        raise await _refusal(request, db, purpose, user_id, "this passkey is not registered here")
    try:
        key.sign_count = passkeys.check_assertion(
            relying_party(request, state),
            answer.credential,
            challenge,
            key.public_key,
            key.sign_count,
            require_verification=require_verification,
        )
    except passkeys.PasskeyRefused as exc:
        raise await _refusal(request, db, purpose, user_id or key.user_id, str(exc)) from None
    key.last_used_at = datetime.now(UTC)
    return key


@router.post("/api/v1/auth/mfa/webauthn/register/options", response_model=PasskeyOptionsOut)
async def register_options(
    request: Request, user: UserDep, state: StateDep, db: DbDep
) -> PasskeyOptionsOut:
    existing = [k.credential_id for k in await user_passkeys(db, user.id)]
    options, challenge = passkeys.registration_options(
        relying_party(request, state), user.id, user.username, user.display_name, existing
    )
    challenge_id = await new_challenge(db, user.id, "register", challenge)
    return PasskeyOptionsOut(challenge_id=challenge_id, options=options)


@router.post("/api/v1/auth/mfa/webauthn/register", response_model=PasskeyOut, status_code=201)
async def register(
    body: PasskeyRegisterIn, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> Passkey:
    challenge = await take_challenge(db, body.challenge_id, "register", user.id, 400)
    held = await db.scalar(select(func.count()).where(Passkey.user_id == user.id)) or 0
    if held >= MAX_PASSKEYS:
        raise conflict(f"you already have {held} passkeys (at most {MAX_PASSKEYS})")
    try:
        new = passkeys.check_registration(relying_party(request, state), body.credential, challenge)
    except passkeys.PasskeyRefused as exc:
        raise Problem(400, "Bad request", str(exc), kind="passkey-refused") from None
    key = Passkey(
        user_id=user.id,
        credential_id=new.credential_id,
        public_key=new.public_key,
        sign_count=new.sign_count,
        name=body.name,
    )
    db.add(key)
    audit.record(
        db,
        actor=user,
        action="mfa.passkey_added",
        resource_type="passkey",
        resource_id=key.id,
        request=request,
        name=body.name,
    )
    try:
        await db.commit()
    except IntegrityError:
        raise conflict("this passkey is already registered") from None
    return key


@router.get("/api/v1/auth/mfa/webauthn", response_model=Page[PasskeyOut])
async def list_passkeys(
    user: UserDep,
    db: DbDep,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[PasskeyOut]:
    where = Passkey.user_id == user.id
    total = await db.scalar(select(func.count()).where(where)) or 0
    rows = await db.scalars(
        select(Passkey)
        .where(where)
        .order_by(Passkey.created_at, Passkey.id)
        .limit(limit)
        .offset(offset)
    )
    return Page[PasskeyOut](
        items=[PasskeyOut.model_validate(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )


@router.delete("/api/v1/auth/mfa/webauthn/{passkey_id}", status_code=204)
async def remove_passkey(
    passkey_id: str, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> Response:
    key = await db.get(Passkey, passkey_id)
    if key is None or key.user_id != user.id:
        raise not_found("passkey", passkey_id)
    others = await db.scalar(
        select(func.count()).where(Passkey.user_id == user.id, Passkey.id != key.id)
    )
    totp = await db.get(MfaTotp, user.id)
    last = not others and (totp is None or totp.confirmed_at is None)
    if last and await required_by_policy(db, state.settings, user):
        raise conflict("your account must keep a second factor; add another one first")
    await db.delete(key)
    audit.record(
        db,
        actor=user,
        action="mfa.passkey_removed",
        resource_type="passkey",
        resource_id=passkey_id,
        request=request,
    )
    await db.commit()
    return Response(status_code=204)


@router.post("/api/v1/auth/passkey/options", response_model=PasskeyOptionsOut)
async def passwordless_options(request: Request, state: StateDep, db: DbDep) -> PasskeyOptionsOut:
    options, challenge = passkeys.authentication_options(
        relying_party(request, state), None, require_verification=True
    )
    challenge_id = await new_challenge(db, None, "passwordless", challenge)
    return PasskeyOptionsOut(challenge_id=challenge_id, options=options)


@router.post("/api/v1/auth/passkey/login")
async def passwordless_login(
    body: PasskeyLoginIn, request: Request, state: StateDep, db: DbDep
) -> Response:
    """A passkey with user verification is both factors at once: no password, no code."""
    try:
        attempt = state.login_throttle.admit("\0passkey", client_ip(request))
    except TooManyFailures as exc:
        wait = exc.retry_after_header
        raise Problem(
            429,
            "Too many requests",
            f"too many failed sign-ins from this address; try again in {wait} s",
            kind="rate-limited",
            headers={"Retry-After": str(wait)},
        ) from None
    key = await prove_with_passkey(
        request, state, db, body, purpose="passwordless", user_id=None, require_verification=True
    )
    user = await db.get(User, key.user_id)
    if user is None or not user.is_active:
        raise _refused("this account is disabled")
    state.login_throttle.succeeded(attempt)
    tokens, refresh = await issue_tokens(state, db, user, request=request, method="passkey")
    audit.record(
        db,
        actor=user,
        action="auth.login",
        resource_type="user",
        resource_id=user.id,
        request=request,
        method="passkey",
        mfa="passkey",
    )
    await db.commit()
    return token_response(request, state, tokens, refresh, body.refresh_token_delivery)


def allowed_for(keys: list[Passkey]) -> list[str]:
    return [k.credential_id for k in keys]


def second_step_options(
    request: Request, state: AppState, keys: list[Passkey]
) -> tuple[dict[str, Any], str]:
    return passkeys.authentication_options(
        relying_party(request, state), allowed_for(keys), require_verification=False
    )
