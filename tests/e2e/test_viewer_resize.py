"""The remote desktop follows the viewer's window: with "Resize desktop" on, noVNC asks the
session's Xvnc for the screen's size (RFB ExtendedDesktopSize) and the framebuffer it sends
back has that size, again after the window changes; a template that pins its size cannot."""

from __future__ import annotations

from typing import Any

import pytest
from test_browser import (  # noqa: F401 - fixtures
    MISSING,
    Watched,
    artifacts_on_failure,
    browser,
    canvas,
    log_in,
    poll,
    product,
    wait_state,
    watched,
)

from product_support import Product

pytestmark = pytest.mark.browser

SCREEN_SIZE = """() => {
  const s = document.querySelector('[data-testid="screen"]');
  return {width: s.clientWidth, height: s.clientHeight};
}"""


def open_viewer(page: Any, base: str) -> str:
    log_in(page, base)
    page.get_by_test_id("launch-xterm").click()
    page.wait_for_url("**/#/sessions?highlight=*")
    session_id: str = page.url.split("highlight=")[1].split("&")[0]
    row = page.get_by_test_id(f"session-{session_id}")
    wait_state(row, "running")
    row.get_by_test_id("action-open").click()
    page.locator('[data-testid="connection-status"][data-status="connected"]').wait_for(
        timeout=30_000
    )
    return session_id


def fits(page: Any) -> dict[str, int] | None:
    """The framebuffer's size once it matches the screen element (noVNC debounces)."""
    fb, box = canvas(page), page.evaluate(SCREEN_SIZE)
    if fb and abs(fb["width"] - box["width"]) <= 2 and abs(fb["height"] - box["height"]) <= 2:
        return fb
    return None


def test_the_remote_desktop_follows_the_window(product: Product, watched: Watched) -> None:
    page = watched.page
    with artifacts_on_failure(watched, product, "viewer_resize"):
        sid = open_viewer(page, product.url)
        first = poll(lambda: canvas(page), 20, "the remote screen")
        assert (first["width"], first["height"]) == (1280, 800)  # the template's size

        page.get_by_test_id("toggle-resize").click()
        assert page.get_by_test_id("toggle-resize").get_attribute("aria-pressed") == "true"
        resized = poll(lambda: fits(page), 20, "a framebuffer the size of the screen")
        assert (resized["width"], resized["height"]) != (1280, 800)

        page.set_viewport_size({"width": 1000, "height": 700})
        smaller = poll(
            lambda: (f := fits(page)) and f["width"] < resized["width"] and f,
            20,
            "the framebuffer following the smaller window",
        )
        assert smaller["width"] <= 1000 and smaller["height"] < 700

        # The choice is remembered for the next viewer; the shortcut turns it off again.
        page.keyboard.press("Control+Alt+Shift+KeyR")
        assert page.get_by_test_id("toggle-resize").get_attribute("aria-pressed") == "false"
        admin = product.login()
        admin.delete(f"/api/v1/sessions/{sid}")
