"""OpenID Connect login through the product against a real OpenID Provider (npm
`oidc-provider`, tests/streamspace_testing/oidc.py): the code flow with PKCE, just-in-time
accounts with mapped groups and a role from a group, and the refusals: a wrong `state`, a
replayed code, a token for another client, an expired token (a provider whose clock is
behind), a key the product has not fetched and one the provider never
published; the provider's key rotation is followed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

from conftest import require
from streamspace.config import OidcProvider
from streamspace.controlplane.oidc import OpenIdProvider, TokenRejected, pkce_pair
from streamspace_testing.oidc import MISSING, Client, OpenIdProviderServer, new_key, sign_in

CALLBACK = "/api/v1/auth/oidc/testop/callback"


@pytest.fixture
def provider() -> Iterator[OpenIdProviderServer]:
    require(MISSING)
    server = OpenIdProviderServer()
    yield server
    server.stop()


def start_cp(
    make_control_plane: Any,
    op: OpenIdProviderServer,
    db_url: str = "",
    cp_settings: dict[str, Any] | None = None,
    **extra: Any,
) -> Any:
    ours = Client("streamspace", "streamspace-client-secret", [])
    other = Client("other-app", "other-client-secret", [])
    settings = op.provider_settings(
        ours,
        group_map={"engineering": "engineers", "design": "designers"},
        admin_group="sso-admins",
        **extra,
    )
    cp = make_control_plane(
        database_url=db_url, oidc_providers=[settings], **NO_LIMIT, **(cp_settings or {})
    )
    ours.redirect_uris = [f"{cp.url}{CALLBACK}"]
    other.redirect_uris = ["http://127.0.0.1:9/callback"]
    op.clients = [ours, other]
    op.start()
    return cp


def begin(rp: httpx.Client) -> httpx.Response:
    r = rp.get("/api/v1/auth/oidc/testop/login", params={"next": "#/sessions"})
    assert r.status_code == 302, r.text
    return r


def oidc_login(
    cp: Any, op: OpenIdProviderServer, username: str
) -> tuple[httpx.Client, httpx.Response, str]:
    """The whole flow as a browser does it; returns the relying party's client (its cookies),
    the callback's answer and the callback URL."""
    rp = client(cp)
    with httpx.Client(base_url=op.issuer, timeout=30) as browser:
        back = sign_in(browser, begin(rp), username)
    assert back.startswith(f"{cp.url}{CALLBACK}?"), back
    return rp, rp.get(back), back


