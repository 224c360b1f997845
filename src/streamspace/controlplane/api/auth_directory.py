"""The directory half of login and refresh (the routes are in `auth.py`).

Which half a login takes: a username with a local account (`auth_source = 'local'`) is a
local login whatever the directory says, so a directory entry can never take over a local
account, the bootstrap admin or a service account. Every other username, when directory login
is configured, is asked of the directory. A failure answers exactly as a wrong local password
does (same 401 text, same throttle), and the dummy argon2 verification of an unknown local name
is done here too, so the work a login costs does not tell whether a name is local.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace import logs
from streamspace.config import Settings
from streamspace.controlplane import audit, security
from streamspace.controlplane.directory import DirectoryUnavailable, DirectoryUser
from streamspace.controlplane.problems import Problem
from streamspace.controlplane.provisioning import (
    LDAP,
    NotProvisioned,
    Provisioned,
    ldap_origin,
    provision,
)
from streamspace.controlplane.state import AppState
from streamspace.db.models import User

log = logs.get_logger("streamspace.auth")

PROVISION_ATTEMPTS = 5
"""Each failed attempt means another login committed a row this one wanted, so a few are
enough even for a burst of first logins sharing groups."""


def uses_directory(state: AppState, user: User | None) -> bool:
    return state.directory is not None and (user is None or user.auth_source == LDAP)


def unavailable() -> Problem:
    return Problem(
        503,
        "Service unavailable",
        "the user directory cannot be reached right now, so directory accounts cannot log in; "
        "try again later (local accounts still can)",
        kind="directory-unavailable",
    )


async def ask_directory(
    request: Request, state: AppState, db: AsyncSession, username: str, password: str
) -> DirectoryUser | None:
    """The user's entry and groups when the directory vouches for (`username`, `password`)."""
    assert state.directory is not None
    await asyncio.to_thread(security.verify_password, security.dummy_hash(), password)
    try:
        return await state.directory.authenticate(username, password)
    except DirectoryUnavailable as exc:
        log.warning("directory_unavailable", url=state.directory.url, reason=str(exc))
        audit.record(
            db,
            actor=None,
            action="auth.login_failed",
            resource_type="user",
            resource_id=username,
            request=request,
            status_code=503,
            method="ldap",
        )
        await db.commit()
        raise unavailable() from None


async def provision_login(
    db: AsyncSession, entry: DirectoryUser, settings: Settings
) -> Provisioned | None:
    """The entry's account, created or brought up to date, in the caller's transaction; None
    when it cannot have one (the reason is logged)."""
    return await provision_retrying(
        db,
        lambda: provision(db, entry, ldap_origin(settings)),
        "ldap_login_refused",
        entry.username,
    )


async def provision_retrying(
    db: AsyncSession,
    attempt_once: Callable[[], Awaitable[Provisioned]],
    refused_event: str,
    username: str,
) -> Provisioned | None:
    """`attempt_once` until it settles the account (directory and OpenID logins share this);
    None when the account cannot be had (the reason is logged as `refused_event`)."""
    for attempt in range(PROVISION_ATTEMPTS):
        try:
            return await attempt_once()
        except NotProvisioned as exc:
            log.warning(refused_event, username=username, reason=str(exc))
            return None
        except IntegrityError:
            # Another login committed the same user, group or membership meanwhile (PostgreSQL;
            # SQLite's writer turn orders them): the next attempt sees and keeps it.
            await db.rollback()
            if attempt == PROVISION_ATTEMPTS - 1:
                raise
    return None


async def still_in_directory(state: AppState, user: User) -> bool:
    """For a refresh of a directory user: does the user filter still find them? A removed
    entry, or one the filter now excludes (a disabled account), ends the sign-in."""
    if state.directory is None:
        return False
    try:
        found = await state.directory.lookup(user.username)
    except DirectoryUnavailable as exc:
        log.warning("directory_unavailable", url=state.directory.url, reason=str(exc))
        raise unavailable() from None
    return found is not None and found.username.lower() == user.username.lower()
