"""Sign in with an OpenID Provider in Chromium: the real product (`streamspace up`) and a real
provider (npm `oidc-provider`, tests/streamspace_testing/oidc.py). The user clicks "Sign in
with …", logs in on the provider's own page, lands on the catalog signed in; logging out ends
the provider's session too (RP-initiated logout) and comes back to the login page.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from test_browser import MISSING, Watched, artifacts_on_failure, browser, watched  # noqa: F401

from conftest import require
from product_support import Product
from streamspace_testing.oidc import MISSING as OIDC_MISSING
from streamspace_testing.oidc import Client, OpenIdProviderServer

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def with_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Product, Any]]:
    require(MISSING)
    require(OIDC_MISSING)
    op = OpenIdProviderServer()
    ours = Client("streamspace", "streamspace-client-secret", [])
    settings = op.provider_settings(ours, name="Example SSO", group_map={"design": "designers"})
    p = Product(
        tmp_path_factory.mktemp("e2e-oidc") / "data",
        env={"STREAMSPACE_OIDC_PROVIDERS": json.dumps([settings])},
    )
    ours.redirect_uris = [f"{p.url}/api/v1/auth/oidc/testop/callback"]
    op.clients = [ours]
    op.start()
    try:
        p.start()
        yield p, op
    finally:
        p.stop()
        op.stop()


def test_sign_in_with_a_provider_lands_on_the_catalog(
    with_provider: tuple[Product, Any], watched: Watched
) -> None:
    product, op = with_provider
    page = watched.page
    with artifacts_on_failure(watched, product, "oidc_sign_in"):
        page.goto(f"{product.url}/#/login")
        button = page.get_by_test_id("sso-testop")
        button.wait_for()
        assert button.inner_text() == "Sign in with Example SSO"
        button.click()
        page.wait_for_url(f"{op.issuer}/interaction/**")
        page.locator('input[name="login"]').fill("oscar")
        page.locator('input[name="password"]').fill("any")
        page.locator('button[type="submit"]').click()
        page.wait_for_url(f"{product.url}/#/catalog")
        page.get_by_test_id("launch-xterm").wait_for()
        assert "Oscar Example" in page.get_by_test_id("current-user").inner_text()
        # the refresh token is an HttpOnly cookie; nothing of the sign-in is in page storage
        assert page.evaluate("() => Object.keys(sessionStorage).length") == 0
        assert page.evaluate("() => Object.keys(localStorage)") == ["streamspace.hasSession"]

        page.get_by_test_id("logout").click()
        page.wait_for_url(f"{op.issuer}/session/end**")
        page.locator('button[autofocus], button[type="submit"]').first.click()
        page.wait_for_url(f"{product.url}/#/login*")
        page.get_by_test_id("login-form").wait_for()
        # signed out here: a reload does not bring the session back
        page.reload()
        page.get_by_test_id("login-form").wait_for()