def finish(rp: httpx.Client) -> dict[str, Any]:
    r = rp.post("/api/v1/auth/refresh", headers={"X-StreamSpace-CSRF": "1"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_first_login_creates_the_account_with_groups_and_role(
    make_control_plane: Any, provider: OpenIdProviderServer
) -> None:
    cp = start_cp(make_control_plane, provider)
    start = begin(client(cp))
    query = parse_qs(urlsplit(start.headers["location"]).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["state"][0] and query["nonce"][0]
    flow_cookie = start.headers["set-cookie"]
    assert "HttpOnly" in flow_cookie and "samesite=lax" in flow_cookie.lower()

    rp, r, _ = oidc_login(cp, provider, "olivia")
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/#/login?sso=testop&next=%23%2Fsessions"
    me = finish(rp)["user"]
    assert me["username"] == "olivia" and me["auth_source"] == "oidc:testop"
    assert me["role"] == "admin" and me["email"] == "olivia@example.com"

    admin = login(cp)
    found = {g["name"]: g for g in admin.get("/api/v1/groups").json()}
    assert found["engineers"]["members"] == ["olivia"]
    assert found["engineers"]["source"] == "oidc"
    assert "sso-admins" not in found  # only mapped groups become StreamSpace groups

    rp2, r, _ = oidc_login(cp, provider, "oscar")
    assert r.status_code == 303
    assert finish(rp2)["user"]["role"] == "user"
    found = {g["name"]: g for g in admin.get("/api/v1/groups").json()}
    assert found["designers"]["members"] == ["oscar"]

    audit = admin.get("/api/v1/audit", params={"action": "auth.login", "actor": "olivia"}).json()
    assert audit["items"][0]["detail"]["method"] == "oidc:testop"
    assert audit["items"][0]["detail"]["created"] is True

    # an OIDC account has no password here: neither an empty nor any other one logs it in
    with client(cp) as anon:
        for password in ("", "any", "streamspace-client-secret"):
            r = anon.post("/api/v1/auth/login", json={"username": "olivia", "password": password})
            assert r.status_code in (401, 422), r.text
    with client(cp, finish(rp)["access_token"]) as olivia:
        r = olivia.post(
            "/api/v1/auth/password",
            json={"current_password": "x", "new_password": "a-long-new-password-42"},
        )
        assert_problem(r, 400, "identity provider")


def test_a_local_account_is_never_taken_over(
    make_control_plane: Any, provider: OpenIdProviderServer
) -> None:
    cp = start_cp(make_control_plane, provider)
    _, r, _ = oidc_login(cp, provider, "admin")
    assert_problem(r, 401, "cannot be used here")
    audit = login(cp).get("/api/v1/audit", params={"action": "auth.login_failed"}).json()
    assert audit["items"][0]["detail"]["method"] == "oidc:testop"


def test_wrong_state_and_replayed_code_are_refused(
    make_control_plane: Any, provider: OpenIdProviderServer
) -> None:
    cp = start_cp(make_control_plane, provider)
    rp = client(cp)
    with httpx.Client(base_url=provider.issuer, timeout=30) as browser:
        back = sign_in(browser, begin(rp), "oscar")
    flow = rp.cookies.get("streamspace_oidc_flow")
    assert flow
    code = parse_qs(urlsplit(back).query)["code"][0]
    assert_problem(rp.get(CALLBACK, params={"code": code, "state": "forged"}), 400, "state")
    # another browser (no flow cookie) cannot use the answer either
    assert_problem(client(cp).get(back), 400, "no sign-in is under way")

    r = rp.get(back)
    assert r.status_code == 303, r.text
    # the same answer again, even with the flow cookie put back: the code is spent
    rp.cookies.set("streamspace_oidc_flow", flow, path=CALLBACK)
    assert_problem(rp.get(back), 401, "refused the code")


def test_bad_inputs_are_problems(make_control_plane: Any, provider: OpenIdProviderServer) -> None:
    cp = start_cp(make_control_plane, provider)
    with client(cp) as anon:
        r = anon.get("/api/v1/auth/oidc/providers")
        assert r.status_code == 200
        assert r.json() == {"providers": [{"id": "testop", "name": "Test Provider"}]}
        assert_problem(anon.get("/api/v1/auth/oidc/nope/login"), 404, "nope")
        assert_problem(anon.get("/api/v1/auth/oidc/NOT_AN_ID!/login"), 422)
        assert_problem(anon.get("/api/v1/auth/oidc/nope/callback?code=a&state=b"), 404)
        assert_problem(anon.get(CALLBACK, params={"code": "a", "state": "b"}), 400)
        assert_problem(anon.get(CALLBACK, params={"code": "a" * 5000, "state": "b"}), 422)
        rp = client(cp)
        begin(rp)
        assert_problem(rp.get(CALLBACK), 400, "code and state")
        assert_problem(rp.get(CALLBACK, params={"error": "access_denied"}), 401, "did not sign")
        rp.cookies.set("streamspace_oidc_flow", "tampered.value.here", path=CALLBACK)
        assert_problem(rp.get(CALLBACK, params={"code": "a", "state": "b"}), 400, "tampered")
        r = anon.get("/api/v1/auth/oidc/logout")
        assert r.status_code == 303 and r.headers["location"] == f"{cp.url}/"


def test_logout_goes_to_the_providers_end_session(
    make_control_plane: Any, provider: OpenIdProviderServer
) -> None:
    cp = start_cp(make_control_plane, provider)
    rp, r, _ = oidc_login(cp, provider, "oscar")
    assert r.status_code == 303
    r = rp.get("/api/v1/auth/oidc/logout")
    assert r.status_code == 303
    target = urlsplit(r.headers["location"])
    assert f"{target.scheme}://{target.netloc}" == provider.issuer
    query = parse_qs(target.query)
    assert query["post_logout_redirect_uri"] == [f"{cp.url}/"]
    claims = jwt.decode(query["id_token_hint"][0], options={"verify_signature": False})
    assert claims["sub"] == "oscar"
    # the provider accepts the request (its confirmation page, not an error)
    page = httpx.get(r.headers["location"])
    assert page.status_code == 200, provider.log() + re.sub(
        r"<style>.*?</style>", "", page.text, flags=re.S
    )
    assert "logout" in page.text.lower()


def test_rotated_provider_keys_are_followed(
    make_control_plane: Any, provider: OpenIdProviderServer
) -> None:
    cp = start_cp(make_control_plane, provider, cp_settings={"oidc_keys_refetch_seconds": 0})
    rp, r, _ = oidc_login(cp, provider, "oscar")
    assert r.status_code == 303
    provider.restart([new_key("key-2")[1]])
    rp, r, _ = oidc_login(cp, provider, "oscar")
    assert r.status_code == 303, r.text
    assert finish(rp)["user"]["username"] == "oscar"


def test_a_key_the_product_has_not_fetched_is_refused(
    make_control_plane: Any, provider: OpenIdProviderServer
) -> None:
    """Keys are fetched again at most every `oidc_keys_refetch_seconds`: within that, a token
    signed with a key id the product never saw is refused through the product."""
    cp = start_cp(make_control_plane, provider, cp_settings={"oidc_keys_refetch_seconds": 3600})
    _, r, _ = oidc_login(cp, provider, "oscar")
    assert r.status_code == 303
    provider.restart([new_key("key-2")[1]])
    _, r, _ = oidc_login(cp, provider, "oscar")
    assert_problem(r, 401, "unknown key id 'key-2'")
    admin = login(cp)
    failed = admin.get("/api/v1/audit", params={"action": "auth.login_failed"}).json()
    assert "unknown key id" in failed["items"][0]["detail"]["reason"]


def test_an_expired_id_token_is_refused(
    make_control_plane: Any, provider: OpenIdProviderServer
) -> None:
    """A provider whose clock runs 3 minutes behind issues ID tokens valid for one minute:
    they expired two minutes ago by our clock, beyond the 30 s of skew allowed."""
    provider.id_token_ttl = 60
    provider.clock_behind = 180
    cp = start_cp(make_control_plane, provider, cp_settings={"oidc_clock_skew_seconds": 30})
    _, r, _ = oidc_login(cp, provider, "oscar")
    assert_problem(r, 401, "expired")


def _other_clients_id_token(op: OpenIdProviderServer, nonce: str) -> str:
    """A real ID token the provider issues to the second client (the test acts as it)."""
    verifier, challenge = pkce_pair()
    other = op.clients[1]
    with httpx.Client(base_url=op.issuer, timeout=30) as browser:
        start = httpx.Response(
            302,
            headers={
                "location": f"{op.issuer}/auth?"
                + httpx.QueryParams(
                    response_type="code",
                    client_id=other.client_id,
                    redirect_uri=other.redirect_uris[0],
                    scope="openid",
                    state="s",
                    nonce=nonce,
                    code_challenge=challenge,
                    code_challenge_method="S256",
                ).__str__()
            },
        )
        back = sign_in(browser, start, "oscar")
        code = parse_qs(urlsplit(back).query)["code"][0]
        r = browser.post(
            "/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": other.redirect_uris[0],
                "code_verifier": verifier,
            },
            auth=(other.client_id, other.client_secret),
        )
    assert r.status_code == 200, r.text
    token: str = r.json()["id_token"]
    return token


def test_id_token_checks(make_control_plane: Any, provider: OpenIdProviderServer) -> None:
    """The product's verifier, given real tokens from the provider: another client's token,
    an expired one, one signed with a key the provider never published."""
    start_cp(make_control_plane, provider)
    ours = provider.clients[0]
    token = _other_clients_id_token(provider, nonce="n-1")
    claims = jwt.decode(token, options={"verify_signature": False})

    async def check(
        config_client_id: str, token: str, clock: float | None = None, nonce: str = "n-1"
    ) -> str:
        async with httpx.AsyncClient() as http:
            verifier = OpenIdProvider(
                config=OidcProvider(
                    id="testop", name="t", issuer=provider.issuer, client_id=config_client_id
                ),
                http=http,
                skew_seconds=60,
                clock=(lambda: clock) if clock is not None else time.time,
            )
            try:
                await verifier.verify_id_token(token, nonce=nonce)
            except TokenRejected as exc:
                return str(exc)
            return "accepted"

    assert asyncio.run(check("other-app", token)) == "accepted"  # the control: it is valid
    assert "another client" in asyncio.run(check(ours.client_id, token))
    late = claims["exp"] + 61
    assert "expired" in asyncio.run(check("other-app", token, clock=late))
    assert asyncio.run(check("other-app", token, clock=claims["exp"] + 59)) == "accepted"

    key, _ = new_key("never-published")
    forged = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "never-published"})
    assert "unknown key id" in asyncio.run(check("other-app", forged))
    same_kid = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "key-1"})
    assert "signature" in asyncio.run(check("other-app", same_kid))
    assert "nonce" in asyncio.run(check("other-app", token, nonce="another-login"))
    unsigned = jwt.encode(claims, "", algorithm="none")
    assert "algorithm" in asyncio.run(check("other-app", unsigned))


def test_policy_second_step_and_allowed_domains_apply(
    make_control_plane: Any, provider: OpenIdProviderServer
) -> None:
    cp = start_cp(
        make_control_plane,
        provider,
        cp_settings={"mfa_required_roles": ["admin"]},
        allowed_email_domains=["example.com"],
    )
    # olivia is an admin through her provider group: the MFA policy asks her to enrol first,
    # and no refresh cookie is set until she has
    rp, r, _ = oidc_login(cp, provider, "olivia")
    assert r.status_code == 303, r.text
    target = urlsplit(r.headers["location"])
    step = parse_qs(target.fragment.partition("?")[2])
    assert step["mfa"] == ["mfa-enrolment-required"] and step["mfa_token"][0]
    assert rp.cookies.get("streamspace_refresh") is None
    r = rp.post("/api/v1/auth/mfa/totp", json={"mfa_token": step["mfa_token"][0]})
    assert r.status_code == 201, r.text  # the token starts the product's own enrolment

    # mallory's address is outside the allowed domains
    _, r, _ = oidc_login(cp, provider, "mallory")
    assert_problem(r, 401, "email domain")
