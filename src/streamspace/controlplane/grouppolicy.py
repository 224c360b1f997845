"""What members of a group may do in their sessions: per-group switches over a default setting.

Each switch is a nullable column of `groups` (NULL: the group has no say). A user is denied if
any of their groups says False, allowed if one says True, and otherwise the setting decides:
the most restrictive group wins, whatever the identity source made the membership.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.config import Settings
from streamspace.db.models import Group, GroupMembership

Direction = Literal["upload", "download"]
Switch = Literal["upload", "download", "clipboard_in", "clipboard_out", "microphone"]

_COLUMNS = {
    "upload": Group.allow_upload,
    "download": Group.allow_download,
    "clipboard_in": Group.clipboard_in,
    "clipboard_out": Group.clipboard_out,
    "microphone": Group.allow_microphone,
}


def default(settings: Settings, switch: Switch) -> bool:
    return {
        "upload": settings.files_allow_upload,
        "download": settings.files_allow_download,
        "clipboard_in": settings.clipboard_allow_in,
        "clipboard_out": settings.clipboard_allow_out,
        "microphone": settings.microphone_allow,
    }[switch]


async def allowed(db: AsyncSession, settings: Settings, user_id: str, switch: Switch) -> bool:
    column = _COLUMNS[switch]
    says = set(
        (
            await db.scalars(
                select(column)
                .join(GroupMembership, GroupMembership.group_id == Group.id)
                .where(GroupMembership.user_id == user_id, column.is_not(None))
            )
        ).all()
    )
    if False in says:
        return False
    if True in says:
        return True
    return default(settings, switch)
