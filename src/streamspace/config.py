"""The one settings object. Every knob is an env var `STREAMSPACE_<NAME>`.

Documented in docs/configuration.md."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "streamspace"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMSPACE_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str = ""
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0)
    redis_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    advertise_url: str = ""
    """This replica's own URL as agents can reach it (multi-replica stream dial-back)."""
    replica_id: str = ""

    secret_key: str = ""
    admin_password: str = ""
    access_token_ttl_seconds: int = 900
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    connection_recheck_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often each replica re-reads the users it holds viewer WebSockets and "
        "event streams for, closing those whose sign-in was revoked in a way no message "
        "announced (a lost Redis message, a change made straight in the database).",
    )
    refresh_token_ttl_seconds: int = 7 * 24 * 3600
    login_failures_before_delay: int = Field(
        default=5,
        ge=1,
        description="Failed logins one client IP may make for one username before each further "
        "attempt has to wait.",
    )
    login_delay_seconds: float = Field(
        default=1.0,
        gt=0,
        description="The first wait after those failures; it doubles with each further failure.",
    )
    login_max_delay_seconds: float = Field(
        default=900.0, gt=0, description="The longest wait one (username, client IP) pair gets."
    )
    login_ip_failures_per_minute: int = Field(
        default=60,
        ge=1,
        description="Failed logins one client IP (an IPv6 /64) may make per minute, over all "
        "usernames. Successful logins do not count, so users behind one NAT are not locked out.",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated IPs or CIDRs of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto headers are believed. Empty: forwarded headers are ignored and the "
        "TCP peer is the client.",
    )
    public_url: str = Field(
        default="",
        description="The URL browsers use to reach the web UI (e.g. https://streamspace.example). "
        "Browser WebSockets and the event stream are accepted only from its origin. Empty: only "
        "from the origin the request itself names in its Host header (same-origin).",
    )
    user_requests_per_second: float = Field(
        default=30.0,
        ge=0,
        description="Sustained API requests each user may make per second on each replica "
        "(token bucket; 0 turns the limit off). Over it a request gets 429 with Retry-After.",
    )
    user_request_burst: int = Field(
        default=300,
        ge=1,
        description="Requests a user may make at once before user_requests_per_second applies.",
    )
    user_concurrent_creates: int = Field(
        default=2,
        ge=0,
        description="Session creations one user may have under way at once on each replica "
        "(0: no limit); more get 429 with Retry-After.",
    )

    metrics_token: str = Field(
        default="",
        description="When set, GET /metrics needs `Authorization: Bearer <token>` (from any "
        "client, loopback included); unset, /metrics is open (see metrics_loopback_only).",
    )
    metrics_loopback_only: bool = Field(
        default=False,
        description="Without a metrics token, serve /metrics only to clients on this machine "
        "that came through no proxy. `streamspace up` turns it on.",
    )

    templates_dir: Path | None = None
    max_body_bytes: int = 1_048_576

    stream_ticket_ttl_seconds: int = 30
    agent_heartbeat_seconds: float = 10.0
    agent_stale_after_seconds: float = 30.0
    agent_offline_after_seconds: float = 90.0
    join_token_ttl_seconds: int = 3600

    command_timeout_seconds: float = 30.0
    command_max_attempts: int = 3
    starting_timeout_seconds: float = 150.0
    stopping_timeout_seconds: float = 120.0
    queue_timeout_seconds: float = 600.0
    loop_interval_seconds: float = 2.0
    idle_check_interval_seconds: float = 15.0
    scheduler_strategy: str = "least_loaded"

    default_idle_timeout_seconds: int = 3600
    default_max_duration_seconds: int = 12 * 3600
    default_quota_sessions: int = 5
    default_quota_cpu_millis: int = 8000
    default_quota_memory_mb: int = 16384

    local_agent: bool = True
    agent_max_sessions: int = 10
    agent_cpu_millis: int = 8000
    agent_memory_mb: int = 16384
    agent_max_concurrent_commands: int = 8
    local_insecure_shared_user: bool = Field(
        default=False,
        description=(
            "Run local sessions as the agent's own user without a sandbox (a single-person "
            "laptop only): loudly logged and shown in red to admins"
        ),
    )
    local_uid_range: str = Field(
        default="200000-265535",
        description="Uids (and gids) given to users' local sessions when the agent is root",
    )
    local_enforce_limits: bool = Field(
        default=True,
        description="Apply each local session's CPU and memory limits through cgroups",
    )
    default_quota_home_mb: int = Field(
        default=0, ge=0, description="Size limit of each persistent home (0: no limit)"
    )

    log_format: str = "kv"
    log_level: str = "INFO"

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [item for item in (part.strip() for part in value.split(",")) if item]
        if isinstance(value, list):
            for item in value:
                try:
                    ipaddress.ip_network(str(item), strict=False)
                except ValueError:
                    raise ValueError(
                        f"trusted_proxies: {item!r} is not an IP address or CIDR network"
                    ) from None
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"public_url: {value!r} is not an http:// or https:// URL")
        return value.rstrip("/")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'streamspace.db'}"

    def resolved_templates_dir(self) -> Path:
        if self.templates_dir is not None:
            return self.templates_dir
        repo_templates = Path(__file__).resolve().parents[2] / "templates"
        if repo_templates.is_dir():
            return repo_templates
        return Path(__file__).resolve().parent / "templates"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
