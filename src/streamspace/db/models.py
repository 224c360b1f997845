"""SQLAlchemy models: the single source of the schema. Alembic migrations must match them
(tests/integration/test_migrations.py fails on any drift)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from streamspace.db.types import JSONList, UTCDateTime, new_id, utcnow

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, default=utcnow, onupdate=utcnow, nullable=False
    )


class User(TimestampMixin, Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    username: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    display_name: Mapped[str] = mapped_column(String(128), default="", nullable=False)
    email: Mapped[str] = mapped_column(String(254), default="", nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(16), default="user", nullable=False)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True, nullable=False)
    idle_timeout_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token_version: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    service_account: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false(), nullable=False
    )
    """An account for automation: it has no usable password and acts only through API keys
    an admin creates for it."""
    auth_source: Mapped[str] = mapped_column(
        String(16), default="local", server_default="local", nullable=False
    )
    """`local`: a StreamSpace password (or none); `ldap`: created at a directory login, which
    alone authenticates it (its password hash is NO_PASSWORD); `saml:<provider>`: likewise, by
    that SAML identity provider; `oidc:<provider>`: likewise, by that OpenID Provider."""

    __table_args__ = (CheckConstraint("role IN ('admin', 'operator', 'user')", name="role"),)


USERNAME_CI_INDEX = Index("uq_users_username_lower", func.lower(User.username), unique=True)
"""Usernames are unique whatever their case: "Alice" cannot be created next to "alice", and a
login by any case finds the one user (the lookup uses the same expression, so this index)."""


class Group(TimestampMixin, Base):
    __tablename__ = "groups"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    description: Mapped[str] = mapped_column(String(512), default="", nullable=False)
    source: Mapped[str] = mapped_column(
        String(16), default="local", server_default="local", nullable=False
    )
    """`local`: managed by admins; `ldap`: a directory group, whose memberships each member's
    directory login sets (admins' changes to them last until that member's next login)."""
    allow_upload: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    """Members may upload files into sessions; NULL: no say (the setting decides), and any
    of a user's groups saying False denies."""
    allow_download: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    """Members may download files from sessions; same rules as allow_upload."""
    clipboard_in: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    """Text may be pasted into members' sessions (Xvnc -AcceptCutText); same rules."""
    clipboard_out: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    """Text copied in members' sessions may leave them (Xvnc -SendCutText); same rules."""
    allow_microphone: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    """Members' browsers may send microphone sound into their sessions; same rules (the
    setting's default is off)."""


class GroupMembership(Base):
    __tablename__ = "group_memberships"

    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)


class Quota(TimestampMixin, Base):
    """Limits for one user or one group (exactly one of the two)."""

    __tablename__ = "quotas"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), unique=True, nullable=True
    )
    group_id: Mapped[str | None] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), unique=True, nullable=True
    )
    max_sessions: Mapped[int] = mapped_column(Integer, nullable=False)
    max_cpu_millis: Mapped[int] = mapped_column(Integer, nullable=False)
    max_memory_mb: Mapped[int] = mapped_column(Integer, nullable=False)
    max_home_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Size limit of each persistent home of the subject; NULL: the configured default."""

    __table_args__ = (
        CheckConstraint("(user_id IS NULL) <> (group_id IS NULL)", name="exactly_one_subject"),
    )


class RefreshToken(Base):
    """Rotating refresh tokens; a family is revoked whole when a used token is replayed."""

    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    family_id: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)


class SignIn(Base):
    """One sign-in: a login and the refresh-token family it started (`RefreshToken.family_id`
    is its id), with what the account security page shows of it. Ended at once by
    `revoked_at`, or when its refresh tokens expire (`expires_at`, moved on by each refresh)."""

    __tablename__ = "sign_ins"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    method: Mapped[str] = mapped_column(String(32), default="", nullable=False)
    """How it was made: password, ldap, passkey (passwordless); `+totp`/`+passkey`/`+recovery`
    when a second factor was given."""
    user_agent: Mapped[str] = mapped_column(String(512), default="", nullable=False)
    ip: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    """Where it was last used from (the login, then each refresh)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ApiKey(Base):
    """A long-lived credential for scripts: `ssk_<id>_<secret>`; only the secret's SHA-256 is
    kept (the secret is 32 random bytes, so a slow hash would add nothing)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    secret_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    scopes: Mapped[list[str]] = mapped_column(JSONList, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """Who made it: the owner, or the admin who made it for a service account."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)


class MfaTotp(Base):
    """A user's TOTP factor: pending until its first code is confirmed."""

    __tablename__ = "mfa_totp"

    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    secret_sealed: Mapped[str] = mapped_column(Text, nullable=False)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_step: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    """The time step of the last accepted code: codes of it or earlier steps are refused."""
    recovery_hashes: Mapped[list[str]] = mapped_column(JSONList, default=list, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)


