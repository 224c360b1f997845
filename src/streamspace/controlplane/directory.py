"""The LDAP / Active Directory client behind directory login (ldap3).

A login is: bind as the service account, search the user with the configured filter (the typed
name escaped, so it cannot widen the filter), bind as the entry found with the typed password on
a connection of its own, then read the user's groups with the service account. The password is
only ever sent in that one bind, over TLS when StartTLS or `ldaps://` is configured, and an
empty one is never sent at all: LDAP treats a bind with a DN and no password as an
unauthenticated bind that succeeds (RFC 4513 5.1.2).

ldap3 is synchronous, so every call runs in a worker thread (a pool of `MAX_CALLS`); each
connection is bounded by `ldap_timeout_seconds` for the connect and for every answer. Anything
that keeps the directory from answering (network, TLS, a refused service bind, a missing search
base) is `DirectoryUnavailable`; the login route answers it with a 503, not a 401, so an outage
is not mistaken for a wrong password.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from streamspace import logs
from streamspace.config import Settings

log = logs.get_logger("streamspace.directory")

_ABSENT_DN_RDN = "cn=streamspace-absent-user"
"""The bind made for a name the directory does not have, so that answering it takes the same
round trips as a wrong password for a name it has."""


MAX_CALLS = 8
"""Directory calls one replica makes at once; more logins wait for a free one."""


class DirectoryUnavailable(Exception):
    """The directory could not be asked; the reason is for the logs, not for the client."""


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    username: str
    display_name: str
    email: str
    groups: tuple[str, ...] = ()


def _first(attributes: dict[str, Any], name: str) -> str:
    value = attributes.get(name)
    if isinstance(value, list):
        value = value[0] if value else ""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return "" if value is None else str(value)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _close(conn: ldap3.Connection) -> None:
    """Unbind, where the socket is still there to say it on (a failed handshake closes it)."""
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()


class Directory:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.ldap_url
        self.timeout = settings.ldap_timeout_seconds
        ca = str(settings.ldap_ca_file) if settings.ldap_ca_file is not None else None
        self._tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca)
        self._pool = ThreadPoolExecutor(max_workers=MAX_CALLS, thread_name_prefix="ldap")
        self.tls = settings.ldap_start_tls or self._server().ssl

    @classmethod
    def from_settings(cls, settings: Settings) -> Directory | None:
        """None when directory login is off; logs how it is set up (never the password)."""
        if not settings.ldap_url:
            return None
        directory = cls(settings)
        log.event(
            "ldap_configured",
            url=settings.ldap_url,
            start_tls=settings.ldap_start_tls,
            ca_file=str(settings.ldap_ca_file or "system"),
            bind_dn=settings.ldap_bind_dn or "anonymous",
            user_base_dn=settings.ldap_user_base_dn,
            group_base_dn=settings.ldap_group_base_dn,
        )
        if not directory.tls:
            log.warning(
                "ldap_cleartext",
                url=settings.ldap_url,
                why="neither ldaps:// nor StartTLS: directory passwords cross the network "
                "unencrypted; set STREAMSPACE_LDAP_START_TLS or use ldaps://",
            )
        return directory

    async def authenticate(self, username: str, password: str) -> DirectoryUser | None:
        """The user's entry and groups when `password` is theirs; None for a wrong password,
        a name the directory does not have (or the filter excludes), or an ambiguous one."""
        return await self._run(self._authenticate, username, password)

    async def lookup(self, username: str) -> DirectoryUser | None:
        """Whether the filter still finds the user (a refresh asks this): their entry, without
        groups, or None."""
        return await self._run(self._lookup, username)

    async def _run(
        self, call: Callable[..., DirectoryUser | None], *args: str
    ) -> DirectoryUser | None:
        # Threads of their own, not asyncio's default pool: a directory that hangs until the
        # timeout must not hold the threads local logins hash their passwords in.
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, *args)

    def _server(self) -> ldap3.Server:
        """A new one for each connection: an ldap3 Server remembers an address that failed
        and refuses it for minutes, which would outlast a directory's restart."""
        return ldap3.Server(
            self.url, tls=self._tls, connect_timeout=self.timeout, get_info=ldap3.NONE
        )

    def _connect(self, user: str | None, password: str | None) -> ldap3.Connection:
        conn = ldap3.Connection(
            self._server(),
            user=user,
            password=password,
            # ldap3 packs it into SO_RCVTIMEO as whole seconds
            receive_timeout=math.ceil(self.timeout),
            read_only=True,
            auto_referrals=False,
            raise_exceptions=False,
        )
        try:
            conn.open()
            # Small requests on a TLS socket otherwise wait out the peer's delayed ACK (Nagle):
            # ~40 ms a round trip, ~100 ms a login.
            conn.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.settings.ldap_start_tls:
                conn.start_tls()
        except LDAPException as exc:
            _close(conn)
            raise DirectoryUnavailable(_reason(exc)) from None
        return conn

    def _service(self) -> ldap3.Connection:
        conn = self._connect(self.settings.ldap_bind_dn or None, self.settings.ldap_bind_password)
        try:
            bound = conn.bind()
        except LDAPException as exc:
            _close(conn)
            raise DirectoryUnavailable(_reason(exc)) from None
        if not bound:
            why = conn.result.get("description", "refused")
            _close(conn)
            raise DirectoryUnavailable(f"the service account's bind was refused: {why}")
        return conn

    def _search(
        self,
        conn: ldap3.Connection,
        base: str,
        search_filter: str,
        attributes: list[str],
        size_limit: int = 0,
    ) -> list[dict[str, Any]]:
        try:
            conn.search(
                base,
                search_filter,
                search_scope=ldap3.SUBTREE,
                attributes=attributes,
                size_limit=size_limit,
                time_limit=math.ceil(self.timeout),
            )
        except LDAPException as exc:
            raise DirectoryUnavailable(_reason(exc)) from None
        code = conn.result.get("description", "")
        if code not in ("success", "sizeLimitExceeded"):
            raise DirectoryUnavailable(f"search under {base!r} failed: {code}")
        return [r for r in conn.response or [] if r.get("type") == "searchResEntry"]

    def _find(self, conn: ldap3.Connection, username: str) -> DirectoryUser | None:
        s = self.settings
        search_filter = s.ldap_user_filter.replace("{username}", escape_filter_chars(username))
        attributes = [
            s.ldap_username_attribute,
            s.ldap_display_name_attribute,
            s.ldap_email_attribute,
        ]
        # Two are enough to tell that the filter is ambiguous.
        found = self._search(conn, s.ldap_user_base_dn, search_filter, attributes, size_limit=2)
        if len(found) != 1:
            if found:
                log.warning("ldap_user_ambiguous", username=username, entries=len(found))
            return None
        attrs = found[0].get("attributes") or {}
        name = _first(attrs, s.ldap_username_attribute)
        if not name:
            log.warning("ldap_user_without_username", dn=found[0]["dn"])
            return None
        return DirectoryUser(
            dn=found[0]["dn"],
            username=name,
            display_name=_first(attrs, s.ldap_display_name_attribute),
            email=_first(attrs, s.ldap_email_attribute),
        )

    def _bind_as(self, dn: str, password: str) -> bool:
        conn = self._connect(dn, password)
        try:
            return bool(conn.bind())
        except LDAPException as exc:
            raise DirectoryUnavailable(_reason(exc)) from None
        finally:
            _close(conn)

    def _groups(self, conn: ldap3.Connection, user: DirectoryUser) -> tuple[str, ...]:
        s = self.settings
        if not s.ldap_group_base_dn:
            return ()
        search_filter = s.ldap_group_filter.replace("{dn}", escape_filter_chars(user.dn))
        search_filter = search_filter.replace("{username}", escape_filter_chars(user.username))
        found = self._search(
            conn, s.ldap_group_base_dn, search_filter, [s.ldap_group_name_attribute]
        )
        names = (_first(g.get("attributes") or {}, s.ldap_group_name_attribute) for g in found)
        return tuple(sorted({n for n in names if n}))

    def _authenticate(self, username: str, password: str) -> DirectoryUser | None:
        if not password:
            return None
        conn = self._service()
        try:
            user = self._find(conn, username)
            if user is None:
                self._bind_as(
                    f"{_ABSENT_DN_RDN},{self.settings.ldap_user_base_dn}", secrets.token_urlsafe(32)
                )
                return None
            if not self._bind_as(user.dn, password):
                return None
            return DirectoryUser(
                dn=user.dn,
                username=user.username,
                display_name=user.display_name,
                email=user.email,
                groups=self._groups(conn, user),
            )
        finally:
            _close(conn)

    def _lookup(self, username: str) -> DirectoryUser | None:
        conn = self._service()
        try:
            return self._find(conn, username)
        finally:
            _close(conn)
