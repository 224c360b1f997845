"""Single sign-on in Chromium: "Sign in with Corp SSO", the IdP's own login page (pysaml2's
IdP, streamspace_testing.saml_idp), and back on the catalog, signed in as the IdP's user."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from test_browser import MISSING, Watched, artifacts_on_failure, browser, watched  # noqa: F401

from conftest import require
from product_support import Product
from streamspace_testing.saml_idp import ATTRIBUTES, SAML_IDP_MISSING, USERS, SamlIdp

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SamlIdp]:
    require(SAML_IDP_MISSING)
    server = SamlIdp(tmp_path_factory.mktemp("idp")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory, idp: SamlIdp) -> Iterator[Product]:
    require(MISSING)
    p = Product(tmp_path_factory.mktemp("e2e-saml") / "data")
    provider = {
        "id": "corp",
        "name": "Corp SSO",
        "idp_metadata_url": idp.metadata_url,
        "username_attribute": ATTRIBUTES["uid"],
        "email_attribute": ATTRIBUTES["email"],
        "display_name_attribute": ATTRIBUTES["display_name"],
        "groups_attribute": ATTRIBUTES["groups"],
    }
    p.extra_env = {
        "STREAMSPACE_PUBLIC_URL": p.url,
        "STREAMSPACE_SAML_PROVIDERS": json.dumps([provider]),
    }
    try:
        p.start()
        idp.trust_sp(f"{p.url}/api/v1/auth/saml/corp/metadata")
        yield p
    finally:
        p.stop()


def test_sign_in_with_the_identity_provider_lands_on_the_catalog(
    product: Product, watched: Watched
) -> None:
    page = watched.page
    with artifacts_on_failure(watched, product, "saml-sign-in"):
        page.goto(f"{product.url}/#/login")
        page.get_by_test_id("sso-corp").click()
        page.wait_for_url("**/sso/redirect?**")  # the IdP's page now
        page.fill("#idp-username", "erin")
        page.fill("#idp-password", USERS["erin"].password)
        page.click("#idp-submit")
        page.wait_for_url("**/#/catalog")
        page.get_by_test_id("launch-xterm").wait_for()
        me = page.evaluate("""async () => (await import('/static/api.js')).auth.user""")
        assert me["username"] == "erin" and me["auth_source"] == "saml:corp"
        page.reload()  # the sign-in lives in the refresh cookie, like a password login's
        page.get_by_test_id("launch-xterm").wait_for()
        assert "/#/catalog" in page.url
        assert not watched.csp_violations(), watched.csp_violations()
