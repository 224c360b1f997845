"""Sign in with an OpenID Provider: the provider list, the redirect to the provider, the
callback, and RP-initiated logout.

What one login needs to remember between the redirect and the callback (`state`, `nonce`, the
PKCE verifier, the provider, where to go next) is in a cookie signed with the control plane's
key, HttpOnly, SameSite=Lax (the callback is a top-level navigation from the provider's site),
sent only to the callback path and good for `FLOW_SECONDS`: it binds the login to the browser
that started it, and the callback drops it, so it serves once. The code itself is single-use
at the provider, which refuses a replay.

The callback ends where a password login does: the account is provisioned as a directory
login's is (`provisioning`), the MFA policy asks for a second step (`mfagate`), and the tokens
come from `auth.issue_tokens`, the refresh token in its usual cookie. The browser is then sent
to the login page, which finishes the sign-in with a cookie refresh, or shows the second step
for the `mfa_token` in the URL fragment (never sent to any server).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

import jwt
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace import logs
from streamspace.config import OidcProvider
from streamspace.controlplane import audit
from streamspace.controlplane.api.auth import issue_tokens, set_refresh_cookie
from streamspace.controlplane.api.auth_directory import provision_retrying
from streamspace.controlplane.api.mfagate import demand_second_step
from streamspace.controlplane.browser import is_tls
from streamspace.controlplane.deps import DbDep, StateDep, writer_turn
from streamspace.controlplane.directory import DirectoryUser
from streamspace.controlplane.oidc import (
    OpenIdProvider,
    ProviderUnavailable,
    TokenRejected,
    claim_list,
    claim_text,
    pkce_pair,
    same,
)
from streamspace.controlplane.problems import Problem, not_found
from streamspace.controlplane.provisioning import (
    OIDC,
    OIDC_PREFIX,
    Origin,
    Provisioned,
    group_name,
    provision,
    role_for,
)
from streamspace.controlplane.state import AppState

router = APIRouter(prefix="/api/v1/auth/oidc", tags=["auth"])
log = logs.get_logger("streamspace.auth")

FLOW_COOKIE = "streamspace_oidc_flow"
LOGOUT_COOKIE = "streamspace_oidc_logout"
LOGOUT_PATH = "/api/v1/auth/oidc/logout"
FLOW_SECONDS = 600
FLOW_AUDIENCE = "streamspace-oidc-flow"
ProviderId = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9-]{0,10}$")]


class ProviderOut(BaseModel):
    id: str
    name: str


class ProvidersOut(BaseModel):
    providers: list[ProviderOut]


@router.get("/providers", response_model=ProvidersOut)
async def providers(state: StateDep) -> ProvidersOut:
    """Public: what the login page shows as "Sign in with …" buttons (names and ids only)."""
    return ProvidersOut(
        providers=[
            ProviderOut(id=p.config.id, name=p.config.name) for p in state.oidc.by_id.values()
        ]
    )


def _provider(state: AppState, provider_id: str) -> OpenIdProvider:
    found = state.oidc.by_id.get(provider_id)
    if found is None:
        raise not_found("identity provider", provider_id)
    return found


def _base_url(request: Request, state: AppState) -> str:
    return state.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")


def _unavailable(provider: OpenIdProvider, exc: ProviderUnavailable) -> Problem:
    log.warning("oidc_provider_unavailable", provider=provider.config.id, reason=str(exc))
    return Problem(
        503,
        "Service unavailable",
        f"{provider.config.name} cannot be reached right now; try again later",
        kind="identity-provider-unavailable",
    )


@router.get("/{provider_id}/login")
async def start(
    provider_id: ProviderId,
    request: Request,
    state: StateDep,
    next: Annotated[str, Query(max_length=200)] = "",
) -> Response:
    provider = _provider(state, provider_id)
    verifier, challenge = pkce_pair()
    login_state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    flow: dict[str, Any] = {
        "aud": FLOW_AUDIENCE,
        "exp": int(time.time()) + FLOW_SECONDS,
        "p": provider_id,
        "state": login_state,
        "nonce": nonce,
        "v": verifier,
        "next": next if next.startswith("#/") and not next.startswith("#/login") else "",
    }
    try:
        url = await provider.authorization_url(
            redirect_uri=provider.redirect_uri(_base_url(request, state)),
            state=login_state,
            nonce=nonce,
            challenge=challenge,
        )
    except ProviderUnavailable as exc:
        raise _unavailable(provider, exc) from None
    resp = RedirectResponse(url, status_code=302)
    resp.set_cookie(
        FLOW_COOKIE,
        jwt.encode(flow, state.secret, algorithm="HS256"),
        max_age=FLOW_SECONDS,
        path=f"/api/v1/auth/oidc/{provider_id}/callback",
        secure=is_tls(request.scope),
        httponly=True,
        samesite="lax",
    )
    return resp


def _refused(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, kind="unauthorized")


def _bad(detail: str) -> Problem:
    return Problem(400, "Bad request", detail, kind="bad-request")


async def _failed(
    request: Request, db: AsyncSession, provider_id: str, status: int, reason: str
) -> None:
    log.warning("oidc_login_refused", provider=provider_id, reason=reason)
    audit.record(
        db,
        actor=None,
        action="auth.login_failed",
        resource_type="user",
        resource_id="",
        request=request,
        status_code=status,
        method=f"{OIDC_PREFIX}{provider_id}",
        reason=reason[:200],
    )
    await db.commit()


@router.get("/{provider_id}/callback")
async def callback(
    provider_id: ProviderId,
    request: Request,
    state: StateDep,
    db: DbDep,
    code: Annotated[str | None, Query(min_length=1, max_length=2048)] = None,
    state_param: Annotated[str | None, Query(alias="state", min_length=1, max_length=512)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    provider = _provider(state, provider_id)
    try:
        return await _complete(request, state, db, provider, code, state_param, error)
    except Problem as exc:
        if exc.kind in ("mfa-required", "mfa-enrolment-required"):
            raise
        if exc.status in (400, 401, 403, 503):
            await _failed(request, db, provider_id, exc.status, exc.detail)
        raise


def _flow(request: Request, state: AppState, provider_id: str) -> dict[str, Any]:
    raw = request.cookies.get(FLOW_COOKIE)
    if not raw or len(raw) > 4096:
        raise _bad(
            "no sign-in is under way in this browser (or it took too long): start again "
            "from the login page"
        )
    try:
        flow: dict[str, Any] = jwt.decode(
            raw, state.secret, algorithms=["HS256"], audience=FLOW_AUDIENCE
        )
    except jwt.PyJWTError:
        raise _bad("the sign-in expired or was tampered with: start again") from None
    if flow.get("p") != provider_id:
        raise _bad("the sign-in under way is with another provider: start again")
    return flow


async def _complete(
    request: Request,
    state: AppState,
    db: AsyncSession,
    provider: OpenIdProvider,
    code: str | None,
    state_param: str | None,
    error: str | None,
) -> Response:
    cfg = provider.config
    flow = _flow(request, state, cfg.id)
    if error is not None:
        raise _refused(f"{cfg.name} did not sign you in ({error})")
    if code is None or state_param is None:
        raise _bad("code and state: both are needed")
    if not same(state_param, str(flow.get("state", ""))):
        raise _bad("state: this answer is not for the sign-in this browser started")
    base = _base_url(request, state)
    try:
        answer = await provider.exchange(
            code=code, verifier=str(flow["v"]), redirect_uri=provider.redirect_uri(base)
        )
        id_token = str(answer["id_token"])
        claims = await provider.verify_id_token(id_token, nonce=str(flow["nonce"]))
        if (
            not claim_text(claims, cfg.username_claim)
            or cfg.groups_claim not in claims
            or not claim_text(claims, "email")
        ) and isinstance(answer.get("access_token"), str):
            info = await provider.userinfo(answer["access_token"])
            if info.get("sub") == claims["sub"]:
                claims = {**info, **claims}
    except ProviderUnavailable as exc:
        raise _unavailable(provider, exc) from None
    except TokenRejected as exc:
        raise _refused(f"sign-in with {cfg.name} refused: {exc}") from None
    identity = _identity(cfg, claims)
    origin = Origin(f"{OIDC_PREFIX}{cfg.id}", OIDC)
    async with contextlib.AsyncExitStack() as held:
        await held.enter_async_context(writer_turn(state, db))
        done = await provision_retrying(
            db,
            lambda: provision(db, identity.entry, origin, role=identity.role),
            "oidc_login_refused",
            identity.username,
        )
    if done is None:
        raise _refused(f"sign-in with {cfg.name} refused: this account cannot be used here")
    return await _signed_in(request, state, db, provider, done, id_token, flow)


@dataclass(frozen=True)
class Identity:
    """What the claims say, in StreamSpace terms: the account (its `groups` already mapped)
    and the role the provider's own groups give."""

    entry: DirectoryUser
    role: str
    source: str

    @property
    def username(self) -> str:
        return self.entry.username

    @property
    def groups(self) -> tuple[str, ...]:
        return self.entry.groups


