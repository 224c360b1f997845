"""Who may move files in and out of sessions: per-group switches over a default setting."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.config import Settings
from streamspace.db.models import Group, GroupMembership, User

Direction = Literal["upload", "download"]


async def allowed(db: AsyncSession, settings: Settings, user: User, direction: Direction) -> bool:
    """False if any of the user's groups says False, True if one says True, else the
    setting (files_allow_upload / files_allow_download)."""
    column = Group.allow_upload if direction == "upload" else Group.allow_download
    says = set(
        (
            await db.scalars(
                select(column)
                .join(GroupMembership, GroupMembership.group_id == Group.id)
                .where(GroupMembership.user_id == user.id, column.is_not(None))
            )
        ).all()
    )
    if False in says:
        return False
    if True in says:
        return True
    return settings.files_allow_upload if direction == "upload" else settings.files_allow_download
