"""Request and response bodies of the REST API. Requests refuse unknown fields."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from streamspace.controlplane.catalog import NAME_PATTERN

Role = Literal["admin", "operator", "user"]
USERNAME = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$"
TAG = r"^[a-zA-Z0-9][a-zA-Z0-9._:/-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


PASSWORD_MIN = 12

RefreshDelivery = Literal["cookie", "body"]
DELIVERY_DOC = (
    "Where the refresh token goes: `cookie` (the default, for the web UI) sets it as an HttpOnly "
    "cookie that page scripts cannot read; `body` returns it in the JSON instead, for clients "
    "that are not browsers (the CLI) and keep it themselves."
)


class LoginIn(Strict):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    refresh_token_delivery: RefreshDelivery = Field(default="cookie", description=DELIVERY_DOC)


class RefreshIn(Strict):
    refresh_token: str | None = Field(
        default=None,
        min_length=10,
        max_length=512,
        description="A refresh token kept by a non-browser client; the new one comes back in "
        "the body. Without it the refresh cookie is used (and renewed).",
    )


class LogoutIn(Strict):
    refresh_token: str | None = Field(default=None, max_length=512)


class PasswordChangeIn(Strict):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=PASSWORD_MIN, max_length=1024)
    refresh_token_delivery: RefreshDelivery = Field(default="cookie", description=DELIVERY_DOC)


class UserOut(Out):
    id: str
    username: str
    display_name: str
    email: str
    role: str
    is_active: bool
    idle_timeout_seconds: int | None
    service_account: bool
    auth_source: str = Field(
        description="`local` (a StreamSpace password, or none) or `ldap` (created at a "
        "directory login; the directory checks the password)"
    )
    created_at: datetime


class SamlProviderOut(BaseModel):
    id: str
    name: str
    login_url: str


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    refresh_token: str | None = Field(
        default=None,
        description="Only with `refresh_token_delivery: body` (or a body-token refresh); "
        "browsers get it as an HttpOnly cookie instead.",
    )
    user: UserOut


class UserCreateIn(Strict):
    username: str = Field(pattern=USERNAME)
    password: str | None = Field(
        default=None,
        min_length=PASSWORD_MIN,
        max_length=1024,
        description="Required, except for a service account, which has none.",
    )
    display_name: str = Field(default="", max_length=128)
    email: str = Field(default="", max_length=254)
    role: Role = "user"
    service_account: bool = Field(
        default=False,
        description="An account for automation: no password, it acts only through API keys "
        "an admin creates for it (POST /api/v1/users/{id}/api-keys).",
    )

    @model_validator(mode="after")
    def _password_unless_service(self) -> UserCreateIn:
        if self.service_account and self.password is not None:
            raise ValueError("password: a service account has none (it uses API keys)")
        if not self.service_account and self.password is None:
            raise ValueError("password: required (or set service_account: true)")
        return self


class UserPatchIn(Strict):
    display_name: str | None = Field(default=None, max_length=128)
    email: str | None = Field(default=None, max_length=254)
    role: Role | None = None
    is_active: bool | None = None
    password: str | None = Field(default=None, min_length=PASSWORD_MIN, max_length=1024)
    idle_timeout_seconds: int | None = Field(default=None, ge=60, le=30 * 24 * 3600)


class QuotaIn(Strict):
    max_sessions: int = Field(ge=0, le=10_000)
    max_cpu_millis: int = Field(ge=0, le=10_000_000)
    max_memory_mb: int = Field(ge=0, le=100_000_000)
    max_home_mb: int | None = Field(
        default=None,
        ge=1,
        le=100_000_000,
        description="size limit of each persistent home (null: the configured default)",
    )


class QuotaOut(Out):
    max_sessions: int
    max_cpu_millis: int
    max_memory_mb: int
    max_home_mb: int | None = Field(default=None, description="null: no limit")


class QuotaUsageOut(BaseModel):
    limits: QuotaOut
    source: str
    used_sessions: int
    used_cpu_millis: int
    used_memory_mb: int


_ALLOW_UPLOAD = "members may upload files into sessions; null: no say (the setting decides)"
_ALLOW_DOWNLOAD = "members may download files from sessions; null: no say"
_CLIPBOARD_IN = "text may be pasted into members' sessions; null: no say"
_CLIPBOARD_OUT = "text copied in members' sessions may leave them; null: no say"
_ALLOW_MICROPHONE = "members' browsers may send microphone sound into sessions; null: no say"


class GroupIn(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
    description: str = Field(default="", max_length=512)
    allow_upload: bool | None = Field(default=None, description=_ALLOW_UPLOAD)
    allow_download: bool | None = Field(default=None, description=_ALLOW_DOWNLOAD)
    clipboard_in: bool | None = Field(default=None, description=_CLIPBOARD_IN)
    clipboard_out: bool | None = Field(default=None, description=_CLIPBOARD_OUT)
    allow_microphone: bool | None = Field(default=None, description=_ALLOW_MICROPHONE)


class GroupPatchIn(Strict):
    """Fields left out stay; `allow_upload: null` clears the group's say."""

    description: str | None = Field(default=None, max_length=512)
    allow_upload: bool | None = Field(default=None, description=_ALLOW_UPLOAD)
    allow_download: bool | None = Field(default=None, description=_ALLOW_DOWNLOAD)
    clipboard_in: bool | None = Field(default=None, description=_CLIPBOARD_IN)
    clipboard_out: bool | None = Field(default=None, description=_CLIPBOARD_OUT)
    allow_microphone: bool | None = Field(default=None, description=_ALLOW_MICROPHONE)