def _identity(cfg: OidcProvider, claims: dict[str, Any]) -> Identity:
    email = claim_text(claims, "email")
    if cfg.allowed_email_domains:
        domain = email.rpartition("@")[2].lower()
        if (
            not email
            or claims.get("email_verified") is False
            or domain not in {d.lower() for d in cfg.allowed_email_domains}
        ):
            raise _refused(f"sign-in with {cfg.name} refused: the email domain is not allowed")
    username = group_name(claim_text(claims, cfg.username_claim))
    if username is None:
        raise _refused(f"sign-in with {cfg.name} refused: no usable {cfg.username_claim!r} claim")
    provider_groups = claim_list(claims, cfg.groups_claim)
    mapped = {g.casefold(): target for g, target in cfg.group_map.items()}
    groups = tuple(
        sorted({name for g in provider_groups if (name := mapped.get(g.casefold())) is not None})
    )
    entry = DirectoryUser(
        dn=claim_text(claims, "sub"),
        username=username,
        display_name=claim_text(claims, "name"),
        email=email,
        groups=groups,
    )
    origin = Origin(f"{OIDC_PREFIX}{cfg.id}", OIDC, cfg.admin_group, cfg.operator_group)
    return Identity(
        entry=entry, role=role_for(provider_groups, origin), source=origin.account_source
    )


