"""Browser end to end: the real product (`streamspace up`: control plane + local agent + Xvnc),
driven through Chromium with Playwright, exactly as a user would.

On failure a screenshot, the page HTML, the browser console and the product's log are saved
under test-artifacts/e2e/ at the repository root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from conftest import ADMIN_PASSWORD, ROOT, XVNC_MISSING, require
from product_support import Product

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
WEB = ROOT / "src" / "streamspace" / "controlplane" / "web"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _missing() -> str | None:
    if not (Path(CHROMIUM).exists() and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python `playwright` package is not installed (pip install -e '.[dev]')"
    if XVNC_MISSING:
        return XVNC_MISSING
    if not (WEB / "vendor" / "novnc" / "core" / "rfb.js").exists():
        return "noVNC is not vendored into the web UI (run `make vendor`)"
    return None


MISSING = _missing()

# Reads the noVNC canvas: size, distinct colours (capped), pixels that differ from the
# top-left pixel (the background), and a cheap hash to notice any change.
CANVAS_SIGNATURE = """() => {
  const c = document.querySelector('[data-testid="screen"] canvas');
  if (!c || !c.width || !c.height) return null;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const colours = new Set();
  const bg = (d[0] << 16) | (d[1] << 8) | d[2];
  let other = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];
    if (colours.size < 4096) colours.add(v);
    if (v !== bg) other++;
    hash = (Math.imul(hash, 31) + v + i) | 0;
  }
  return {width: c.width, height: c.height, colours: colours.size, other, hash};
}"""


# ---- the product ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    require(MISSING)
    p = Product(tmp_path_factory.mktemp("e2e") / "data")
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(MISSING)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


# Collects every CSP violation the page reports, across reloads (the init script runs on each).
CSP_WATCH = """(() => {
  document.addEventListener("securitypolicyviolation", (e) => {
    console.error(`csp-violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`);
  });
})()"""


class Watched:
    """A page plus everything it said: console errors, page errors, requests it made."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("request", lambda req: self.requests.append(req.url))
        page.add_init_script(CSP_WATCH)

    def csp_violations(self) -> list[str]:
        return [
            line
            for line in self.console
            if "csp-violation" in line or "Content Security Policy" in line
        ]

    def _console(self, msg: Any) -> None:
        line = f"{msg.type}: {msg.text}"
        self.console.append(line)
        if msg.type == "error":
            self.errors.append(line)

    def foreign_requests(self) -> list[str]:
        out = []
        for url in self.requests:
            parsed = urlparse(url)
            if parsed.scheme in ("data", "blob", "about"):
                continue
            if parsed.hostname not in LOCAL_HOSTS:
                out.append(url)
        return out


@pytest.fixture
def watched(browser: Any, request: pytest.FixtureRequest) -> Iterator[Watched]:
    """A fresh browser context's page; indirect parametrization adds context options."""
    options = {"viewport": {"width": 1280, "height": 800}, **getattr(request, "param", {})}
    context = browser.new_context(**options)
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        yield Watched(page)
    finally:
        context.close()


@contextlib.contextmanager
def artifacts_on_failure(w: Watched, product: Product, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):
            w.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        with contextlib.suppress(Exception):
            (ARTIFACTS / f"{name}.html").write_text(w.page.content())
        with contextlib.suppress(Exception):
            (ARTIFACTS / f"{name}.console.txt").write_text("\n".join(w.console + w.errors))
        with contextlib.suppress(Exception):
            shutil.copy(product.log_path, ARTIFACTS / f"{name}.streamspace.log")
        raise


# ---- helpers ----------------------------------------------------------------------------------


def log_in(page: Any, base: str) -> None:
    page.goto(f"{base}/#/login")
    page.get_by_test_id("login-username").fill("admin")
    page.get_by_test_id("login-password").fill(ADMIN_PASSWORD)
    page.get_by_test_id("login-submit").click()
    page.wait_for_url("**/#/catalog")
    page.get_by_test_id("launch-xterm").wait_for()