class GroupOut(Out):
    id: str
    name: str
    description: str
    source: str = Field(
        default="local",
        description="`local` (managed by admins) or `ldap` (a directory group: each member's "
        "login sets their membership)",
    )
    members: list[str] = Field(default_factory=list)
    quota: QuotaOut | None = None
    allow_upload: bool | None = Field(default=None, description=_ALLOW_UPLOAD)
    allow_download: bool | None = Field(default=None, description=_ALLOW_DOWNLOAD)
    clipboard_in: bool | None = Field(default=None, description=_CLIPBOARD_IN)
    clipboard_out: bool | None = Field(default=None, description=_CLIPBOARD_OUT)
    allow_microphone: bool | None = Field(default=None, description=_ALLOW_MICROPHONE)


class ResourcesIn(Strict):
    cpu_millis: int | None = Field(default=None, ge=100, le=64000)
    memory_mb: int | None = Field(default=None, ge=64, le=262144)


class SessionCreateIn(Strict):
    template: str = Field(pattern=NAME_PATTERN)
    tags: list[str] = Field(default_factory=list, max_length=20)
    cluster_id: str | None = Field(default=None, pattern=r"^[a-zA-Z0-9._-]{1,64}$")
    resources: ResourcesIn | None = None
    persistent_home: bool = True
    idle_timeout_seconds: int | None = Field(default=None, ge=60, le=30 * 24 * 3600)

    def clean_tags(self) -> list[str]:
        return _clean_tags(self.tags)


class SessionPatchIn(Strict):
    tags: list[str] | None = Field(default=None, max_length=20)
    idle_timeout_seconds: int | None = Field(default=None, ge=60, le=30 * 24 * 3600)
    max_duration_seconds: int | None = Field(default=None, ge=60, le=90 * 24 * 3600)


def _clean_tags(tags: list[str]) -> list[str]:
    import re

    out: list[str] = []
    for tag in tags:
        if not re.fullmatch(TAG, tag):
            from streamspace.controlplane.problems import Problem

            raise Problem(
                422,
                "Invalid request",
                f"tags: {tag!r} is not a valid tag (letters, digits, . _ : / -; max 64)",
                kind="invalid-request",
            )
        if tag not in out:
            out.append(tag)
    return out


T = TypeVar("T")


ApiKeyScope = Literal["sessions:read", "sessions:write", "templates:read", "admin"]


class ApiKeyIn(Strict):
    name: str = Field(min_length=1, max_length=64, description="What the key is for.")
    scopes: list[ApiKeyScope] = Field(
        min_length=1,
        description="What the key may do: sessions:read, sessions:write, templates:read, "
        "admin (everything its owner's role allows).",
    )
    expires_at: datetime | None = Field(
        default=None,
        description="When the key stops working (ISO 8601 with a zone); never if omitted.",
    )


class ApiKeyOut(Out):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    created_by: str | None


class ApiKeyCreatedOut(ApiKeyOut):
    key: str = Field(description="The key itself. Shown only in this answer; store it now.")


