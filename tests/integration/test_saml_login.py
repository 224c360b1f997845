"""SAML 2.0 sign-in through the product against a real IdP: pysaml2's, in streamspace_testing.

The SP is python3-saml; the IdP registers it from the product's own metadata endpoint, as an
IdP administrator does. The whole flow runs over HTTP as a browser makes it (redirect to the
IdP, its login form, the auto-posted Response, the completion with the cookie set at the
start), and every refusal is a response the product itself is handed: unsigned, signed with a
key the IdP's metadata does not hold, for another audience, expired, replayed, answered to a
sign-in begun elsewhere, or completed in another browser.
"""

from __future__ import annotations

import base64
import html
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from api_support import (
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

from conftest import ControlPlane, require
from streamspace_testing.saml_idp import ATTRIBUTES, SAML_IDP_MISSING, USERS, SamlIdp

PROVIDER = "corp"


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[SamlIdp]:
    require(SAML_IDP_MISSING)
    server = SamlIdp(tmp_path / "idp").start()
    yield server
    server.stop()


def saml_cp(
    tmp_path: Path,
    idp: SamlIdp,
    database_url: str = "",
    settings: dict[str, Any] | None = None,
    **provider: Any,
) -> ControlPlane:
    cp = ControlPlane(tmp_path / "cp", database_url=database_url, **(settings or {}))
    config = {
        "id": PROVIDER,
        "name": "Corp SSO",
        "idp_metadata_url": idp.metadata_url,
        "username_attribute": ATTRIBUTES["uid"],
        "email_attribute": ATTRIBUTES["email"],
        "display_name_attribute": ATTRIBUTES["display_name"],
        "groups_attribute": ATTRIBUTES["groups"],
        "admin_group": "admins",
        **provider,
    }
    from streamspace.config import Settings

    cp.settings = Settings.model_validate(
        {**cp.settings.model_dump(), "public_url": cp.url, "saml_providers": [config]}
    )
    cp.start()
    idp.trust_sp(f"{cp.url}/api/v1/auth/saml/{PROVIDER}/metadata")
    return cp


@pytest.fixture
def cp(tmp_path: Path, idp: SamlIdp, db_url: str) -> Iterator[ControlPlane]:
    plane = saml_cp(tmp_path, idp, db_url)
    yield plane
    plane.stop()


def browser(cp: ControlPlane) -> httpx.Client:
    return httpx.Client(base_url=cp.url, timeout=30, follow_redirects=False)


def begin(b: httpx.Client) -> str:
    """Start a sign-in: the IdP URL the product sends the browser to."""
    r = b.get(f"/api/v1/auth/saml/{PROVIDER}/login")
    assert r.status_code == 303, r.text
    return r.headers["location"]


def saml_request(idp_url: str) -> tuple[str, str]:
    query = parse_qs(urlparse(idp_url).query)
    return query["SAMLRequest"][0], query.get("RelayState", [""])[0]


def at_idp(idp_url: str, username: str, password: str) -> httpx.Response:
    """What a user does at the IdP: open its page, fill in the form, submit it."""
    with httpx.Client(timeout=30) as b:
        page = b.get(idp_url)
        assert page.status_code == 200 and 'id="idp-username"' in page.text
        fields = dict(re.findall(r'name="(SAMLRequest|RelayState)" value="([^"]*)"', page.text))
        fields = {k: html.unescape(v) for k, v in fields.items()}
        return b.post(
            f"{urlparse(idp_url).scheme}://{urlparse(idp_url).netloc}/sso/login",
            data={**fields, "username": username, "password": password},
        )


def posted_form(page: str) -> tuple[str, dict[str, str]]:
    action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page)[1])  # type: ignore[index]
    fields = {
        k: html.unescape(v)
        for k, v in re.findall(r'name="(SAMLResponse|RelayState)" value="([^"]*)"', page)
    }
    return action, fields


def post_response(b: httpx.Client, acs: str, saml_response: str, relay: str) -> httpx.Response:
    return b.post(acs, data={"SAMLResponse": saml_response, "RelayState": relay})


def finish(b: httpx.Client, acs_answer: httpx.Response) -> dict[str, Any]:
    """Follow the ACS's redirect to the completion, then sign in as the page does."""
    assert acs_answer.status_code == 303, acs_answer.text
    done = b.get(acs_answer.headers["location"])
    assert done.status_code == 303, done.text
    assert done.headers["location"] == f"/#/login?sso={PROVIDER}"
    r = b.post("/api/v1/auth/refresh", headers={"X-StreamSpace-CSRF": "1"})
    assert r.status_code == 200, r.text
    tokens: dict[str, Any] = r.json()
    return tokens


