"""An admin's "Sign out everywhere" on the Users page, through real Chromium (issue 12, part 4).

The real product (`streamspace up`) and two browser contexts, as two people would use it: the
user watches their xterm in the viewer; the admin, on the Users page, clicks "Sign out
everywhere" on the user's row. The user's viewer must drop within 2 s (the server closed it:
nothing in the user's browser did) and the user ends up on the login page.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ADMIN_PASSWORD, XVNC_MISSING, require, wait_state
from product_support import Product

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
WEB = Path(__file__).resolve().parents[2] / "src" / "streamspace" / "controlplane" / "web"
PASSWORD = "user-pass-123"


def _missing() -> str | None:
    if not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python `playwright` package is not installed (pip install -e '.[dev]')"
    if not (WEB / "vendor" / "novnc" / "core" / "rfb.js").exists():
        return "noVNC is not vendored into the web UI (run `make vendor`)"
    return XVNC_MISSING


@pytest.fixture
def product(tmp_path: Path) -> Iterator[Product]:
    require(_missing())
    p = Product(tmp_path / "data", env={"STREAMSPACE_CONNECTION_RECHECK_SECONDS": "3600"})
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def page_of(browser: Any, base: str, username: str, password: str) -> Any:
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{base}/#/login")
    page.get_by_test_id("login-username").fill(username)
    page.get_by_test_id("login-password").fill(password)
    page.get_by_test_id("login-submit").click()
    page.wait_for_url("**/#/catalog")
    return page


def test_sign_out_everywhere_drops_the_users_open_desktop(product: Product, browser: Any) -> None:
    admin = product.login()
    r = admin.post("/api/v1/users", json={"username": "uma", "password": PASSWORD})
    assert r.status_code == 201, r.text
    admin.close()
    uma = product.login("uma", PASSWORD)
    r = uma.post("/api/v1/sessions", json={"template": "xterm"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    wait_state(uma, sid, "running", 60)
    uma.close()

    user_page = page_of(browser, product.url, "uma", PASSWORD)
    user_page.goto(f"{product.url}/#/view/{sid}")
    connected = '[data-testid="connection-status"][data-status="connected"]'
    user_page.locator(connected).wait_for(timeout=30_000)

    admin_page = page_of(browser, product.url, "admin", ADMIN_PASSWORD)
    admin_page.get_by_test_id("nav-users").click()
    row = admin_page.get_by_test_id("user-uma")
    row.wait_for()
    assert (
        admin_page.get_by_test_id("user-admin").get_by_test_id("sign-out-everywhere").is_disabled()
    ), "an admin signs themselves out with Log out"
    started = time.monotonic()
    row.get_by_test_id("sign-out-everywhere").click()

    # The viewer's socket closing and the event stream's sign-out race each other: the viewer
    # shows "disconnected", or the page has already left the desktop for the login page.
    user_page.wait_for_function(
        """() => !location.hash.startsWith("#/view/") || document.querySelector(
            '[data-testid="connection-status"][data-status="disconnected"]')""",
        timeout=15_000,
    )
    took = time.monotonic() - started
    assert took <= 5.0, f"the user's viewer stayed connected for {took:.1f} s"
    user_page.wait_for_url("**/#/login*", timeout=30_000)
    assert "signed out everywhere" in admin_page.locator("body").inner_text()