class WebAuthnAnswerIn(Strict):
    challenge_id: str = Field(max_length=64)
    credential: dict[str, Any] = Field(
        description="The browser's PublicKeyCredential, as its toJSON() gives it."
    )


class MfaVerifyIn(Strict):
    mfa_token: str = Field(max_length=4096, description="From the login's `mfa-required` answer.")
    code: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="A TOTP code, or one of your recovery codes.",
    )
    webauthn: WebAuthnAnswerIn | None = Field(
        default=None, description="A passkey's answer to POST /api/v1/auth/mfa/webauthn/options."
    )

    @model_validator(mode="after")
    def _one_proof(self) -> MfaVerifyIn:
        if (self.code is None) == (self.webauthn is None):
            raise ValueError("give exactly one of code and webauthn")
        return self


class MfaTokenIn(Strict):
    mfa_token: str = Field(max_length=4096)


class PasskeyOptionsOut(BaseModel):
    challenge_id: str
    options: dict[str, Any] = Field(
        description="publicKey options as JSON (PublicKeyCredential.parse…OptionsFromJSON)."
    )


class PasskeyRegisterIn(WebAuthnAnswerIn):
    name: str = Field(min_length=1, max_length=64, description="To tell your passkeys apart.")


class PasskeyOut(Out):
    id: str
    name: str
    created_at: datetime
    last_used_at: datetime | None


class PasskeyLoginIn(WebAuthnAnswerIn):
    refresh_token_delivery: RefreshDelivery = Field(default="cookie", description=DELIVERY_DOC)


class TotpStartIn(Strict):
    mfa_token: str | None = Field(
        default=None,
        max_length=4096,
        description="From a login's `mfa-enrolment-required` answer; omit when signed in.",
    )


class TotpStartOut(BaseModel):
    secret: str = Field(description="The base32 secret, for apps that cannot scan the QR code.")
    otpauth_uri: str
    qr: list[str] = Field(description="The QR code of `otpauth_uri`: rows of 1 (dark) and 0.")


class TotpConfirmIn(TotpStartIn):
    code: str = Field(min_length=1, max_length=16, description="A code the app shows now.")


class TotpConfirmOut(BaseModel):
    recovery_codes: list[str] = Field(
        description="One-time codes for when the app is lost. Shown only here; store them now."
    )
    login: TokenOut | None = Field(
        default=None, description="The finished login, when enrolment was part of one."
    )


class PasswordConfirmIn(Strict):
    password: str = Field(max_length=1024)


class CodeConfirmIn(Strict):
    code: str = Field(min_length=1, max_length=16, description="A code the app shows now.")


class RecoveryCodesOut(BaseModel):
    recovery_codes: list[str]


class MfaStatusOut(BaseModel):
    totp_enabled: bool
    totp_confirmed_at: datetime | None
    recovery_codes_left: int
    passkeys: int
    required: bool = Field(description="Whether the policy requires a second factor of you.")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class JoinTokenIn(Strict):
    ttl_seconds: int | None = Field(default=None, ge=60, le=7 * 24 * 3600)


class JoinTokenOut(BaseModel):
    token: str
    expires_at: datetime
    command: str


class AgentOut(BaseModel):
    id: str
    name: str
    cluster_id: str
    cluster_name: str
    region: str
    backend: str
    status: str
    last_seen: datetime | None
    draining: bool
    revoked: bool
    healthy: bool
    health_detail: str
    capacity: dict[str, int]
    load: dict[str, int]
    templates: list[str]
    version: str
    isolation: str = Field(
        description="uid-sandbox, userns-sandbox, container or insecure-shared-user"
    )
    isolation_detail: str
    limits_enforced: bool
    created_at: datetime


class CredentialOut(BaseModel):
    agent_id: str
    credential: str


class ConnectOut(BaseModel):
    ticket: str
    ws_path: str
    expires_at: datetime
    viewer_url: str
    microphone: bool = Field(
        default=False,
        description="whether this user's groups allow /api/v1/streams/microphone (the viewer "
        "offers its Microphone toggle only then)",
    )


class AuditOut(Out):
    id: int
    at: datetime
    actor: str
    action: str
    resource_type: str
    resource_id: str
    detail: dict[str, Any]
    ip: str
    status_code: int
