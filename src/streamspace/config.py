"""The one settings object. Every knob is an env var `STREAMSPACE_<NAME>`.

docs/configuration.md is generated from the field descriptions here:
`streamspace config docs > docs/configuration.md`."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class SamlProvider(BaseModel):
    """One SAML 2.0 identity provider users may sign in with (`STREAMSPACE_SAML_PROVIDERS`)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,10}$",
        description="Short name in the SP's URLs and in accounts' `auth_source` (`saml:<id>`).",
    )
    name: str = Field(min_length=1, max_length=64, description='Shown as "Sign in with <name>".')
    idp_metadata_url: str = Field(
        pattern=r"^https?://",
        description="The IdP's metadata (entity id, SSO URL, signing certificates); read at the "
        "first login and again every 10 minutes, so a rotated IdP key is picked up.",
    )
    sp_entity_id: str = Field(
        default="",
        description="This SP's entity id; empty: `<public_url>/api/v1/auth/saml/<id>/metadata`.",
    )
    username_attribute: str = Field(
        default="uid", description="Attribute (name or friendly name) that is the username."
    )
    email_attribute: str = Field(default="mail", description="Attribute copied into the email.")
    display_name_attribute: str = Field(
        default="displayName", description="Attribute copied into the display name."
    )
    groups_attribute: str = Field(
        default="memberOf", description="Attribute whose values become StreamSpace groups."
    )
    admin_group: str = Field(default="", description="Members of this IdP group are admins.")
    operator_group: str = Field(default="", description="Members of this IdP group are operators.")


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "streamspace"