def wait_state(row: Any, state: str, timeout: float = 45) -> None:
    row.locator(f'[data-testid="state"][data-state="{state}"]').wait_for(timeout=timeout * 1000)


def canvas(page: Any) -> dict[str, int] | None:
    result: dict[str, int] | None = page.evaluate(CANVAS_SIGNATURE)
    return result


def poll(fn: Any, timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


# ---- tests ------------------------------------------------------------------------------------


def test_login_and_catalog_render_cleanly(product: Product, watched: Watched) -> None:
    page = watched.page
    with artifacts_on_failure(watched, product, "login_catalog"):
        page.goto(f"{product.url}/")
        page.wait_for_url("**/#/login*")
        page.get_by_test_id("login-form").wait_for()
        assert page.get_by_label("Username").is_visible()
        assert page.get_by_label("Password").is_visible()

        log_in(page, product.url)
        cards = page.locator('[data-testid^="launch-"]')
        assert cards.count() >= 3, "the catalog shows the shipped templates"
        page.get_by_test_id("launch-xterm").wait_for()
        # Every icon loaded (no broken images), and the search box filters.
        # (not "networkidle": the live event stream keeps a request open on purpose)
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        broken = page.evaluate(
            "() => [...document.querySelectorAll('img')]"
            ".filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
        )
        assert broken == []
        page.get_by_test_id("catalog-search").fill("terminal")
        assert page.locator('[data-testid^="launch-"]').count() == 1
        page.get_by_test_id("catalog-search").fill("")

        assert watched.errors == [], f"console errors: {watched.errors}"
        assert watched.csp_violations() == []
        assert watched.foreign_requests() == [], (
            f"requests to other hosts: {watched.foreign_requests()}"
        )

        # A wrong password shows the server's problem detail (after the checks above: the
        # browser logs the 401 as a console error).
        page.get_by_test_id("logout").click()
        page.get_by_test_id("login-username").fill("admin")
        page.get_by_test_id("login-password").fill("not-the-password")
        page.get_by_test_id("login-submit").click()
        error = page.get_by_test_id("login-error")
        error.wait_for()
        assert "wrong username or password" in error.inner_text()


def test_the_catalog_greys_for_admins_and_hides_for_users_what_cannot_run(
    product: Product, watched: Watched
) -> None:
    """gimp is in the shipped catalog but not installed: the admin sees its card greyed with
    the reason and no way to launch it; a user does not see it (the default setting)."""
    if shutil.which("gimp"):
        pytest.skip("gimp is installed here; the test needs a template no agent can run")
    page = watched.page
    with artifacts_on_failure(watched, product, "catalog_availability"):
        log_in(page, product.url)
        card = page.get_by_test_id("template-gimp")
        card.wait_for()
        assert card.get_attribute("data-available") == "false"
        assert "card-unavailable" in (card.get_attribute("class") or "")
        reason = card.get_by_test_id("unavailable-gimp").inner_text()
        assert "no agent has `gimp` installed" in reason, reason
        assert page.get_by_test_id("launch-gimp").is_disabled()
        xterm = page.get_by_test_id("template-xterm")
        assert xterm.get_attribute("data-available") == "true"
        assert not page.get_by_test_id("launch-xterm").is_disabled()
        assert xterm.get_by_test_id("unavailable-xterm").count() == 0
        assert "cannot run now" in page.get_by_test_id("catalog-count").inner_text()
        page.get_by_test_id("nav-templates").click()
        runs = page.get_by_test_id("template-runs-gimp")
        runs.wait_for()
        assert "no agent has `gimp` installed" in runs.inner_text()

        admin = product.login()
        try:
            r = admin.post(
                "/api/v1/users",
                json={"username": "catalog-user", "password": "user-pass-123", "role": "user"},
            )
            assert r.status_code == 201, r.text
        finally:
            admin.close()
        page.get_by_test_id("logout").click()
        page.get_by_test_id("login-username").fill("catalog-user")
        page.get_by_test_id("login-password").fill("user-pass-123")
        page.get_by_test_id("login-submit").click()
        page.wait_for_url("**/#/catalog")
        page.get_by_test_id("launch-xterm").wait_for()
        assert page.get_by_test_id("template-gimp").count() == 0
        assert page.locator(".card-unavailable").count() == 0
        assert watched.errors == [], f"console errors: {watched.errors}"


def test_xterm_session_lifecycle_through_the_browser(product: Product, watched: Watched) -> None:
    page = watched.page
    # Keep a handle on every WebSocket the page opens, so the test can cut the stream like a
    # network drop would. The sockets stay real browser WebSockets (noVNC inspects them).
    page.add_init_script(
        """(() => {
          const Native = window.WebSocket;
          window.__e2eSockets = [];
          function Tracked(...args) {
            const ws = new Native(...args);
            window.__e2eSockets.push(ws);
            return ws;
          }
          Tracked.prototype = Native.prototype;
          Object.assign(Tracked, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
          window.WebSocket = Tracked;
        })()"""
    )
    with artifacts_on_failure(watched, product, "xterm_lifecycle"):
        log_in(page, product.url)
        page.evaluate("window.__e2eNoReload = true")

        # Launch: lands on the sessions page with the new session highlighted.
        page.get_by_test_id("launch-xterm").click()
        page.wait_for_url("**/#/sessions?highlight=*")
        session_id = page.url.split("highlight=")[1].split("&")[0]
        row = page.get_by_test_id(f"session-{session_id}")
        row.wait_for()
        # running arrives over the live event stream: the page is never reloaded.
        wait_state(row, "running")
        assert page.evaluate("window.__e2eNoReload === true"), "the page was reloaded"

        # The viewer shows the remote screen.
        row.get_by_test_id("action-open").click()
        page.wait_for_url(f"**/#/view/{session_id}")
        status = page.get_by_test_id("connection-status")
        page.locator('[data-testid="connection-status"][data-status="connected"]').wait_for(
            timeout=30_000
        )
        first = poll(
            lambda: (s := canvas(page)) and s["colours"] >= 2 and s["other"] > 1000 and s,
            20,
            "a non-blank remote screen",
        )
        assert first["width"] > 0 and first["height"] > 0

        # Typing reaches the shell: the screen changes.
        box = page.get_by_test_id("screen").locator("canvas").bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
        time.sleep(0.3)
        before = canvas(page)
        assert before is not None
        marker = uuid.uuid4().hex[:6]
        page.keyboard.type(f"echo streamspace-e2e-{marker}-$RANDOM", delay=15)
        page.keyboard.press("Enter")
        poll(
            lambda: (s := canvas(page)) and s["hash"] != before["hash"],
            15,
            "the screen to change after typing",
        )

        # The stream drops while the session runs: the viewer reconnects by itself with a
        # fresh ticket.
        streams = "window.__e2eSockets.filter(s => s.url.includes('/api/v1/streams/ws'))"
        assert page.evaluate(f"{streams}.length") == 1, "the viewer opened one stream"
        page.evaluate(f"{streams}[0].close(4000, 'e2e: simulated network drop')")
        page.locator('[data-testid="connection-status"][data-status="disconnected"]').wait_for(
            timeout=10_000
        )
        page.locator('[data-testid="connection-status"][data-status="connected"]').wait_for(
            timeout=20_000
        )
        assert page.evaluate(f"{streams}.length") >= 2, "the reconnect opened a new stream"
        assert status.inner_text() == "Connected"

        # Back to the list: hibernate, wake, stop — each state arrives live.
        page.get_by_test_id("back").click()
        page.wait_for_url("**/#/sessions*")
        row = page.get_by_test_id(f"session-{session_id}")
        wait_state(row, "running", 10)
        row.get_by_test_id("action-hibernate").click()
        wait_state(row, "hibernated")
        row.get_by_test_id("action-wake").click()
        wait_state(row, "running")
        row.get_by_test_id("action-stop").click()
        row.get_by_test_id("action-confirm-stop").click()
        wait_state(row, "stopped")

        # The event history tells the story.
        row.get_by_test_id("toggle-history").click()
        history = row.get_by_test_id("history")
        history.locator(".event-stopped").wait_for()
        text = history.inner_text()
        for kind in ("created", "running", "hibernated", "stopped"):
            assert kind in text, f"history lacks {kind!r}: {text}"
        assert page.evaluate("window.__e2eNoReload === true"), "the page was reloaded"
        assert not [e for e in watched.errors if "pageerror" in e], watched.errors
        # The viewer (noVNC: canvas, cursor images, the stream WebSocket) runs under the CSP.
        assert watched.csp_violations() == [], watched.csp_violations()


def test_session_rows_settle_without_live_events(product: Product, watched: Watched) -> None:
    """Live events can be lost (a connection that drops between two of them); the sessions list
    re-reads rows in a passing state until they settle. Here the event stream is blocked
    outright, so only that re-reading can show the new session running and then stopped."""
    page = watched.page
    page.route("**/api/v1/events*", lambda route: route.abort())
    with artifacts_on_failure(watched, product, "settle_without_events"):
        log_in(page, product.url)
        page.get_by_test_id("launch-xterm").click()
        page.wait_for_url("**/#/sessions?highlight=*")
        session_id = page.url.split("highlight=")[1].split("&")[0]
        row = page.get_by_test_id(f"session-{session_id}")
        row.wait_for()
        wait_state(row, "running", 20)

        row.get_by_test_id("action-stop").click()
        row.get_by_test_id("action-confirm-stop").click()
        wait_state(row, "stopped", 20)


def test_running_sessions_show_a_live_thumbnail(product: Product, watched: Watched) -> None:
    """The Sessions list shows each running session's screen, fetched with the bearer token,
    and renews it every few seconds while the list is open."""
    page = watched.page
    with artifacts_on_failure(watched, product, "thumbnail"):
        log_in(page, product.url)
        page.get_by_test_id("launch-xterm").click()
        page.wait_for_url("**/#/sessions?highlight=*")
        session_id = page.url.split("highlight=")[1].split("&")[0]
        row = page.get_by_test_id(f"session-{session_id}")
        wait_state(row, "running")
        thumb = row.get_by_test_id("thumbnail")
        thumb.wait_for()
        first = poll(
            lambda: thumb.evaluate(
                "i => i.complete && i.naturalWidth > 0 && [i.src, i.naturalWidth]"
            ),
            20,
            "the thumbnail to load",
        )
        assert first[0].startswith("blob:")
        assert first[1] == 320
        poll(
            lambda: thumb.evaluate(
                "(i, old) => i.complete && i.naturalWidth > 0 && i.src !== old", first[0]
            ),
            15,
            "the thumbnail to be renewed",
        )
        assert watched.csp_violations() == [], watched.csp_violations()
        row.get_by_test_id("action-stop").click()
        row.get_by_test_id("action-confirm-stop").click()
        wait_state(row, "stopped")
        poll(lambda: thumb.count() == 0, 10, "the stopped session's thumbnail to go")


def test_admin_pages_render(product: Product, watched: Watched) -> None:
    page = watched.page
    with artifacts_on_failure(watched, product, "admin_pages"):
        log_in(page, product.url)
        for nav in ("agents", "users", "templates", "audit"):
            assert page.get_by_test_id(f"nav-{nav}").is_visible()

        page.get_by_test_id("nav-agents").click()
        agent_row = page.locator('[data-testid^="agent-"]').first
        agent_row.wait_for()
        assert "online" in agent_row.inner_text()
        isolation = agent_row.get_by_test_id("isolation")
        assert "own uid + sandbox" in isolation.inner_text()
        assert isolation.locator(".pill-ok").count() == 1
        page.get_by_test_id("enrol-agent").click()
        assert "streamspace agent" in page.get_by_test_id("join-command").inner_text()

        page.get_by_test_id("nav-users").click()
        page.get_by_test_id("user-admin").wait_for()

        page.get_by_test_id("nav-templates").click()
        page.get_by_test_id("template-row-xterm").wait_for()

        page.get_by_test_id("nav-audit").click()
        page.locator('[data-testid="audit-row"]').first.wait_for()
        assert "auth.login" in page.get_by_test_id("audit-table").inner_text()

        assert watched.errors == [], f"console errors: {watched.errors}"
        assert watched.csp_violations() == []
        assert watched.foreign_requests() == []


def test_tokens_stay_out_of_page_storage_and_a_reload_stays_logged_in(
    product: Product, watched: Watched
) -> None:
    page = watched.page
    with artifacts_on_failure(watched, product, "token_storage"):
        first = page.goto(f"{product.url}/")
        assert first is not None
        csp = first.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        assert first.headers.get("x-content-type-options") == "nosniff"
        assert first.headers.get("referrer-policy") == "no-referrer"

        with page.expect_response("**/api/v1/auth/login") as login_response:
            log_in(page, product.url)
        access = login_response.value.json()["access_token"]
        assert "refresh_token" not in login_response.value.json()

        stored = page.evaluate(
            "() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
        )
        assert access not in stored, "the access token is in page storage"
        assert "refresh" not in stored.lower(), stored
        assert "streamspace_refresh" not in page.evaluate("document.cookie"), "not HttpOnly"
        cookies = {c["name"]: c for c in page.context.cookies()}
        refresh = cookies["streamspace_refresh"]
        assert refresh["httpOnly"] is True and refresh["sameSite"] == "Strict", refresh
        assert refresh["path"] == "/api/v1/auth/refresh", refresh

        # Another site's page (localhost is another site than 127.0.0.1) tries the refresh: the
        # SameSite=Strict cookie is not sent and the custom header cannot be, so nothing leaks
        # and nothing is used up.
        other = page.context.new_page()
        other.goto(f"http://localhost:{product.port}/healthz")
        outcome = other.evaluate(
            """async (url) => {
              try {
                const r = await fetch(url, {method: "POST", credentials: "include",
                                            headers: {"X-StreamSpace-CSRF": "1"}});
                return "read: " + r.status + " " + (await r.text());
              } catch (err) { return "blocked"; }
            }""",
            f"http://127.0.0.1:{product.port}/api/v1/auth/refresh",
        )
        assert outcome == "blocked", outcome
        other.close()

        # A reload keeps the user logged in (through the cookie), with a new access token.
        page.reload()
        page.get_by_test_id("launch-xterm").wait_for()
        assert "#/catalog" in page.url
        assert "admin" in page.get_by_test_id("current-user").inner_text().lower()
        stored = page.evaluate(
            "() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
        )
        assert "eyJ" not in stored, "a JWT is in page storage after the reload"

        # Logging out drops the cookie: a reload then lands on the login page.
        page.get_by_test_id("logout").click()
        page.wait_for_url("**/#/login*")
        assert "streamspace_refresh" not in {c["name"] for c in page.context.cookies()}
        page.reload()
        page.get_by_test_id("login-form").wait_for()
        assert watched.csp_violations() == [], watched.csp_violations()


def test_an_insecure_agent_is_shown_in_red(
    tmp_path_factory: pytest.TempPathFactory, watched: Watched
) -> None:
    """`--insecure-shared-user` is an explicit opt-out, and admins see it at a glance."""
    insecure = Product(
        tmp_path_factory.mktemp("e2e-insecure") / "data", args=["--insecure-shared-user"]
    )
    try:
        insecure.start()
        page = watched.page
        with artifacts_on_failure(watched, insecure, "insecure_agent"):
            log_in(page, insecure.url)
            page.get_by_test_id("nav-agents").click()
            cell = page.locator('[data-testid^="agent-"]').first.get_by_test_id("isolation")
            cell.wait_for()
            red = cell.locator(".pill-bad")
            assert red.count() == 1 and "INSECURE" in red.inner_text()
            assert "unsandboxed" in cell.inner_text()
            color = red.evaluate("e => getComputedStyle(e).color")
            r, g, b = (
                int(v) for v in color[color.index("(") + 1 : color.index(")")].split(",")[:3]
            )
            assert r > 150 and r > 2 * g and r > 2 * b, f"not red: {color}"
            assert watched.errors == [], f"console errors: {watched.errors}"
    finally:
        insecure.stop()


def test_api_keys_page_creates_shows_once_and_revokes(product: Product, watched: Watched) -> None:
    """A key made in the UI works on the API with its scopes, is shown only at creation, and
    stops working when deleted from the page."""
    import httpx

    page = watched.page
    with artifacts_on_failure(watched, product, "api_keys"):
        log_in(page, product.url)
        page.get_by_test_id("nav-api-keys").click()
        page.get_by_test_id("new-key-form").wait_for()
        page.get_by_test_id("key-name").fill("browser-made")
        page.get_by_test_id("scope-sessions:read").check()
        page.get_by_test_id("create-key").click()
        key = page.get_by_test_id("new-key").inner_text().strip()
        assert key.startswith("ssk_")
        row = page.locator('[data-testid="key-row"]', has_text="browser-made")
        row.wait_for()
        assert "sessions:read" in row.inner_text() and key[:12] in row.inner_text()
        assert key not in page.get_by_test_id("keys-table").inner_text()

        with httpx.Client(base_url=product.url, headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.get("/api/v1/sessions").status_code == 200
            assert c.post("/api/v1/sessions", json={"template": "xterm"}).status_code == 403
            page.reload()
            page.locator('[data-testid="key-row"]', has_text="browser-made").wait_for()
            assert page.locator('[data-testid="new-key"]').count() == 0  # never shown again
            row = page.locator('[data-testid="key-row"]', has_text="browser-made")
            row.get_by_test_id("delete-key").click()
            row.wait_for(state="detached")
            assert c.get("/api/v1/sessions").status_code == 401

        assert watched.errors == [], f"console errors: {watched.errors}"
        assert watched.csp_violations() == []


def test_two_factor_set_up_and_login_in_the_browser(product: Product, watched: Watched) -> None:
    """Set up an authenticator app on the Security page, log in again with a code, then turn
    it off (the module's other tests log in with the password alone)."""
    import pyotp

    page = watched.page
    with artifacts_on_failure(watched, product, "two_factor"):
        log_in(page, product.url)
        page.get_by_test_id("nav-security").click()
        page.get_by_test_id("totp-start").click()
        page.get_by_test_id("totp-qr").wait_for()
        secret = page.get_by_test_id("totp-secret").inner_text().strip()
        totp = pyotp.TOTP(secret)
        page.get_by_test_id("totp-code").fill("000000")
        page.get_by_test_id("totp-confirm").click()
        page.get_by_test_id("totp-error").wait_for()
        page.get_by_test_id("totp-code").fill(totp.now())
        page.get_by_test_id("totp-confirm").click()
        codes = page.get_by_test_id("recovery-codes").inner_text().split()
        assert len(codes) == 10
        page.get_by_test_id("recovery-continue").click()
        assert "Authenticator app on" in page.get_by_test_id("mfa-status").inner_text()
        try:
            page.get_by_test_id("logout").click()
            page.wait_for_url("**/#/login")
            page.get_by_test_id("login-username").fill("admin")
            page.get_by_test_id("login-password").fill(ADMIN_PASSWORD)
            page.get_by_test_id("login-submit").click()
            page.get_by_test_id("mfa-form").wait_for()
            page.get_by_test_id("mfa-code").fill(codes[0])
            page.get_by_test_id("mfa-submit").click()
            page.wait_for_url("**/#/catalog")
            page.get_by_test_id("launch-xterm").wait_for()
        finally:
            page.goto(f"{product.url}/#/account/security")
            page.get_by_test_id("mfa-off-password").fill(ADMIN_PASSWORD)
            page.get_by_test_id("mfa-off").click()
            page.get_by_test_id("totp-start").wait_for()
        # the wrong code (400) and the password step's mfa-required (401) are expected
        expected = ("status of 400 (Bad Request)", "status of 401 (Unauthorized)")
        unexpected = [e for e in watched.errors if not e.endswith(expected)]
        assert unexpected == [], f"console errors: {unexpected}"
        assert len(watched.errors) == 2, watched.errors
        assert watched.csp_violations() == []


def test_policy_leads_an_admin_through_enrolment_at_login(
    make_control_plane: Any, watched: Watched
) -> None:
    import pyotp

    cp = make_control_plane(mfa_required_roles=["admin"])
    page = watched.page
    page.goto(f"{cp.url}/#/login")
    page.get_by_test_id("login-username").fill("admin")
    page.get_by_test_id("login-password").fill(ADMIN_PASSWORD)
    page.get_by_test_id("login-submit").click()
    page.get_by_test_id("totp-qr").wait_for()
    assert "must use a second factor" in page.locator(".notice").inner_text()
    secret = page.get_by_test_id("totp-secret").inner_text().strip()
    page.get_by_test_id("totp-code").fill(pyotp.TOTP(secret).now())
    page.get_by_test_id("totp-confirm").click()
    assert len(page.get_by_test_id("recovery-codes").inner_text().split()) == 10
    page.get_by_test_id("recovery-continue").click()
    page.wait_for_url("**/#/catalog")
    page.get_by_test_id("nav-security").click()
    status = page.get_by_test_id("mfa-status").inner_text()
    assert "Authenticator app on" in status and "10 recovery codes" in status
    assert page.get_by_test_id("mfa-off").count() == 0  # required: no way to turn it off
    assert watched.csp_violations() == []


REPLAY_PASSKEY_LOGIN = """async () => {
  const post = (path, body) => fetch(path, {method: "POST",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const o = await (await post("/api/v1/auth/passkey/options", {})).json();
  const cred = await navigator.credentials.get(
    {publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(o.options)});
  const answer = {challenge_id: o.challenge_id, credential: cred.toJSON(),
    refresh_token_delivery: "body"};
  const first = await post("/api/v1/auth/passkey/login", answer);
  const second = await post("/api/v1/auth/passkey/login", answer);
  return [first.status, second.status, (await second.json()).detail];
}"""


def test_passkeys_register_sign_in_and_serve_as_second_factor(
    product: Product, watched: Watched
) -> None:
    """With Chromium's virtual authenticator (CDP WebAuthn): add a passkey, sign in with it
    alone, use it as the second step after the password, replay is refused, then remove it."""
    page = watched.page
    base = product.url.replace("127.0.0.1", "localhost")  # an IP address cannot be an RP ID
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    with artifacts_on_failure(watched, product, "passkeys"):
        log_in(page, base)
        page.get_by_test_id("nav-security").click()
        page.get_by_test_id("passkey-name").fill("laptop")
        page.get_by_test_id("passkey-add").click()
        page.locator('[data-testid="passkey-row"]', has_text="laptop").wait_for()
        try:
            # passwordless
            page.get_by_test_id("logout").click()
            page.wait_for_url("**/#/login")
            page.get_by_test_id("passkey-login").click()
            page.wait_for_url("**/#/catalog")
            assert "Administrator" in page.get_by_test_id("current-user").inner_text()
            # an answer serves one sign-in only
            first, second, detail = page.evaluate(REPLAY_PASSKEY_LOGIN)
            assert first == 200 and second == 401, (first, second, detail)
            assert "used" in detail or "unknown" in detail
            # the password now needs a second step, which the passkey gives
            page.get_by_test_id("logout").click()
            page.wait_for_url("**/#/login")
            page.get_by_test_id("login-username").fill("admin")
            page.get_by_test_id("login-password").fill(ADMIN_PASSWORD)
            page.get_by_test_id("login-submit").click()
            page.get_by_test_id("mfa-passkey").click()
            page.wait_for_url("**/#/catalog")
        finally:
            page.goto(f"{base}/#/account/security")
            page.locator('[data-testid="passkey-row"]').first.get_by_test_id(
                "passkey-remove"
            ).click()
            page.get_by_text("No passkeys yet.").wait_for()
        assert watched.csp_violations() == []


def test_account_security_lists_sign_ins_and_signs_them_out(
    make_control_plane: Any, watched: Watched
) -> None:
    """The Security page: change the password, see where the account is signed in (this
    browser and a script), sign the script out, then sign out everywhere."""
    import httpx

    cp = make_control_plane()
    new_password = "a-much-better-pass-42"
    script_ua = {"User-Agent": "streamspace-cli/2.0"}

    def script_sign_in(password: str) -> dict[str, Any]:
        with httpx.Client(base_url=cp.url, headers=script_ua) as c:
            body = {"username": "admin", "password": password, "refresh_token_delivery": "body"}
            r = c.post("/api/v1/auth/login", json=body)
        assert r.status_code == 200, r.text
        tokens: dict[str, Any] = r.json()
        return tokens

    def refreshes(tokens: dict[str, Any]) -> int:
        with httpx.Client(base_url=cp.url) as c:
            body = {"refresh_token": tokens["refresh_token"]}
            return c.post("/api/v1/auth/refresh", json=body).status_code

    page = watched.page
    page.goto(f"{cp.url}/#/login")
    page.get_by_test_id("login-username").fill("admin")
    page.get_by_test_id("login-password").fill(ADMIN_PASSWORD)
    page.get_by_test_id("login-submit").click()
    page.wait_for_url("**/#/catalog")
    with httpx.Client(base_url=cp.url) as c:
        r = c.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        c.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        spec = c.get("/api/v1/templates/xterm").json()["spec"]
        r = c.put("/api/v1/templates/xterm", json={**spec, "allowed_groups": ["designers"]})
        assert r.status_code == 200, r.text
    page.reload()
    limited = page.get_by_test_id("allowed-xterm")
    assert limited.inner_text() == "Only for members of: designers"  # admins see who may
    page.get_by_test_id("nav-security").click()

    # change the password: this browser stays signed in with new tokens
    page.get_by_test_id("pw-current").fill(ADMIN_PASSWORD)
    page.get_by_test_id("pw-new").fill(new_password)
    page.get_by_test_id("pw-change").click()
    page.get_by_text("Password changed").wait_for()
    assert page.get_by_test_id("security-api-keys").get_attribute("href") == "#/account/api-keys"

    script = script_sign_in(new_password)
    page.reload()
    rows = page.get_by_test_id("sign-in-row")
    rows.nth(1).wait_for()
    assert rows.count() == 2  # the admin API login above ended with the password change
    mine = page.locator('[data-testid="sign-in-row"][data-current="true"]')
    assert "Chrome" in mine.inner_text() and "127.0.0.1" in mine.inner_text()
    other = page.locator('[data-testid="sign-in-row"]', has_text="streamspace-cli")
    other.get_by_test_id("sign-in-end").click()
    other.wait_for(state="detached")
    assert refreshes(script) == 401
    page.reload()  # this browser renewed its tokens and stays signed in
    page.get_by_test_id("sign-in-row").first.wait_for()
    assert page.get_by_test_id("sign-in-row").count() == 1

    again = script_sign_in(new_password)
    page.get_by_test_id("sign-out-everywhere").click()
    page.wait_for_url("**/#/login*")
    assert refreshes(again) == 401
    page.reload()
    page.get_by_test_id("login-username").wait_for()  # the refresh cookie ended too
    # the ended access tokens (401) are renewed or lead back to the login page
    unexpected = [e for e in watched.errors if "401 (Unauthorized)" not in e]
    assert unexpected == [], f"console errors: {unexpected}"
    assert watched.csp_violations() == []
