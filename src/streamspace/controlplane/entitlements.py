"""Who may launch a template: everyone, or only the members of the groups it lists.

A template's `allowed_groups` (in its YAML file under templates/ or set through the templates
API) names StreamSpace groups; empty means everyone. Membership is read from
`group_memberships` whatever made it: an admin, or a directory login that synchronised the
user's LDAP groups. So a user a directory drops from a group loses what that group entitled
them to at their next login, when the synchronisation leaves the group. Admins may launch
every template (they can edit any of them anyway).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace.controlplane.catalog import TemplateSpec
from streamspace.db.models import Group, GroupMembership, User


class NotEntitled(Exception):
    """The user is in none of the groups the template is limited to (a 403 over HTTP)."""

    def __init__(self, template: str, groups: list[str]) -> None:
        self.template = template
        self.groups = groups
        listed = ", ".join(repr(g) for g in groups)
        super().__init__(
            f"template {template!r} may only be launched by members of the groups {listed}; "
            "ask an admin to add you to one of them"
        )


async def group_names(db: AsyncSession, user_id: str) -> set[str]:
    names = await db.scalars(
        select(Group.name)
        .join(GroupMembership, GroupMembership.group_id == Group.id)
        .where(GroupMembership.user_id == user_id)
    )
    return set(names)


def entitled(spec: TemplateSpec, user: User, groups: set[str]) -> bool:
    if user.role == "admin" or not spec.allowed_groups:
        return True
    return bool(groups.intersection(spec.allowed_groups))


async def require(db: AsyncSession, user: User, spec: TemplateSpec) -> None:
    """Raises NotEntitled unless `user` may launch `spec`."""
    if user.role == "admin" or not spec.allowed_groups:
        return
    if not entitled(spec, user, await group_names(db, user.id)):
        raise NotEntitled(spec.name, list(spec.allowed_groups))
