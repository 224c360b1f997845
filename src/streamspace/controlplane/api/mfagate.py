"""Whether a login that passed its password step needs a second one, and the answer that
starts it: problem `mfa-required` (give a code) or `mfa-enrolment-required` (policy needs a
factor this user has not set up), each with a short-lived `mfa_token`."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.config import Settings
from streamspace.controlplane import mfa
from streamspace.controlplane.problems import Problem
from streamspace.db.models import Group, GroupMembership, MfaTotp, Passkey, User


async def required_by_policy(db: AsyncSession, settings: Settings, user: User) -> bool:
    if user.role in settings.mfa_required_roles:
        return True
    if not settings.mfa_required_groups:
        return False
    names = await db.scalars(
        select(Group.name)
        .join(GroupMembership, GroupMembership.group_id == Group.id)
        .where(GroupMembership.user_id == user.id)
    )
    return bool(set(names) & set(settings.mfa_required_groups))


async def confirmed_factor(db: AsyncSession, user_id: str) -> MfaTotp | None:
    row = await db.get(MfaTotp, user_id)
    return row if row is not None and row.confirmed_at is not None else None


async def second_factors(db: AsyncSession, user_id: str) -> list[str]:
    """The ways this user can give a second step: `totp` and `recovery`, `webauthn`."""
    methods = []
    if await confirmed_factor(db, user_id) is not None:
        methods += ["totp", "recovery"]
    if await db.scalar(select(func.count()).where(Passkey.user_id == user_id)):
        methods.append("webauthn")
    return methods


async def demand_second_step(
    db: AsyncSession, settings: Settings, secret: str, user: User, delivery: str
) -> None:
    """Raises the problem that starts the second step, or returns when none is needed."""
    methods = await second_factors(db, user.id)
    if methods:
        token = mfa.make_mfa_token(
            secret, mfa.Pending(user.id, user.token_version, "verify", delivery)
        )
        raise Problem(
            401,
            "Second factor required",
            "confirm with your second factor (a code from your authenticator app, a recovery "
            "code, or a passkey) at POST /api/v1/auth/mfa/verify",
            kind="mfa-required",
            mfa_token=token,
            methods=methods,
            expires_in=mfa.MFA_TOKEN_SECONDS,
        )
    if await required_by_policy(db, settings, user):
        token = mfa.make_mfa_token(
            secret, mfa.Pending(user.id, user.token_version, "enrol", delivery)
        )
        raise Problem(
            401,
            "Second factor enrolment required",
            "your account must use a second factor: set up an authenticator app "
            "(POST /api/v1/auth/mfa/totp with this mfa_token, then confirm a code)",
            kind="mfa-enrolment-required",
            mfa_token=token,
            expires_in=mfa.MFA_TOKEN_SECONDS,
        )