def sign_in(cp: ControlPlane, username: str = "erin") -> dict[str, Any]:
    with browser(cp) as b:
        page = at_idp(begin(b), username, USERS[username].password)
        assert page.status_code == 200, page.text
        acs, fields = posted_form(page.text)
        assert acs == f"{cp.url}/api/v1/auth/saml/{PROVIDER}/acs"
        return finish(b, post_response(b, acs, fields["SAMLResponse"], fields["RelayState"]))


def test_metadata_and_provider_list_are_public(cp: ControlPlane) -> None:
    with client(cp) as anon:
        r = anon.get("/api/v1/auth/saml")
        assert r.status_code == 200
        assert r.json() == [
            {
                "id": PROVIDER,
                "name": "Corp SSO",
                "login_url": f"{cp.url}/api/v1/auth/saml/{PROVIDER}/login",
            }
        ]
        md = anon.get(f"/api/v1/auth/saml/{PROVIDER}/metadata")
        assert md.status_code == 200
        assert md.headers["content-type"].startswith("application/samlmetadata+xml")
        assert f'entityID="{cp.url}/api/v1/auth/saml/{PROVIDER}/metadata"' in md.text
        assert f'Location="{cp.url}/api/v1/auth/saml/{PROVIDER}/acs"' in md.text
        assert 'WantAssertionsSigned="true"' in md.text
        assert_problem(
            anon.get("/api/v1/auth/saml/nope/metadata"), 404, "no SAML identity provider"
        )
        assert_problem(anon.get("/api/v1/auth/saml/nope/login"), 404)


def test_first_sign_in_creates_the_account_with_groups_and_role(cp: ControlPlane) -> None:
    tokens = sign_in(cp, "erin")
    user = tokens["user"]
    assert user["username"] == "erin" and user["auth_source"] == f"saml:{PROVIDER}"
    assert user["email"] == "erin@example.org" and user["display_name"] == "Erin Example"
    assert user["role"] == "user"
    with client(cp, tokens["access_token"]) as erin:
        assert erin.get("/api/v1/auth/me").json()["username"] == "erin"
    frank = sign_in(cp, "frank")["user"]
    assert frank["role"] == "admin"  # IdP group "admins"
    admin = login(cp)
    groups = {g["name"]: g for g in admin.get("/api/v1/groups").json()}
    assert groups["engineers"]["source"] == "saml" and groups["engineers"]["members"] == ["erin"]
    assert groups["ops"]["members"] == ["frank"]
    audit = admin.get("/api/v1/audit", params={"action": "auth.login"}).json()
    rows = audit["items"] if isinstance(audit, dict) else audit
    assert any(r.get("detail", {}).get("method") == "saml" for r in rows), rows

    # An account the IdP made has no password: the password login refuses it.
    with client(cp) as anon:
        r = anon.post("/api/v1/auth/login", json={"username": "erin", "password": ""})
        assert r.status_code in (401, 422)
        r = anon.post(
            "/api/v1/auth/login", json={"username": "erin", "password": USERS["erin"].password}
        )
        assert_problem(r, 401, "wrong username or password")


def test_a_second_sign_in_follows_the_idp_groups(cp: ControlPlane, idp: SamlIdp) -> None:
    sign_in(cp, "erin")
    idp.users["erin"] = USERS["erin"].__class__(
        USERS["erin"].password, "erin@example.org", "Erin Renamed", ("designers",)
    )
    user = sign_in(cp, "erin")["user"]
    assert user["display_name"] == "Erin Renamed"
    admin = login(cp)
    groups = {g["name"]: g for g in admin.get("/api/v1/groups").json()}
    assert groups["designers"]["members"] == ["erin"]
    assert groups["engineers"]["members"] == []


def test_a_local_account_is_never_taken_over(cp: ControlPlane) -> None:
    admin = login(cp)
    r = admin.post(
        "/api/v1/users",
        json={"username": "erin", "password": "Local-erin-pw-8812!", "role": "user"},
    )
    assert r.status_code == 201, r.text
    with browser(cp) as b:
        page = at_idp(begin(b), "erin", USERS["erin"].password)
        acs, fields = posted_form(page.text)
        r = post_response(b, acs, fields["SAMLResponse"], fields["RelayState"])
        assert r.status_code == 303
        assert_problem(b.get(r.headers["location"]), 401, "single sign-on did not succeed")


@pytest.mark.parametrize(
    ("knobs", "why"),
    [
        ({"sign": False}, "not signed"),
        ({"rogue_key": True}, "Signature validation failed"),
        ({"audience": "http://elsewhere.example/sp"}, "not a valid audience"),
        ({"lifetime_minutes": -10}, "expired"),
    ],
    ids=["unsigned", "wrong-key", "wrong-audience", "expired"],
)
def test_responses_the_sp_must_refuse(
    cp: ControlPlane, idp: SamlIdp, knobs: dict[str, Any], why: str
) -> None:
    with browser(cp) as b:
        request, relay = saml_request(begin(b))
        acs, response = idp.response_for(request, "erin", **knobs)
        r = post_response(b, acs, response, relay)
        assert_problem(r, 401, "single sign-on did not succeed")
    admin = login(cp)
    rows = admin.get("/api/v1/audit", params={"action": "auth.login_failed"}).json()
    rows = rows["items"] if isinstance(rows, dict) else rows
    assert any(why.lower() in r.get("detail", {}).get("reason", "").lower() for r in rows), rows
    users = [u["username"] for u in admin.get("/api/v1/users").json()["items"]]
    assert "erin" not in users


