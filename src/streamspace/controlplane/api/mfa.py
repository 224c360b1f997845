"""Two-factor sign-in: the code step of a login, TOTP enrolment (also as part of a login the
policy sends there), recovery codes, and an admin's reset for a lost device."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.controlplane import audit, mfa, security
from streamspace.controlplane.api.auth import (
    first_factor,
    issue_tokens,
    set_refresh_cookie,
    token_response,
)
from streamspace.controlplane.api.mfagate import confirmed_factor, required_by_policy
from streamspace.controlplane.api.passkeys import (
    new_challenge,
    prove_with_passkey,
    second_step_options,
    user_passkeys,
)
from streamspace.controlplane.api.schemas import (
    CodeConfirmIn,
    MfaStatusOut,
    MfaTokenIn,
    MfaVerifyIn,
    PasskeyOptionsOut,
    PasswordConfirmIn,
    RecoveryCodesOut,
    RefreshDelivery,
    TotpConfirmIn,
    TotpConfirmOut,
    TotpStartIn,
    TotpStartOut,
)
from streamspace.controlplane.api.users import find_user
from streamspace.controlplane.deps import (
    AdminDep,
    DbDep,
    StateDep,
    UserDep,
    client_ip,
    current_user,
    token_claims,
)
from streamspace.controlplane.loginthrottle import Attempt, TooManyFailures
from streamspace.controlplane.problems import Problem, conflict
from streamspace.controlplane.state import AppState
from streamspace.db.models import MfaTotp, User

router = APIRouter(tags=["auth"])
PREFIX = "/api/v1/auth/mfa"


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, kind="unauthorized")


def _wrong_code(status: int = 401) -> Problem:
    """401 only for the login step: to a signed-in caller, whose page would take a 401 for
    an ended sign-in, a wrong code is a bad request."""
    title = "Unauthorized" if status == 401 else "Bad request"
    return Problem(status, title, "wrong or already used code", kind="wrong-code")


def _admit(state: AppState, request: Request, user_id: str) -> Attempt:
    """Codes are throttled like passwords, per account and client: six digits fall to a
    few hundred thousand guesses otherwise."""
    try:
        return state.login_throttle.admit(f"mfa\0{user_id}", client_ip(request))
    except TooManyFailures as exc:
        wait = exc.retry_after_header
        raise Problem(
            429,
            "Too many requests",
            f"too many wrong codes; try again in {wait} s",
            kind="rate-limited",
            headers={"Retry-After": str(wait)},
        ) from None


async def _pending_user(
    state: AppState, db: AsyncSession, token: str, purpose: mfa.Purpose
) -> tuple[User, mfa.Pending]:
    pending = mfa.read_mfa_token(state.secret, token)
    if pending is None or pending.purpose != purpose:
        raise _unauthorized("mfa_token is invalid or expired; log in again")
    user = await db.get(User, pending.user_id)
    if user is None or not user.is_active or user.token_version != pending.token_version:
        raise _unauthorized("mfa_token is no longer valid; log in again")
    return user, pending


async def _enrolling_user(
    request: Request, state: AppState, db: AsyncSession, mfa_token: str | None
) -> tuple[User, mfa.Pending | None]:
    """The signed-in user, or the one a login sent to enrol (its `mfa_token`)."""
    if mfa_token is not None:
        return await _pending_user(state, db, mfa_token, "enrol")
    claims = await token_claims(request, state)
    return await current_user(request, state, claims, db), None


async def _take_step(db: AsyncSession, user_id: str, step: int) -> bool:
    """Compare-and-set of the last used step: of two requests with one code, one wins."""
    result = await db.execute(
        update(MfaTotp)
        .where(MfaTotp.user_id == user_id, MfaTotp.last_step < step)
        .values(last_step=step)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def _code_ok(state: AppState, db: AsyncSession, row: MfaTotp, code: str) -> bool:
    if mfa.looks_like_recovery_code(code):
        wanted = mfa.recovery_hash(state.secret, code)
        hashes = list(row.recovery_hashes)
        if not any(security.constant_eq(wanted, h) for h in hashes):
            return False
        row.recovery_hashes = [h for h in hashes if h != wanted]
        return True
    secret = mfa.unseal(state.secret, row.secret_sealed)
    if secret is None:
        return False
    step = mfa.accepted_step(secret, code, row.last_step, datetime.now(UTC))
    return step is not None and await _take_step(db, row.user_id, step)


@router.post(f"{PREFIX}/verify")
async def verify(body: MfaVerifyIn, request: Request, state: StateDep, db: DbDep) -> Response:
    """The second step of a login: a TOTP code (each usable once) or a recovery code."""
    user, pending = await _pending_user(state, db, body.mfa_token, "verify")
    attempt = _admit(state, request, user.id)
    if body.webauthn is not None:
        await prove_with_passkey(
            request,
            state,
            db,
            body.webauthn,
            purpose="mfa",
            user_id=user.id,
            require_verification=False,
        )
        how = "passkey"
    else:
        how = await _code_step(state, db, user, request, body.code or "")
    state.login_throttle.succeeded(attempt)
    method = first_factor(user)
    tokens, refresh = await issue_tokens(state, db, user, request=request, method=f"{method}+{how}")
    audit.record(
        db,
        actor=user,
        action="auth.login",
        resource_type="user",
        resource_id=user.id,
        request=request,
        method=method,
        mfa=how,
    )
    await db.commit()
    delivery: RefreshDelivery = "body" if pending.delivery == "body" else "cookie"
    return token_response(request, state, tokens, refresh, delivery)


@router.post(f"{PREFIX}/webauthn/options", response_model=PasskeyOptionsOut)
async def webauthn_options(
    body: MfaTokenIn, request: Request, state: StateDep, db: DbDep
) -> PasskeyOptionsOut:
    """The challenge for a login's passkey step (the user's passkeys only)."""
    user, _ = await _pending_user(state, db, body.mfa_token, "verify")
    keys = await user_passkeys(db, user.id)
    if not keys:
        raise conflict("this account has no passkey; use a code")
    options, challenge = second_step_options(request, state, keys)
    challenge_id = await new_challenge(db, user.id, "mfa", challenge)
    return PasskeyOptionsOut(challenge_id=challenge_id, options=options)


async def _code_step(
    state: AppState, db: AsyncSession, user: User, request: Request, code: str
) -> str:
    row = await confirmed_factor(db, user.id)
    if row is None or not await _code_ok(state, db, row, code):
        audit.record(
            db,
            actor=user,
            action="auth.mfa_failed",
            resource_type="user",
            resource_id=user.id,
            request=request,
            status_code=401,
            method="recovery" if mfa.looks_like_recovery_code(code) else "totp",
        )
        await db.commit()
        raise _wrong_code()
    return "recovery" if mfa.looks_like_recovery_code(code) else "totp"


@router.get(PREFIX, response_model=MfaStatusOut)
async def status(user: UserDep, state: StateDep, db: DbDep) -> MfaStatusOut:
    row = await db.get(MfaTotp, user.id)
    confirmed = row is not None and row.confirmed_at is not None
    return MfaStatusOut(
        totp_enabled=confirmed,
        totp_confirmed_at=row.confirmed_at if row is not None else None,
        recovery_codes_left=len(row.recovery_hashes) if row is not None and confirmed else 0,
        passkeys=len(await user_passkeys(db, user.id)),
        required=await required_by_policy(db, state.settings, user),
    )


@router.post(f"{PREFIX}/totp", response_model=TotpStartOut, status_code=201)
async def start_totp(
    request: Request, state: StateDep, db: DbDep, body: TotpStartIn | None = None
) -> TotpStartOut:
    """A new secret to scan; it becomes the user's factor once a code from it is confirmed.
    Starting again replaces an unconfirmed secret."""
    user, _ = await _enrolling_user(request, state, db, body.mfa_token if body else None)
    row = await db.get(MfaTotp, user.id)
    if row is not None and row.confirmed_at is not None:
        raise conflict("an authenticator app is already set up; disable it first")
    secret = mfa.new_totp_secret()
    sealed = mfa.seal(state.secret, secret)
    if row is None:
        db.add(MfaTotp(user_id=user.id, secret_sealed=sealed, last_step=0, recovery_hashes=[]))
    else:
        row.secret_sealed = sealed
    await db.commit()
    uri = mfa.provisioning_uri(secret, user.username, state.settings.mfa_issuer)
    return TotpStartOut(secret=secret, otpauth_uri=uri, qr=mfa.qr_rows(uri))


@router.post(f"{PREFIX}/totp/confirm", response_model=TotpConfirmOut)
async def confirm_totp(
    body: TotpConfirmIn, request: Request, state: StateDep, db: DbDep
) -> Response:
    """Turns the started secret on and answers the recovery codes, once. Part of a login
    (an enrolment `mfa_token`), it also finishes that login."""
    user, pending = await _enrolling_user(request, state, db, body.mfa_token)
    row = await db.get(MfaTotp, user.id)
    if row is None or row.confirmed_at is not None:
        raise conflict(
            "no authenticator app set-up is under way: start one at POST " + PREFIX + "/totp"
        )
    attempt = _admit(state, request, user.id)
    secret = mfa.unseal(state.secret, row.secret_sealed)
    step = None if secret is None else mfa.accepted_step(secret, body.code, 0, datetime.now(UTC))
    if step is None:
        raise _wrong_code(400)
    state.login_throttle.succeeded(attempt)
    codes = mfa.new_recovery_codes()
    row.recovery_hashes = [mfa.recovery_hash(state.secret, c) for c in codes]
    row.confirmed_at = datetime.now(UTC)
    row.last_step = step
    audit.record(
        db,
        actor=user,
        action="mfa.totp_enabled",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    if pending is None:
        await db.commit()
        return JSONResponse(TotpConfirmOut(recovery_codes=codes).model_dump(mode="json"))
    method = first_factor(user)
    tokens, refresh = await issue_tokens(state, db, user, request=request, method=f"{method}+totp")
    audit.record(
        db,
        actor=user,
        action="auth.login",
        resource_type="user",
        resource_id=user.id,
        request=request,
        method=method,
        mfa="enrolled",
    )
    await db.commit()
    if pending.delivery == "body":
        tokens = tokens.model_copy(update={"refresh_token": refresh})
    out = TotpConfirmOut(recovery_codes=codes, login=tokens)
    resp = JSONResponse(out.model_dump(mode="json"))
    if pending.delivery != "body":
        set_refresh_cookie(request, state, resp, refresh)
    return resp


@router.post(f"{PREFIX}/totp/disable", status_code=204)
async def disable_totp(
    body: PasswordConfirmIn, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> Response:
    if not await asyncio.to_thread(security.verify_password, user.password_hash, body.password):
        raise Problem(403, "Forbidden", "password is wrong", kind="wrong-password")
    if await required_by_policy(db, state.settings, user) and not await user_passkeys(db, user.id):
        raise conflict("your account must use a second factor; it cannot be turned off")
    row = await db.get(MfaTotp, user.id)
    if row is None:
        raise conflict("no authenticator app is set up")
    await db.delete(row)
    audit.record(
        db,
        actor=user,
        action="mfa.totp_disabled",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    await db.commit()
    return Response(status_code=204)


@router.post(f"{PREFIX}/recovery-codes", response_model=RecoveryCodesOut)
async def new_recovery_codes(
    body: CodeConfirmIn, request: Request, user: UserDep, state: StateDep, db: DbDep
) -> RecoveryCodesOut:
    """A new set of recovery codes (the old ones stop working), confirmed with a TOTP code."""
    row = await confirmed_factor(db, user.id)
    if row is None:
        raise conflict("no authenticator app is set up")
    attempt = _admit(state, request, user.id)
    if mfa.looks_like_recovery_code(body.code) or not await _code_ok(state, db, row, body.code):
        raise _wrong_code(400)
    state.login_throttle.succeeded(attempt)
    codes = mfa.new_recovery_codes()
    row.recovery_hashes = [mfa.recovery_hash(state.secret, c) for c in codes]
    audit.record(
        db,
        actor=user,
        action="mfa.recovery_codes",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    await db.commit()
    return RecoveryCodesOut(recovery_codes=codes)


@router.delete("/api/v1/users/{user_id}/mfa", status_code=204)
async def reset_user_mfa(user_id: str, request: Request, admin: AdminDep, db: DbDep) -> Response:
    """For a user who lost their device: their factor goes; if the policy requires one, they
    are led through enrolment at their next login."""
    user = await find_user(db, user_id)
    row = await db.get(MfaTotp, user.id)
    if row is None:
        raise conflict(f"{user.username} has no second factor")
    await db.delete(row)
    audit.record(
        db,
        actor=admin,
        action="mfa.reset",
        resource_type="user",
        resource_id=user.id,
        request=request,
    )
    await db.commit()
    return Response(status_code=204)
