"""The clipboard without the panel, non-ASCII included: text copied inside the session (xclip
run as the session's user on its display) lands on the browser's clipboard, and text on the
browser's clipboard reaches the session's when the viewer gains focus (the async Clipboard API,
permissions granted as a user would; UTF-8 through noVNC's extended clipboard)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from test_browser import (  # noqa: F401 - fixtures
    MISSING,
    Watched,
    artifacts_on_failure,
    browser,
    poll,
    product,
    watched,
)
from test_viewer_resize import open_viewer

from product_support import Product
from vnc_support import in_session

pytestmark = pytest.mark.browser

FROM_SESSION = "Grüße aus der Sitzung: € ß é — Привет, мир — 日本語のテキスト"
FROM_BROWSER = "Du navigateur : ça coûte 5 € — Съешь же ещё — 中文剪贴板"


def session_clipboard(session_id: str) -> str:
    proc = in_session(session_id, "xclip", "-selection", "clipboard", "-o")
    out, _ = proc.communicate(timeout=10)
    return out.decode(errors="replace")


@pytest.fixture
def owners() -> Iterator[list[subprocess.Popen[bytes]]]:
    held: list[subprocess.Popen[bytes]] = []
    yield held
    for proc in held:
        if psutil.pid_exists(proc.pid):
            proc.kill()
            proc.wait(5)


def test_clipboard_round_trip_with_non_ascii_text(
    product: Product, watched: Watched, owners: list[subprocess.Popen[bytes]]
) -> None:
    page: Any = watched.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=product.url)
    with artifacts_on_failure(watched, product, "viewer_clipboard"):
        sid = open_viewer(page, product.url)
        page.bring_to_front()

        # Session -> browser: xclip owns the session's CLIPBOARD (-quiet: it stays in front).
        owners.append(
            in_session(sid, "xclip", "-selection", "clipboard", "-i", "-quiet", text=FROM_SESSION)
        )
        poll(
            lambda: page.evaluate("navigator.clipboard.readText()") == FROM_SESSION,
            20,
            "the session's copy on the browser's clipboard",
        )

        # Browser -> session: copied elsewhere, then the viewer gets the focus back.
        page.evaluate("(t) => navigator.clipboard.writeText(t)", FROM_BROWSER)
        page.evaluate("window.dispatchEvent(new Event('focus'))")
        deadline = time.time() + 20
        got = ""
        while time.time() < deadline and got != FROM_BROWSER:
            got = session_clipboard(sid)
            time.sleep(0.25)
        assert got == FROM_BROWSER
        product.login().delete(f"/api/v1/sessions/{sid}")