def test_a_replayed_response_and_a_reused_grant_are_refused(cp: ControlPlane, idp: SamlIdp) -> None:
    with browser(cp) as b:
        request, relay = saml_request(begin(b))
        acs, response = idp.response_for(request, "erin")
        first = post_response(b, acs, response, relay)
        assert first.status_code == 303
        assert_problem(post_response(b, acs, response, relay), 401)  # the same Response again
        finish(b, first)
        assert_problem(b.get(first.headers["location"]), 401)  # the grant is single-use


def with_other_id(saml_request: str) -> str:
    """The same AuthnRequest under an ID this SP never issued (Redirect binding: deflated)."""
    raw = zlib.decompress(base64.b64decode(saml_request), -15).decode()
    raw = re.sub(r'ID="[^"]+"', 'ID="id-never-issued-by-the-sp"', raw, count=1)
    packed = zlib.compressobj(wbits=-15)
    return base64.b64encode(packed.compress(raw.encode()) + packed.flush()).decode()


def test_a_response_to_a_sign_in_begun_elsewhere_is_refused(cp: ControlPlane, idp: SamlIdp) -> None:
    """Unsolicited (InResponseTo a request this SP never made), or completed in a browser that
    did not begin the sign-in (login CSRF)."""
    with browser(cp) as b:
        request, relay = saml_request(begin(b))
        acs, response = idp.response_for(with_other_id(request), "erin")
        assert_problem(post_response(b, acs, response, relay), 401)
    with browser(cp) as attacker:
        request, relay = saml_request(begin(attacker))
        acs, response = idp.response_for(request, "erin")
        granted = post_response(attacker, acs, response, relay)
        assert granted.status_code == 303
    with browser(cp) as victim:  # the attacker's grant, in the victim's browser
        assert_problem(victim.get(granted.headers["location"]), 401)
    with browser(cp) as victim:
        victim.cookies.set("streamspace_saml", "a-cookie-of-another-sign-in-000000")
        assert_problem(victim.get(granted.headers["location"]), 401)


def test_bad_input_answers_problem_json(cp: ControlPlane) -> None:
    with browser(cp) as b:
        acs = f"/api/v1/auth/saml/{PROVIDER}/acs"
        assert_problem(b.post(acs, data={}), 422)
        assert_problem(b.post(acs, data={"SAMLResponse": "%%%not-base64"}), 400, "base64")
        assert_problem(b.post(acs, data={"SAMLResponse": "PGEvPg=="}), 401)  # <a/>: no request
        assert_problem(b.post(acs, data={"SAMLResponse": "A" * 300_000}), 422)
        done = f"/api/v1/auth/saml/{PROVIDER}/complete"
        assert_problem(b.get(done), 422)
        assert_problem(b.get(done, params={"grant": "x" * 40}), 401)


def test_the_mfa_policy_holds_for_saml_accounts(tmp_path: Path, idp: SamlIdp) -> None:
    """An admin by IdP group, with admins required to use a second factor: no tokens, the
    login page's enrolment step instead."""
    plane = saml_cp(tmp_path, idp, settings={"mfa_required_roles": ["admin"]})
    try:
        with browser(plane) as b:
            page = at_idp(begin(b), "frank", USERS["frank"].password)
            acs, fields = posted_form(page.text)
            r = post_response(b, acs, fields["SAMLResponse"], fields["RelayState"])
            done = b.get(r.headers["location"])
            assert done.status_code == 303
            where = done.headers["location"]
            assert where.startswith("/#/login?mfa=") and "mfa_token=" in where, where
            assert "mfa-enrolment-required" in where
            assert "streamspace_refresh" not in done.headers.get("set-cookie", "")
            refused = b.post("/api/v1/auth/refresh", headers={"X-StreamSpace-CSRF": "1"})
            assert refused.status_code == 401
        erin = sign_in(plane, "erin")  # a plain user: no factor required, signed in
        assert erin["user"]["role"] == "user"
    finally:
        plane.stop()


def test_an_unreachable_idp_is_a_503(tmp_path: Path, idp: SamlIdp) -> None:
    plane = saml_cp(tmp_path, idp, idp_metadata_url="http://127.0.0.1:9/metadata")
    try:
        with browser(plane) as b:
            assert_problem(b.get(f"/api/v1/auth/saml/{PROVIDER}/login"), 503, "cannot be reached")
    finally:
        plane.stop()
