"""Quota checks. Callers run them in the same transaction as the session insert, after
`lock_subjects`, so concurrent creates are serialised per user and per group
(`Lifecycle.create_session`). A refusal is a `QuotaExceeded`; problems.py answers it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.config import Settings
from streamspace.controlplane.statemachine import ACTIVE_STATES
from streamspace.db.models import Group, GroupMembership, Quota, User
from streamspace.db.models import Session as SessionRow


@dataclass(frozen=True)
class Limits:
    max_sessions: int
    max_cpu_millis: int
    max_memory_mb: int
    source: str
    max_home_mb: int | None = None


class QuotaExceeded(Exception):
    """A session the quotas do not allow: `subject` ("your quota", "group 'x''s quota") has
    `limit` of `resource` (sessions, cpu_millis or memory_mb), `used` of it are in use and the
    session asks for `asked` more (a 403 over HTTP)."""

    def __init__(self, subject: str, resource: str, limit: int, used: int, asked: int) -> None:
        self.subject = subject
        self.resource = resource
        self.limit = limit
        self.used = used
        self.asked = asked
        if resource == "sessions":
            detail = (
                f"{subject} allows {limit} active sessions and {used} are active; "
                "stop or delete one first"
            )
        else:
            unit = "mCPU" if resource == "cpu_millis" else "MiB of memory"
            detail = (
                f"{subject} allows {limit} {unit}; {used} in use, this session asks for {asked}"
            )
        super().__init__(detail)


@dataclass(frozen=True)
class Usage:
    sessions: int
    cpu_millis: int
    memory_mb: int


async def user_limits(db: AsyncSession, user: User, settings: Settings) -> Limits:
    quota = await db.scalar(select(Quota).where(Quota.user_id == user.id))
    default_home = settings.default_quota_home_mb or None
    if quota is not None:
        return Limits(
            quota.max_sessions,
            quota.max_cpu_millis,
            quota.max_memory_mb,
            "user quota",
            quota.max_home_mb or default_home,
        )
    return Limits(
        settings.default_quota_sessions,
        settings.default_quota_cpu_millis,
        settings.default_quota_memory_mb,
        "default quota",
        default_home,
    )


async def usage(db: AsyncSession, user_ids: list[str] | None = None, *, user_id: str = "") -> Usage:
    ids = user_ids if user_ids is not None else [user_id]
    row = (
        await db.execute(
            select(
                func.count(SessionRow.id),
                func.coalesce(func.sum(SessionRow.cpu_millis), 0),
                func.coalesce(func.sum(SessionRow.memory_mb), 0),
            ).where(SessionRow.owner_id.in_(ids), SessionRow.state.in_(list(ACTIVE_STATES)))
        )
    ).one()
    return Usage(int(row[0]), int(row[1]), int(row[2]))


async def group_quotas(db: AsyncSession, user: User) -> list[tuple[Group, Quota]]:
    rows = await db.execute(
        select(Group, Quota)
        .join(GroupMembership, GroupMembership.group_id == Group.id)
        .join(Quota, Quota.group_id == Group.id)
        .where(GroupMembership.user_id == user.id)
        .order_by(Group.id)
    )
    return [(g, q) for g, q in rows.all()]


async def lock_subjects(db: AsyncSession, user: User) -> None:
    """Row-lock the user and their quota'd groups (no-op on SQLite, which serialises writers)."""
    if db.get_bind().dialect.name != "postgresql":
        return
    await db.execute(select(User.id).where(User.id == user.id).with_for_update())
    group_ids = select(GroupMembership.group_id).where(GroupMembership.user_id == user.id)
    await db.execute(
        select(Group.id).where(Group.id.in_(group_ids)).order_by(Group.id).with_for_update()
    )


def _exceeds(limits: Limits, used: Usage, cpu: int, mem: int, subject: str) -> QuotaExceeded | None:
    if used.sessions + 1 > limits.max_sessions:
        return QuotaExceeded(subject, "sessions", limits.max_sessions, used.sessions, 1)
    if used.cpu_millis + cpu > limits.max_cpu_millis:
        return QuotaExceeded(subject, "cpu_millis", limits.max_cpu_millis, used.cpu_millis, cpu)
    if used.memory_mb + mem > limits.max_memory_mb:
        return QuotaExceeded(subject, "memory_mb", limits.max_memory_mb, used.memory_mb, mem)
    return None


async def check_can_create(
    db: AsyncSession, user: User, settings: Settings, cpu_millis: int, memory_mb: int
) -> int | None:
    """Refuse (QuotaExceeded) a session the quotas do not allow; otherwise the home size limit
    that applies to it: the smallest of the user's and their groups' (None: no limit)."""
    limits = await user_limits(db, user, settings)
    home_limits = [limits.max_home_mb] if limits.max_home_mb else []
    refused = _exceeds(
        limits, await usage(db, user_id=user.id), cpu_millis, memory_mb, "your quota"
    )
    if refused is None:
        for group, quota in await group_quotas(db, user):
            if quota.max_home_mb:
                home_limits.append(quota.max_home_mb)
            members = list(
                (
                    await db.scalars(
                        select(GroupMembership.user_id).where(GroupMembership.group_id == group.id)
                    )
                ).all()
            )
            glimits = Limits(quota.max_sessions, quota.max_cpu_millis, quota.max_memory_mb, "group")
            refused = _exceeds(
                glimits,
                await usage(db, members),
                cpu_millis,
                memory_mb,
                f"group {group.name!r}'s quota",
            )
            if refused:
                break
    if refused:
        raise refused
    return min(home_limits, default=None)