def login_page(params: dict[str, str]) -> str:
    """Where a single sign-on lands the browser: the login page finishes it (or asks for the
    second factor with the `mfa_token`)."""
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items() if v)
    return f"/#/login?{query}"


async def _signed_in(
    request: Request,
    state: AppState,
    db: AsyncSession,
    provider: OpenIdProvider,
    done: Provisioned,
    id_token: str,
    flow: dict[str, Any],
) -> Response:
    user = done.user
    method = f"{OIDC_PREFIX}{provider.config.id}"
    if not user.is_active:
        await db.commit()
        raise _refused("this account is disabled")
    await db.commit()
    if done.role_changed:
        state.revocations.revoke(
            user.id, f"signed out: the identity provider's groups changed the role to {user.role}"
        )
    next_view = str(flow.get("next", ""))
    refresh: str | None = None
    try:
        await demand_second_step(db, state.settings, state.secret, user, "cookie")
        _, refresh = await issue_tokens(state, db, user, request=request, method=method)
        target = login_page({"sso": provider.config.id, "next": next_view})
    except Problem as step:
        target = login_page(
            {
                "mfa": step.kind,
                "mfa_token": str(step.extra.get("mfa_token", "")),
                "methods": ",".join(step.extra.get("methods", [])),
                "next": next_view,
            }
        )
    audit.record(
        db,
        actor=user,
        action="auth.login",
        resource_type="user",
        resource_id=user.id,
        request=request,
        method=method,
        created=done.created,
        role=user.role,
        groups_joined=done.groups_joined,
        groups_left=done.groups_left,
        second_step=refresh is None,
    )
    await db.commit()
    resp = RedirectResponse(target, status_code=303)
    if refresh is not None:
        set_refresh_cookie(request, state, resp, refresh)
    resp.delete_cookie(
        FLOW_COOKIE,
        path=f"/api/v1/auth/oidc/{provider.config.id}/callback",
        secure=is_tls(request.scope),
        httponly=True,
        samesite="lax",
    )
    resp.set_cookie(
        LOGOUT_COOKIE,
        jwt.encode(
            {"aud": "streamspace-oidc-logout", "p": provider.config.id, "t": id_token},
            state.secret,
            algorithm="HS256",
        ),
        max_age=state.settings.refresh_token_ttl_seconds,
        path=LOGOUT_PATH,
        secure=is_tls(request.scope),
        httponly=True,
        samesite="strict",
    )
    return resp


@router.get("/logout")
async def logout(request: Request, state: StateDep) -> Response:
    """After `POST /api/v1/auth/logout` ended the sign-in here: the browser is sent to the
    provider's `end_session_endpoint` (with `id_token_hint` and `post_logout_redirect_uri`)
    to end the provider's session too, or to the login page when it has none. The cookie
    that carries the hint is SameSite=Strict, so another site cannot start this."""
    base = _base_url(request, state)
    target = f"{base}/"
    raw = request.cookies.get(LOGOUT_COOKIE)
    if raw and len(raw) <= 8192:
        with contextlib.suppress(jwt.PyJWTError):
            kept = jwt.decode(
                raw, state.secret, algorithms=["HS256"], audience="streamspace-oidc-logout"
            )
            provider = state.oidc.by_id.get(str(kept.get("p")))
            if provider is not None:
                try:
                    # Providers refuse a fragment here (OpenID RP-Initiated Logout 1.0); the
                    # root shows the login page to a browser that is signed out.
                    url = await provider.end_session_url(
                        id_token=str(kept["t"]), post_logout_redirect_uri=target
                    )
                except ProviderUnavailable as exc:
                    log.warning(
                        "oidc_provider_unavailable", provider=provider.config.id, reason=str(exc)
                    )
                    url = None
                target = url or target
    resp = RedirectResponse(target, status_code=303)
    resp.delete_cookie(
        LOGOUT_COOKIE,
        path=LOGOUT_PATH,
        secure=is_tls(request.scope),
        httponly=True,
        samesite="strict",
    )
    return resp
