"""SAML 2.0 sign-in: SP metadata, the redirect to the IdP, the assertion consumer service.

A sign-in takes three requests, because the IdP posts its Response cross-site and the browser
sends no SameSite cookie with that post:

1. `GET …/{id}/login`: an AuthnRequest (its ID kept in `saml_logins`), a random browser secret
   in an HttpOnly SameSite=Lax cookie, and a redirect to the IdP.
2. `POST …/{id}/acs`: the Response is checked (python3-saml: signature, audience, recipient,
   validity window, InResponseTo the request of step 1) and its assertion id stored, unique,
   so it cannot be used twice; then a redirect carrying a one-time grant.
3. `GET …/{id}/complete?grant=…`: the same browser (its cookie from step 1) gets the account,
   created or brought up to date, and the refresh cookie; the page finishes as after a login.

Without step 3's cookie check, anyone holding a valid Response could sign a victim's browser
into the attacker's account (login CSRF). A failure answers problem JSON that says only that
the sign-in failed; the reason goes to the log and the audit row.

The MFA policy (`STREAMSPACE_MFA_REQUIRED_ROLES/_GROUPS`) and a user's own factors hold for
SAML accounts too: instead of the tokens, the completion then lands on the login page with an
`mfa_token`, where the second step (or the enrolment) follows as after a password.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from streamspace import logs
from streamspace.controlplane import audit
from streamspace.controlplane.api.auth import issue_tokens, set_refresh_cookie
from streamspace.controlplane.api.auth_directory import PROVISION_ATTEMPTS
from streamspace.controlplane.api.auth_oidc import login_page
from streamspace.controlplane.api.mfagate import demand_second_step
from streamspace.controlplane.api.schemas import SamlProviderOut
from streamspace.controlplane.browser import is_tls
from streamspace.controlplane.deps import DbDep, StateDep, writer_turn
from streamspace.controlplane.directory import DirectoryUser
from streamspace.controlplane.problems import Problem
from streamspace.controlplane.provisioning import SAML, NotProvisioned, Origin, provision
from streamspace.controlplane.saml import (
    SamlIdentity,
    SamlRefused,
    SamlUnavailable,
    ServiceProvider,
)
from streamspace.controlplane.security import random_secret, sha256
from streamspace.controlplane.state import AppState
from streamspace.db.models import SamlLogin, User

log = logs.get_logger("streamspace.auth")

router = APIRouter(prefix="/api/v1/auth/saml", tags=["auth"])

BROWSER_COOKIE = "streamspace_saml"
LOGIN_TTL = timedelta(minutes=10)
GRANT_TTL = timedelta(minutes=2)
MAX_RESPONSE = 256 * 1024
"""A SAMLResponse larger than this (base64) is refused before any XML is parsed."""


def _provider(state: AppState, provider_id: str) -> ServiceProvider:
    found = state.saml.get(provider_id)
    if found is None:
        raise Problem(
            404, "Not found", f"no SAML identity provider {provider_id!r}", kind="not-found"
        )
    return found


def _failed(detail: str = "the single sign-on did not succeed; start again") -> Problem:
    return Problem(401, "Unauthorized", detail, kind="sso-failed")


def _unavailable() -> Problem:
    return Problem(
        503,
        "Service unavailable",
        "the identity provider cannot be reached right now; try again later",
        kind="sso-unavailable",
    )


def _origin(sp: ServiceProvider) -> Origin:
    return Origin(f"{SAML}:{sp.id}", SAML, sp.provider.admin_group, sp.provider.operator_group)


async def _refuse(
    db: AsyncSession, request: Request, sp: ServiceProvider, reason: str, who: str = ""
) -> Problem:
    log.warning("saml_login_refused", provider=sp.id, reason=reason[:300], username=who)
    audit.record(
        db,
        actor=None,
        action="auth.login_failed",
        resource_type="user",
        resource_id=who or f"saml:{sp.id}",
        request=request,
        status_code=401,
        method="saml",
        provider=sp.id,
        reason=reason[:300],
    )
    await db.commit()
    return _failed()


@router.get("", response_model=list[SamlProviderOut])
async def providers(state: StateDep) -> list[SamlProviderOut]:
    """What the login page shows: one "Sign in with …" button per IdP."""
    return [
        SamlProviderOut(id=sp.id, name=sp.provider.name, login_url=f"{sp.base}/login")
        for sp in state.saml.by_id.values()
    ]


@router.get("/{provider_id}/metadata")
async def metadata(provider_id: str, state: StateDep) -> Response:
    sp = _provider(state, provider_id)
    return Response(sp.metadata(), media_type="application/samlmetadata+xml")


@router.get("/{provider_id}/login")
async def begin(provider_id: str, request: Request, state: StateDep, db: DbDep) -> Response:
    sp = _provider(state, provider_id)
    try:
        url, request_id = await sp.begin(relay_state=random_secret(16))
    except SamlUnavailable as exc:
        log.warning("saml_idp_unavailable", provider=sp.id, reason=str(exc)[:300])
        raise _unavailable() from None
    browser = random_secret(32)
    now = datetime.now(UTC)
    async with writer_turn(state, db):
        await db.execute(delete(SamlLogin).where(SamlLogin.expires_at < now))
        db.add(
            SamlLogin(
                id=request_id,
                provider=sp.id,
                browser_hash=sha256(browser),
                expires_at=now + LOGIN_TTL,
            )
        )
        await db.commit()
    resp = RedirectResponse(url, status_code=303)
    resp.set_cookie(
        BROWSER_COOKIE,
        browser,
        max_age=int(LOGIN_TTL.total_seconds()),
        path=f"/api/v1/auth/saml/{sp.id}",
        secure=is_tls(request.scope),
        httponly=True,
        samesite="lax",
    )
    return resp


def _in_response_to(saml_response: str) -> str:
    """The request ID the Response answers, read before it is checked (to find our row); the
    check itself compares it again."""
    import base64

    from lxml import etree

    try:
        xml = base64.b64decode(saml_response, validate=True)
        parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
        root = etree.fromstring(xml, parser)
    except (ValueError, etree.XMLSyntaxError):
        raise Problem(
            400, "Bad request", "SAMLResponse: not a base64 SAML document", kind="bad-request"
        ) from None
    value = root.get("InResponseTo")
    if not value:
        raise _failed("the identity provider's answer is not for a sign-in begun here")
    return str(value)


@router.post("/{provider_id}/acs")
async def consume(
    provider_id: str,
    request: Request,
    state: StateDep,
    db: DbDep,
    saml_response: Annotated[str, Form(alias="SAMLResponse", max_length=MAX_RESPONSE)],
    relay_state: Annotated[str, Form(alias="RelayState", max_length=256)] = "",
) -> Response:
    sp = _provider(state, provider_id)
    request_id = _in_response_to(saml_response)
    now = datetime.now(UTC)
    row = await db.get(SamlLogin, request_id)
    if row is None or row.provider != sp.id or row.expires_at <= now or row.assertion_id:
        raise await _refuse(db, request, sp, "no sign-in under way for this response")
    try:
        identity = await sp.consume(saml_response, relay_state, request_id)
    except SamlUnavailable as exc:
        log.warning("saml_idp_unavailable", provider=sp.id, reason=str(exc)[:300])
        raise _unavailable() from None
    except SamlRefused as exc:
        raise await _refuse(db, request, sp, str(exc)) from None
    grant = random_secret(32)
    remember_until = max(
        now + GRANT_TTL,
        datetime.fromtimestamp(identity.not_on_or_after, UTC)
        if identity.not_on_or_after
        else now + LOGIN_TTL,
    )
    async with writer_turn(state, db):
        taken = await db.execute(
            update(SamlLogin)
            .where(SamlLogin.id == request_id, SamlLogin.assertion_id.is_(None))
            .values(
                assertion_id=identity.assertion_id,
                grant_hash=sha256(grant),
                identity=_as_row(identity),
                expires_at=remember_until,
            )
        )
        stored = getattr(taken, "rowcount", 0) == 1
        try:
            await db.commit()
        except IntegrityError:  # the same assertion id, kept by an earlier sign-in
            await db.rollback()
            stored = False
    if not stored:
        raise await _refuse(db, request, sp, "replayed assertion", identity.username)
    return RedirectResponse(f"{sp.base}/complete?grant={grant}", status_code=303)


def _as_row(identity: SamlIdentity) -> dict[str, Any]:
    return {
        "username": identity.username,
        "email": identity.email,
        "display_name": identity.display_name,
        "groups": list(identity.groups),
    }


@router.get("/{provider_id}/complete")
async def complete(
    provider_id: str,
    request: Request,
    state: StateDep,
    db: DbDep,
    grant: Annotated[str, Query(min_length=16, max_length=128)],
) -> Response:
    sp = _provider(state, provider_id)
    browser = request.cookies.get(BROWSER_COOKIE, "")
    now = datetime.now(UTC)
    row = await db.scalar(select(SamlLogin).where(SamlLogin.grant_hash == sha256(grant)))
    if (
        row is None
        or row.provider != sp.id
        or row.completed_at is not None
        or row.identity is None
        or not browser
        or sha256(browser) != row.browser_hash
    ):
        raise await _refuse(db, request, sp, "grant unknown, used, or for another browser")
    entry = DirectoryUser(
        dn="",
        username=str(row.identity["username"]),
        display_name=str(row.identity.get("display_name", "")),
        email=str(row.identity.get("email", "")),
        groups=tuple(str(g) for g in row.identity.get("groups", [])),
    )
    user: User | None = None
    role_changed = False
    async with writer_turn(state, db):
        marked = await db.execute(
            update(SamlLogin)
            .where(SamlLogin.id == row.id, SamlLogin.completed_at.is_(None))
            .values(completed_at=now)
        )
        if getattr(marked, "rowcount", 0) != 1:
            await db.rollback()
            raise await _refuse(db, request, sp, "grant already used", entry.username)
        for attempt in range(PROVISION_ATTEMPTS):
            try:
                done = await provision(db, entry, _origin(sp))
                user, role_changed = done.user, done.role_changed
                break
            except NotProvisioned as exc:
                await db.commit()
                raise await _refuse(db, request, sp, str(exc), entry.username) from None
            except IntegrityError:
                await db.rollback()
                if attempt == PROVISION_ATTEMPTS - 1:
                    raise
        assert user is not None
        if not user.is_active:
            await db.commit()
            raise _failed("this account is disabled")
        await db.commit()
        if role_changed:
            state.revocations.revoke(
                user.id, f"signed out: the identity provider's groups made the role {user.role}"
            )
        refresh: str | None = None
        try:
            # The MFA policy holds for SSO accounts too: the login page asks for the factor.
            await demand_second_step(db, state.settings, state.secret, user, "cookie")
            _tokens, refresh = await issue_tokens(state, db, user, request=request, method="saml")
            target = login_page({"sso": sp.id})
        except Problem as step:
            target = login_page(
                {
                    "mfa": step.kind,
                    "mfa_token": str(step.extra.get("mfa_token", "")),
                    "methods": ",".join(step.extra.get("methods", [])),
                }
            )
        audit.record(
            db,
            actor=user,
            action="auth.login",
            resource_type="user",
            resource_id=user.id,
            request=request,
            method="saml",
            provider=sp.id,
            second_step=refresh is None,
        )
        await db.commit()
    log.event("saml_login", provider=sp.id, user_id=user.id, second_step=refresh is None)
    resp = RedirectResponse(target, status_code=303)
    if refresh is not None:
        set_refresh_cookie(request, state, resp, refresh)
    resp.delete_cookie(BROWSER_COOKIE, path=f"/api/v1/auth/saml/{sp.id}")
    return resp