class Passkey(Base):
    """A WebAuthn credential: a second factor, or a passwordless sign-in on its own."""

    __tablename__ = "passkeys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    credential_id: Mapped[str] = mapped_column(String(1024), unique=True, nullable=False)
    """base64url, as the browser names it."""
    public_key: Mapped[str] = mapped_column(Text, nullable=False)
    """The COSE public key, base64url."""
    sign_count: Mapped[int] = mapped_column(BigInteger, default=0, nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebAuthnChallenge(Base):
    """A challenge handed to a browser, usable once (deleted when used, on any replica)."""

    __tablename__ = "webauthn_challenges"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    purpose: Mapped[str] = mapped_column(String(16), nullable=False)
    challenge: Mapped[str] = mapped_column(String(128), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)


class SamlLogin(Base):
    """One SAML sign-in under way, from the AuthnRequest to the tokens, usable once.

    The IdP posts the Response cross-site, where the browser sends no SameSite cookie; so the
    Response is checked and kept here (its assertion id unique: a replayed one is refused), and
    the tokens are given on the redirect that follows, to the browser holding the cookie set
    when this sign-in began (`browser_hash`)."""

    __tablename__ = "saml_logins"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The AuthnRequest's ID: the Response must say InResponseTo it."""
    provider: Mapped[str] = mapped_column(String(16), nullable=False)
    browser_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    assertion_id: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    grant_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    identity: Mapped[dict[str, Any] | None] = mapped_column(JSONList, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Template(TimestampMixin, Base):
    __tablename__ = "templates"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    display_name: Mapped[str] = mapped_column(String(128), nullable=False)
    category: Mapped[str] = mapped_column(String(64), nullable=False)
    description: Mapped[str] = mapped_column(Text, default="", nullable=False)
    icon: Mapped[str] = mapped_column(String(128), default="", nullable=False)
    tags: Mapped[list[str]] = mapped_column(JSONList, default=list, nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONList, nullable=False)
    source: Mapped[str] = mapped_column(String(16), default="api", nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, nullable=False)


class Agent(TimestampMixin, Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    cluster_id: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    cluster_name: Mapped[str] = mapped_column(String(128), nullable=False)
    region: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    backend: Mapped[str] = mapped_column(String(16), nullable=False)
    capacity_sessions: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    capacity_cpu_millis: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    capacity_memory_mb: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    load_sessions: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    load_cpu_millis: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    load_memory_mb: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    templates: Mapped[list[str]] = mapped_column(JSONList, default=list, nullable=False)
    healthy: Mapped[bool] = mapped_column(Boolean, default=True, nullable=False)
    health_detail: Mapped[str] = mapped_column(String(512), default="", nullable=False)
    draining: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    credential_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    connected_replica: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    version: Mapped[str] = mapped_column(String(32), default="", nullable=False)
    isolation: Mapped[str] = mapped_column(String(32), default="", nullable=False)
    """How the agent separates sessions from itself and each other (protocol.Isolation)."""
    isolation_detail: Mapped[str] = mapped_column(String(512), default="", nullable=False)
    limits_enforced: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)


class JoinToken(Base):
    __tablename__ = "join_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_by: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    agent_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)


class Session(TimestampMixin, Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    template_name: Mapped[str] = mapped_column(String(64), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    agent_id: Mapped[str | None] = mapped_column(
        ForeignKey("agents.id", ondelete="SET NULL"), nullable=True, index=True
    )
    cluster_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    requested_cluster_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tags: Mapped[list[str]] = mapped_column(JSONList, default=list, nullable=False)
    cpu_millis: Mapped[int] = mapped_column(Integer, nullable=False)
    memory_mb: Mapped[int] = mapped_column(Integer, nullable=False)
    persistent_home: Mapped[bool] = mapped_column(Boolean, default=True, nullable=False)
    home_limit_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The owner's home size limit when the session was created (NULL: none)."""
    idle_timeout_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    max_duration_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    endpoint_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    endpoint_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failure_reason: Mapped[str] = mapped_column(Text, default="", nullable=False)
    status_message: Mapped[str] = mapped_column(Text, default="", nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_activity: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)

    __table_args__ = (
        Index("ix_sessions_owner_created", "owner_id", "created_at"),
        Index("ix_sessions_state", "state"),
        UniqueConstraint("owner_id", "idempotency_key", name="uq_sessions_owner_idempotency"),
    )


class CommandStatus(StrEnum):
    """An agent command's `status` column. The values are what is stored: renaming one needs a
    migration that rewrites the rows."""

    PENDING = "pending"
    """Committed, not yet delivered to the agent."""
    SENT = "sent"
    """Delivered to the agent (or a replica holding it); re-sent until a result or timeout."""
    ACKED = "acked"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    """No result within command_max_attempts sends; a late start/wake success still counts."""


OPEN_COMMAND_STATUSES: tuple[str, ...] = tuple(
    s.value for s in (CommandStatus.PENDING, CommandStatus.SENT, CommandStatus.ACKED)
)
"""Not settled yet: the command may still be (re-)sent and its result is awaited."""


class AgentCommand(TimestampMixin, Base):
    __tablename__ = "agent_commands"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    agent_id: Mapped[str] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), nullable=False, index=True
    )
    session_id: Mapped[str | None] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), nullable=True, index=True
    )
    action: Mapped[str] = mapped_column(String(16), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONList, default=dict, nullable=False)
    status: Mapped[str] = mapped_column(
        String(16), default=CommandStatus.PENDING.value, nullable=False
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    error: Mapped[str] = mapped_column(Text, default="", nullable=False)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deadline: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_agent_commands_status", "status"),)


class SessionEvent(Base):
    __tablename__ = "session_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSONList, default=dict, nullable=False)


class AuditLog(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, nullable=False, index=True)
    actor_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    actor: Mapped[str] = mapped_column(String(128), default="", nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    resource_type: Mapped[str] = mapped_column(String(32), nullable=False)
    resource_id: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONList, default=dict, nullable=False)
    ip: Mapped[str] = mapped_column(String(64), default="", nullable=False)
    status_code: Mapped[int] = mapped_column(Integer, default=0, nullable=False)


class Lease(Base):
    """Which replica runs which background loop; leases expire so a dead holder is replaced."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
