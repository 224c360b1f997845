"""Just-in-time accounts for directory and single sign-on users: what a successful login writes.

An `Origin` says where an account comes from: the LDAP directory (`auth_source = 'ldap'`,
groups with `source = 'ldap'`) or a SAML identity provider (`saml:<id>`, groups `saml`). The
first login creates the user (no usable password); every login
then copies the display name and email, sets the role from the configured admin and operator
groups, and makes the user's memberships of groups managed by that kind of origin match the
groups it vouches for, creating the groups that do not exist yet. Groups admins made
here (`source = 'local'`) are never joined, left or changed by a login, even when a directory
group has the same name: that name is skipped and logged.

A local account always keeps its name: when the directory's username is one a local account
has, the login is refused rather than merged into it (see docs/identity.md, "Precedence").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace import logs
from streamspace.config import Settings
from streamspace.controlplane.directory import DirectoryUser
from streamspace.controlplane.security import NO_PASSWORD
from streamspace.db.models import Group, GroupMembership, User

log = logs.get_logger("streamspace.provisioning")

LDAP = "ldap"
SAML = "saml"
OIDC = "oidc"
OIDC_PREFIX = "oidc:"
LOCAL = "local"


def uses_outside_password(auth_source: str) -> bool:
    """Whether the account's credentials live elsewhere (a directory, an identity provider):
    it has no password here to log in with or to change."""
    return auth_source != LOCAL


VALID_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
"""What the API accepts for a username or a group name (api.schemas); a directory name outside
it cannot become one."""


_NOT_IN_NAMES = re.compile(r"[^a-zA-Z0-9._-]+")


def group_name(directory_name: str) -> str | None:
    """The StreamSpace name of a directory group: what a group name may not hold becomes `-`
    (Active Directory's "Domain Users" is `Domain-Users`); None when nothing usable is left."""
    name = _NOT_IN_NAMES.sub("-", directory_name).lstrip("._-")[:64]
    return name if VALID_NAME.match(name) else None


class NotProvisioned(Exception):
    """The directory vouched for the user, but they cannot have an account here; the reason
    is for the log (the client is told only that the login failed)."""


@dataclass
class Provisioned:
    user: User
    created: bool
    old_role: str
    groups_joined: list[str] = field(default_factory=list)
    groups_left: list[str] = field(default_factory=list)

    @property
    def role_changed(self) -> bool:
        return not self.created and self.old_role != self.user.role


@dataclass(frozen=True)
class Origin:
    """Who vouches for an account: its `auth_source`, the `source` of the groups its logins
    sync, and the groups whose members get a role above `user`."""

    account_source: str
    group_source: str
    admin_group: str = ""
    operator_group: str = ""


def ldap_origin(settings: Settings) -> Origin:
    return Origin(LDAP, LDAP, settings.ldap_admin_group, settings.ldap_operator_group)


def role_for(groups: tuple[str, ...], origin: Origin) -> str:
    names = {g.casefold() for g in groups}
    if origin.admin_group and origin.admin_group.casefold() in names:
        return "admin"
    if origin.operator_group and origin.operator_group.casefold() in names:
        return "operator"
    return "user"


async def provision(
    db: AsyncSession, entry: DirectoryUser, origin: Origin, role: str | None = None
) -> Provisioned:
    """In the caller's transaction: the user's account, made to match what the origin says."""
    if not VALID_NAME.match(entry.username):
        raise NotProvisioned(
            f"username {entry.username!r} from {origin.account_source} is not valid"
        )
    user = await db.scalar(select(User).where(func.lower(User.username) == entry.username.lower()))
    if role is None:  # OIDC settles it from the provider's groups before they are mapped
        role = role_for(entry.groups, origin)
    if user is None:
        user = User(
            username=entry.username, password_hash=NO_PASSWORD, auth_source=origin.account_source
        )
        db.add(user)
        created, old_role = True, role
    elif user.auth_source != origin.account_source:
        raise NotProvisioned(f"an account of {user.auth_source} is named {user.username!r}")
    else:
        created, old_role = False, user.role
    user.display_name = entry.display_name[:128]
    user.email = entry.email[:254]
    if not created and role != user.role:
        user.token_version += 1  # as an admin's role change: access tokens end, a refresh renews
    user.role = role
    await db.flush()
    done = Provisioned(user=user, created=created, old_role=old_role)
    await _sync_groups(db, user, entry.groups, origin.group_source, done)
    return done


async def _sync_groups(
    db: AsyncSession, user: User, names: tuple[str, ...], source: str, done: Provisioned
) -> None:
    wanted: dict[str, str] = {}
    for directory_name in names:
        name = group_name(directory_name)
        if name is not None:
            wanted.setdefault(name.casefold(), name)
        else:
            log.warning(
                "synced_group_skipped", user_id=user.id, group=directory_name[:100], why="bad name"
            )
    existing = {
        g.name.casefold(): g
        for g in (
            await db.scalars(
                select(Group).where(func.lower(Group.name).in_([n.lower() for n in wanted]))
            )
        ).all()
    }
    groups: dict[str, Group] = {}
    for key, name in wanted.items():
        group = existing.get(key)
        if group is None:
            group = Group(name=name, description=f"from {source}", source=source)
            db.add(group)
        elif group.source != source:
            log.warning(
                "synced_group_skipped", user_id=user.id, group=name, why=f"a {group.source} group"
            )
            continue
        groups[group.name] = group
    await db.flush()
    member_of = {
        g.id: g.name
        for g in (
            await db.scalars(
                select(Group)
                .join(GroupMembership, GroupMembership.group_id == Group.id)
                .where(GroupMembership.user_id == user.id, Group.source == source)
            )
        ).all()
    }
    keep = {g.id for g in groups.values()}
    leave = [gid for gid in member_of if gid not in keep]
    if leave:
        await db.execute(
            delete(GroupMembership).where(
                GroupMembership.user_id == user.id, GroupMembership.group_id.in_(leave)
            )
        )
        done.groups_left = sorted(member_of[gid] for gid in leave)
    for group in groups.values():
        if group.id not in member_of:
            db.add(GroupMembership(group_id=group.id, user_id=user.id))
            done.groups_joined.append(group.name)
    done.groups_joined.sort()
    await db.flush()