class OidcProvider(BaseModel):
    """One OpenID Provider users may sign in with (an item of `STREAMSPACE_OIDC_PROVIDERS`)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,10}$",
        description="Short name in URLs and in accounts' `auth_source` (`oidc:<id>`): lowercase "
        "letters, digits and `-`, at most 11.",
    )
    name: str = Field(
        min_length=1, max_length=64, description='Shown on the button: "Sign in with <name>".'
    )
    issuer: str = Field(
        description="The issuer URL; its `/.well-known/openid-configuration` is read at the "
        "first login, and ID tokens must name exactly this `iss`."
    )
    client_id: str = Field(min_length=1, description="The client registered at the provider.")
    client_secret: str = Field(
        default="", description="Its secret (sent with HTTP Basic); empty for a public client."
    )
    scopes: list[str] = Field(
        default=["openid", "profile", "email"], description="Scopes asked for (`openid` added)."
    )
    username_claim: str = Field(
        default="preferred_username",
        description="The ID token / userinfo claim that names the account here.",
    )
    groups_claim: str = Field(default="groups", description="The claim holding group names.")
    allowed_email_domains: list[str] = Field(
        default=[],
        description="When set, only users whose verified `email` is in one of these domains "
        "may sign in.",
    )
    group_map: dict[str, str] = Field(
        default={},
        description="Provider group → StreamSpace group. Only mapped groups are joined; the "
        "provider's other groups are ignored.",
    )
    admin_group: str = Field(default="", description="Provider group whose members are admins.")
    operator_group: str = Field(
        default="", description="Provider group whose members are operators."
    )

    @field_validator("issuer")
    @classmethod
    def _check_issuer(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"issuer: {value!r} is not an http(s) URL")
        return value.rstrip("/")


class Settings(BaseSettings):
    """Every field's description is its documentation: docs/configuration.md is generated
    from them (`streamspace config docs`). `shown_default` (in json_schema_extra) says what an
    empty or computed default means, where the value itself would not."""

    model_config = SettingsConfigDict(env_prefix="STREAMSPACE_", extra="ignore")

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where the control plane keeps its SQLite database, the signing key, the "
        "embedded agent's state (`agent/`, users' home directories included) and podman's "
        "configuration for `streamspace images build`.",
        json_schema_extra={"shown_default": "`~/.local/share/streamspace`"},
    )
    database_url: str = Field(
        default="",
        description="`postgresql://user@host/db` for PostgreSQL (the async driver is chosen "
        "automatically). Empty: SQLite in the data dir.",
        json_schema_extra={"shown_default": "*(SQLite in the data dir)*"},
    )
    db_pool_size: int = Field(
        default=20,
        ge=1,
        description="Database connections each replica keeps open; SQLite gets the same size. "
        "Size pool and overflow so all PostgreSQL replicas together stay under the server's "
        "`max_connections`.",
    )
    db_max_overflow: int = Field(
        default=20,
        ge=0,
        description="How many connections beyond the pool each replica may open under bursts "
        "(closed again when returned).",
    )
    db_pool_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A request that finds no free database connection within this long gets a "
        "503 `database-busy` problem.",
    )
    redis_url: str = Field(
        default="",
        description="Redis for running several control-plane replicas. Empty: single-process mode.",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    host: str = Field(
        default="127.0.0.1",
        description="Where the API and web UI listen (`--host` overrides it).",
    )
    port: int = Field(
        default=8080, description="Port of the API and web UI (`--port` overrides it)."
    )
    advertise_url: str = Field(
        default="",
        description="This replica's own URL as agents can reach it; agents dial stream sockets "
        "back to it when several replicas run.",
        json_schema_extra={"shown_default": "`http://HOST:PORT` when Redis is set"},
    )
    replica_id: str = Field(
        default="",
        description="Name of this replica in logs, leases and agent routing.",
        json_schema_extra={"shown_default": "`<hostname>-<pid>`"},
    )

    secret_key: str = Field(
        default="",
        description="Signs access tokens. Set the same value on every replica.",
        json_schema_extra={"shown_default": "generated once into `DATA_DIR/secret_key`"},
    )
    admin_password: str = Field(
        default="",
        description="Password of the `admin` user created on the first start. It must pass the "
        "password policy (12+ characters, not easy to guess); a weak one stops the first start "
        "with the reason. Ignored once users exist.",
        json_schema_extra={"shown_default": "random, printed once"},
    )
    access_token_ttl_seconds: int = Field(
        default=900, description="Lifetime of an access token (JWT)."
    )
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a replica reuses a user row it has loaded to authenticate "
        "requests (saves a database read per request). A logout, password change, disable, "
        "role change, delete or sign-out applies at once on every replica (through Redis with "
        "several); a change written straight to the database is seen within this many "
        "seconds. `0` turns the cache off.",
    )
    connection_recheck_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often each replica re-reads the users it holds viewer WebSockets and "
        "event streams for, closing those whose sign-in was revoked in a way no message "
        "announced (a lost Redis message, a change made straight in the database). "
        "Revocations through the API close them at once.",
    )
    refresh_token_ttl_seconds: int = Field(
        default=7 * 24 * 3600,
        description="Lifetime of a refresh token (rotating, single use; an HttpOnly cookie in "
        "browsers).",
    )
    login_failures_before_delay: int = Field(
        default=5,
        ge=1,
        description="Failed logins one client IP may make for one username before each further "
        "attempt of that pair has to wait (`429` with `Retry-After`). See `docs/security.md`, "
        '"Login and passwords".',
    )
    login_delay_seconds: float = Field(
        default=1.0,
        gt=0,
        description="The first wait after those failures; it doubles with each further failure "
        "of the pair. A correct password clears the pair.",
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
        description="Comma-separated IPs or CIDRs of reverse proxies whose `X-Forwarded-For` "
        "and `X-Forwarded-Proto` headers are believed (e.g. `127.0.0.1` or `10.0.0.0/8`). "
        "Empty: those headers are ignored and the TCP peer is the client. The `Forwarded` "
        "header is never read. List only proxies that replace `X-Forwarded-For` rather than "
        "pass a client's on.",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    mfa_required_roles: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated roles (`admin`, `operator`, `user`) whose members must "
        "sign in with a second factor (TOTP). A member without one is led through enrolment "
        'at their next login. See `docs/security.md`, "Two-factor sign-in".',
        json_schema_extra={"shown_default": "*(none)*"},
    )
    mfa_required_groups: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated group names whose members must sign in with a second "
        "factor, like `STREAMSPACE_MFA_REQUIRED_ROLES`.",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    mfa_issuer: str = Field(
        default="StreamSpace",
        min_length=1,
        max_length=64,
        description="The issuer name authenticator apps show next to a TOTP entry.",
    )
    public_url: str = Field(
        default="",
        description="The URL users open (e.g. `https://streamspace.example.com`). Browsers may "
        "open the viewer WebSocket and the event stream, and run the cookie refresh, only from "
        "its origin. Empty: only from the origin the request's own `Host` header names "
        "(same-origin; what `streamspace up` on `http://127.0.0.1:8080` needs).",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    user_requests_per_second: float = Field(
        default=30.0,
        ge=0,
        description="Sustained API requests each user may make per second on each replica (a "
        "token bucket, checked before the request takes a database connection; `0` turns the "
        "limit off). Over it a request gets 429 `rate-limited` with `Retry-After`.",
    )
    user_request_burst: int = Field(
        default=300,
        ge=1,
        description="Requests a user may make at once before "
        "`STREAMSPACE_USER_REQUESTS_PER_SECOND` applies.",
    )
    user_concurrent_creates: int = Field(
        default=2,
        ge=0,
        description="Session creations one user may have under way at once on each replica "
        "(`0`: no limit); more get 429 `rate-limited` with `Retry-After: 1`.",
    )

    ldap_url: str = Field(
        default="",
        description="Directory login: `ldap://host[:port]` or `ldaps://host[:port]` of an LDAP "
        "server or Active Directory domain controller. Usernames that have no local account "
        "are then checked against the directory, and a directory user gets a StreamSpace "
        "account at first login. Empty: directory login is off. See `docs/identity.md`.",
        json_schema_extra={"shown_default": "*(off)*"},
    )
    ldap_start_tls: bool = Field(
        default=False,
        description="Upgrade an `ldap://` connection with StartTLS before anything is sent. "
        "Without it (or `ldaps://`) passwords cross the network in the clear; the control "
        "plane logs `ldap_cleartext` at start.",
    )
    ldap_ca_file: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that signed the directory's certificate, for "
        "StartTLS and `ldaps://`. Unset: the system's trusted CAs. The certificate and its "
        "host name are always verified.",
        json_schema_extra={"shown_default": "*(system CAs)*"},
    )
    ldap_bind_dn: str = Field(
        default="",
        description="DN of the service account that searches the directory for users and their "
        "groups (e.g. `cn=streamspace,ou=services,dc=example,dc=org`). It needs read access "
        "only. Empty: the searches are anonymous, where the directory allows that.",
        json_schema_extra={"shown_default": "*(anonymous search)*"},
    )
    ldap_bind_password: str = Field(
        default="",
        repr=False,
        description="Password of `STREAMSPACE_LDAP_BIND_DN`. Never logged or shown by the API.",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    ldap_user_base_dn: str = Field(
        default="",
        description="Where users are searched (whole subtree), e.g. `ou=people,dc=example,dc=org`.",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    ldap_user_filter: str = Field(
        default="(uid={username})",
        description="Finds the one entry of the user logging in; `{username}` is replaced by the "
        "typed name, escaped (RFC 4515). It must find the user by the value of "
        "`STREAMSPACE_LDAP_USERNAME_ATTRIBUTE`: a refresh looks the user up by that value. Add "
        "conditions here to refuse disabled accounts, e.g. for Active Directory "
        "`(&(sAMAccountName={username})(!(userAccountControl:1.2.840.113556.1.4.803:=2)))`.",
    )
    ldap_group_base_dn: str = Field(
        default="",
        description="Where groups are searched (whole subtree). Empty: groups are not read, and "
        "directory users get no groups and the `user` role.",
        json_schema_extra={"shown_default": "*(no group lookup)*"},
    )
    ldap_group_filter: str = Field(
        default="(|(member={dn})(uniqueMember={dn})(memberUid={username}))",
        description="Finds the groups of a user; `{dn}` is replaced by the user's DN and "
        "`{username}` by their username, both escaped. For nested Active Directory groups: "
        "`(member:1.2.840.113556.1.4.1941:={dn})`.",
    )
    ldap_group_name_attribute: str = Field(
        default="cn",
        description="Attribute of a group entry that names the StreamSpace group it becomes.",
    )
    ldap_admin_group: str = Field(
        default="",
        description="Members of the directory group of this name get the `admin` role (checked "
        "at each login; a change signs the user out of their other sign-ins).",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    ldap_operator_group: str = Field(
        default="",
        description="Members of the directory group of this name get the `operator` role, "
        "unless they are admins. Everyone else from the directory gets `user`.",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    ldap_username_attribute: str = Field(
        default="uid",
        description="Attribute whose value becomes the StreamSpace username (`sAMAccountName` "
        "for Active Directory).",
    )
    ldap_display_name_attribute: str = Field(
        default="cn",
        description="Attribute copied into the user's display name at each login "
        "(`displayName` for Active Directory).",
    )
    ldap_email_attribute: str = Field(
        default="mail", description="Attribute copied into the user's email at each login."
    )
    ldap_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Limit for connecting to the directory and for each answer. A directory "
        "that does not answer in time makes directory logins fail with 503 "
        "`directory-unavailable`; local users still log in.",
    )

    oidc_providers: list[OidcProvider] = Field(
        default=[],
        description="OpenID Connect sign-in: a JSON list of providers, each "
        '`{"id", "name", "issuer", "client_id", "client_secret", "scopes", "username_claim", '
        '"groups_claim", "allowed_email_domains", "group_map", "admin_group", '
        '"operator_group"}` (see docs/identity.md). Each is a "Sign in with …" button on the '
        "login page; its redirect URI is `<public_url>/api/v1/auth/oidc/<id>/callback`.",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    oidc_clock_skew_seconds: int = Field(
        default=60,
        ge=0,
        le=300,
        description="How far the provider's clock may be off when an ID token's `iat`, `nbf` "
        "and `exp` are checked.",
    )
    oidc_keys_refetch_seconds: float = Field(
        default=5.0,
        ge=0,
        description="An ID token signed with a key id the provider's cached keys lack fetches "
        "its `jwks_uri` again (a key rotation), at most once in this many seconds; until then "
        "such a token is refused.",
    )
    oidc_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Limit for each call to a provider (discovery, keys, token). A provider "
        "that does not answer makes its sign-in fail with 503 `identity-provider-unavailable`.",
    )
    saml_providers: list[SamlProvider] = Field(
        default_factory=list,
        description="SAML 2.0 identity providers, as a JSON list of objects: `id`, `name`, "
        "`idp_metadata_url`, and optionally `sp_entity_id`, `username_attribute` (`uid`), "
        "`email_attribute` (`mail`), `display_name_attribute` (`displayName`), "
        "`groups_attribute` (`memberOf`), `admin_group`, `operator_group`. Each is a "
        '"Sign in with <name>" button on the login page; needs `STREAMSPACE_PUBLIC_URL`. '
        'See `docs/identity.md`, "SAML".',
        json_schema_extra={"shown_default": "*(none)*"},
    )

    metrics_token: str = Field(
        default="",
        description="When set, `GET /metrics` needs `Authorization: Bearer <token>` from every "
        "client, loopback included (401 otherwise). Set it in production and give it to the "
        "scraper. Unset, /metrics is open (see `STREAMSPACE_METRICS_LOOPBACK_ONLY`).",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    metrics_loopback_only: bool = Field(
        default=False,
        description="Without a metrics token, answer `/metrics` only for clients on this "
        "machine that came through no proxy (403 otherwise). `streamspace up` turns it on "
        "unless the variable is set.",
        json_schema_extra={"shown_default": "`false` (`true` for `streamspace up`)"},
    )

    templates_dir: Path | None = Field(
        default=None,
        description="Directory of template YAML files loaded into the catalog at start.",
        json_schema_extra={
            "shown_default": "`templates/` of the checkout, else of the installed package"
        },
    )
    max_body_bytes: int = Field(default=1_048_576, description="Larger request bodies get 413.")

    files_max_upload_mb: int = Field(
        default=1024,
        ge=1,
        description="Largest file one upload to a session's home may be (MiB); larger get 413.",
    )
    files_allow_upload: bool = Field(
        default=True,
        description="Whether users may upload files into their sessions when none of their "
        "groups says (a group's allow_upload overrides it; any group's False denies).",
    )
    files_allow_download: bool = Field(
        default=True,
        description="Whether users may download files from their sessions when none of their "
        "groups says (a group's allow_download overrides it; any group's False denies).",
    )

    clipboard_allow_in: bool = Field(
        default=True,
        description="Whether text may be pasted into users' sessions when none of their groups "
        "says (a group's clipboard_in overrides it; any group's False denies). Enforced by the "
        "session's VNC server (`-AcceptCutText`), which the session cannot override.",
    )
    clipboard_allow_out: bool = Field(
        default=True,
        description="Whether text copied in users' sessions may reach their browsers when none "
        "of their groups says (`clipboard_out`; `-SendCutText` in the session's VNC server).",
    )

    microphone_allow: bool = Field(
        default=False,
        description="Whether users' browsers may send microphone sound into their sessions when "
        "none of their groups says (a group's allow_microphone overrides it; any group's False "
        "denies). Off by default: a session hearing the room is opt-in per group.",
    )

    stream_ticket_ttl_seconds: int = Field(
        default=30, description="Lifetime of a single-use stream ticket."
    )
    thumbnail_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="How long a replica reuses a session's live thumbnail before asking its "
        "agent for a new one (all Sessions lists open share it).",
    )
    agent_heartbeat_seconds: float = Field(
        default=10.0, description="Heartbeat interval the control plane asks agents for."
    )
    agent_stale_after_seconds: float = Field(
        default=30.0,
        description="An agent not heard from for this long (or with no connection) is `stale`: "
        "it gets no new sessions.",
    )
    agent_offline_after_seconds: float = Field(
        default=90.0, description="An agent not heard from for this long is `offline`."
    )
    join_token_ttl_seconds: int = Field(
        default=3600,
        description="Lifetime of an agent join token when its creator gives none.",
    )

    command_timeout_seconds: float = Field(
        default=30.0,
        description="How long one attempt of an agent command may take before it is re-sent.",
    )
    command_max_attempts: int = Field(
        default=3, description="Attempts before a command (and its session) fails."
    )
    starting_timeout_seconds: float = Field(
        default=150.0,
        description="A session still scheduled, starting or waking after this long fails.",
    )
    stopping_timeout_seconds: float = Field(
        default=120.0,
        description="A session still stopping or hibernating after this long fails.",
    )
    queue_timeout_seconds: float = Field(
        default=600.0,
        description="A pending session no agent could take fails after this long, with the reason.",
    )
    loop_interval_seconds: float = Field(
        default=2.0,
        description="Period of the timeout loop, and the longest the placement loop sleeps "
        "when nothing wakes it.",
    )
    idle_check_interval_seconds: float = Field(
        default=15.0, description="Period of the idle culler."
    )
    catalog_hide_unavailable: bool = Field(
        default=True,
        description="Leave templates no online agent can run now out of users' catalog "
        "(`GET /api/v1/templates` and the web catalog); false shows them greyed with the "
        "reason. Admins always see them, with the reason. Launching one answers 409 either way.",
    )
    scheduler_strategy: str = Field(
        default="least_loaded",
        description="`least_loaded` spreads sessions over agents; `bin_packing` fills agents "
        "one by one.",
    )

    default_idle_timeout_seconds: int = Field(
        default=3600,
        description="Idle time before a session is hibernated, unless the session request, "
        "the user or the template says otherwise.",
    )
    default_max_duration_seconds: int = Field(
        default=12 * 3600,
        description="A session older than this is stopped, unless its template gives another "
        "maximum.",
    )
    default_quota_sessions: int = Field(
        default=5, description="Active sessions per user without an explicit quota."
    )
    default_quota_cpu_millis: int = Field(
        default=8000, description="CPU (millicores) per user without an explicit quota."
    )
    default_quota_memory_mb: int = Field(
        default=16384, description="Memory (MiB) per user without an explicit quota."
    )

    agent_max_sessions: int = Field(
        default=10, description="Sessions the embedded agent of `streamspace up` offers."
    )
    agent_cpu_millis: int = Field(
        default=8000,
        description="CPU (millicores) the embedded agent of `streamspace up` offers.",
    )
    agent_memory_mb: int = Field(
        default=16384, description="Memory (MiB) the embedded agent of `streamspace up` offers."
    )
    agent_max_concurrent_commands: int = Field(
        default=8, description="Commands the embedded agent of `streamspace up` runs at once."
    )
    local_insecure_shared_user: bool = Field(
        default=False,
        description="Run local sessions as the agent's own user, unsandboxed (also "
        "`--insecure-shared-user`). A single-person laptop only: logged loudly, shown in red "
        "to admins. Without it sessions always run sandboxed (see docs/security.md).",
    )
    local_uid_range: str = Field(
        default="200000-265535",
        description="Uids (= gids) given to users' local sessions when the agent is root; one "
        "per user id, kept in the agent's `identities.json`. Must not overlap host accounts "
        "(those uids are skipped).",
    )
    local_enforce_limits: bool = Field(
        default=True,
        description="Apply each local session's CPU and memory limits through cgroups (v2 when "
        'delegated, v1 as root); the agent reports "limits not enforced" where it cannot.',
    )
    kube_kubeconfig: str = Field(
        default="",
        description="Kubeconfig file of the `kubernetes` backend. Empty: the pod's "
        "ServiceAccount when the agent runs in a cluster, else `$KUBECONFIG` or "
        "`~/.kube/config`.",
    )
    kube_context: str = Field(
        default="", description="Kubeconfig context to use (empty: its current context)."
    )
    kube_namespace: str = Field(
        default="",
        description="Namespace of the session pods (also `--namespace`). Empty: the "
        "kubeconfig context's namespace, the agent's own namespace in a cluster, else `default`.",
    )
    kube_storage_class: str = Field(
        default="",
        description="StorageClass of the persistent homes' PVCs (empty: the cluster's default).",
    )
    kube_home_size: str = Field(
        default="10Gi",
        description="Size requested for each persistent home PVC when the user has no home "
        "limit (a Kubernetes quantity).",
    )
    kube_image_pull_policy: str = Field(
        default="IfNotPresent",
        description="`imagePullPolicy` of session containers: `Always`, `IfNotPresent` or `Never`.",
    )
    kube_image_pull_secrets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Secret names given to session pods as `imagePullSecrets`.",
        json_schema_extra={"shown_default": "*(none)*"},
    )
    kube_node_selector: str = Field(
        default="",
        description="`key=value,...` node selector of every session pod.",
    )
    kube_tolerations: str = Field(
        default="",
        description="JSON list of tolerations added to every session pod, as in a pod spec.",
    )
    kube_agent_pod_labels: str = Field(
        default="app.kubernetes.io/name=streamspace-agent",
        description="`key=value,...` labels of the agent's own pods: the sessions' "
        "NetworkPolicy admits VNC connections only from pods with these labels.",
    )
    kube_agent_namespace: str = Field(
        default="",
        description="Namespace the agent's pods run in, when not the sessions' namespace "
        "(the NetworkPolicy then admits them from there).",
    )
    kube_start_timeout_seconds: float = Field(
        default=120.0,
        description="How long a session pod may take from creation to its VNC server "
        "answering (image pulls included); clear failures end the start sooner.",
    )

    default_quota_home_mb: int = Field(
        default=0,
        ge=0,
        description="Size limit of each persistent home for users without a `max_home_mb` in "
        "their quota (`0`: none). Measured when a session stops or hibernates; an over-limit "
        "home keeps its session from starting.",
    )

    log_format: str = Field(
        default="kv",
        description="`kv` (key=value) or `json`; one event per line (see streamspace/logs.py).",
    )
    log_level: str = Field(
        default="INFO",
        description="Lowest level logged: `DEBUG`, `INFO`, `WARNING` or `ERROR`.",
    )

    @field_validator(
        "mfa_required_roles", "mfa_required_groups", "kube_image_pull_secrets", mode="before"
    )
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [item for item in (part.strip() for part in value.split(",")) if item]
        return value

    @field_validator("mfa_required_roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - {"admin", "operator", "user"})
        if unknown:
            raise ValueError(f"unknown roles {unknown}: use admin, operator or user")
        return value

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

    @field_validator("ldap_url")
    @classmethod
    def _check_ldap_url(cls, value: str) -> str:
        if value and (
            urlsplit(value).scheme not in ("ldap", "ldaps") or not urlsplit(value).hostname
        ):
            raise ValueError(f"ldap_url: {value!r} is not an ldap:// or ldaps:// URL")
        return value

    @model_validator(mode="after")
    def _check_saml(self) -> Settings:
        ids = [p.id for p in self.saml_providers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"saml_providers: provider ids must be unique, got {ids}")
        if self.saml_providers and not self.public_url:
            raise ValueError(
                "saml_providers: needs public_url, the address the IdP sends users back to"
            )
        return self

    @model_validator(mode="after")
    def _check_ldap(self) -> Settings:
        if not self.ldap_url:
            return self
        if self.ldap_start_tls and self.ldap_url.startswith("ldaps:"):
            raise ValueError("ldap_start_tls: an ldaps:// URL is TLS already; use one or the other")
        if not self.ldap_user_base_dn:
            raise ValueError("ldap_user_base_dn: needed when ldap_url is set")
        if "{username}" not in self.ldap_user_filter:
            raise ValueError("ldap_user_filter: must contain {username}")
        if self.ldap_bind_dn and not self.ldap_bind_password:
            raise ValueError("ldap_bind_password: needed with ldap_bind_dn")
        return self

    @model_validator(mode="after")
    def _check_oidc(self) -> Settings:
        ids = [p.id for p in self.oidc_providers]
        if len(ids) != len(set(ids)):
            raise ValueError("oidc_providers: two providers have the same id")
        return self

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
