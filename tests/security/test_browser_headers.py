"""Security headers on every route the control plane serves, found by walking the app itself.

Every GET route (path parameters filled with a placeholder) and every file under every static
mount is fetched from a real control plane; each response must carry nosniff and no-referrer,
and each HTML one the CSP (no inline script, no framing). A route added later is covered
without touching this test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route

from conftest import ControlPlane
from streamspace.controlplane.app import WEB_DIR

CSP_MUST = ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'")


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("headers") / "cp").start()
    try:
        yield plane
    finally:
        plane.stop()


def every_get_path(app: Any) -> list[str]:
    return _get_paths(app.routes)


def _get_paths(routes: list[Any]) -> list[str]:
    paths: list[str] = []
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI keeps included routers
        if included is not None:
            paths += _get_paths(included.routes)
        elif isinstance(route, Mount) and route.app is not None:
            directory = getattr(route.app, "directory", None)
            if directory:
                base = Path(directory)
                paths += [
                    f"{route.path}/{f.relative_to(base).as_posix()}"
                    for f in sorted(base.rglob("*"))
                    if f.is_file()
                ]
        elif isinstance(route, APIRoute | Route) and "GET" in (route.methods or set()):
            paths.append(re.sub(r"\{[^}]+\}", "no-such-thing", route.path))
    return paths


def fetch(c: httpx.Client, path: str) -> httpx.Response:
    if path == "/api/v1/events":  # a stream that never ends: the headers are enough
        with c.stream("GET", path) as r:
            return r
    return c.get(path)


def test_every_response_has_the_headers_and_every_html_one_the_csp(cp: ControlPlane) -> None:
    paths = every_get_path(cp.app)
    for known in ("/", "/api/v1/auth/me", "/api/v1/sessions/no-such-thing", "/static/app.js"):
        assert known in paths, f"the walk missed {known}: {paths}"
    html: list[str] = []
    failures: list[str] = []
    with cp.login() as admin:
        for path in [*paths, "/no/such/page", "/static/no-such-file.html"]:
            r = fetch(admin, path)
            if r.status_code >= 500:
                failures.append(f"{path}: {r.status_code}")
            if r.headers.get("x-content-type-options") != "nosniff":
                failures.append(f"{path}: no nosniff")
            if r.headers.get("referrer-policy") != "no-referrer":
                failures.append(f"{path}: no Referrer-Policy")
            if "strict-transport-security" in r.headers:
                failures.append(f"{path}: HSTS over plain http")
            if r.headers.get("content-type", "").startswith("text/html"):
                html.append(path)
                csp = r.headers.get("content-security-policy", "")
                missing = [d for d in CSP_MUST if d not in csp]
                if missing or "unsafe" in csp:
                    failures.append(f"{path}: CSP {csp!r} (missing {missing})")
                if r.headers.get("x-frame-options") != "DENY":
                    failures.append(f"{path}: no X-Frame-Options")
    assert not failures, "\n".join(failures)
    assert "/" in html, f"the web UI's page was not found among {html}"


class _InlineFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.found.append("inline <script>")
        if tag == "style":
            self.found.append("<style> block")
        self.found += [f"{tag} {n}=" for n in names if n.startswith("on") or n == "style"]


def test_html_pages_have_no_inline_script_or_style(cp: ControlPlane) -> None:
    """The CSP forbids them; a page that had one would be broken, not just unsafe."""
    pages = list(WEB_DIR.rglob("*.html"))
    assert pages, WEB_DIR
    for page in pages:
        finder = _InlineFinder()
        finder.feed(page.read_text())
        assert finder.found == [], f"{page}: {finder.found}"


def test_api_docs_are_off_and_the_schema_is_served(cp: ControlPlane) -> None:
    with cp.client() as anon:
        for path in ("/api/docs", "/api/redoc", "/docs"):
            r = anon.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert not r.headers["content-type"].startswith("text/html")
        r = anon.get("/api/openapi.json")
        assert r.status_code == 200 and r.json()["info"]["title"] == "StreamSpace"
        assert r.headers["x-content-type-options"] == "nosniff"


def test_hsts_over_tls_from_a_trusted_proxy(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", trusted_proxies=["127.0.0.5"]).start()
    try:
        transport = httpx.HTTPTransport(local_address="127.0.0.5")
        with httpx.Client(base_url=cp.url, transport=transport, timeout=30) as proxy:
            tls = proxy.get("/", headers={"X-Forwarded-Proto": "https"})
            assert tls.headers["strict-transport-security"] == "max-age=31536000"
            assert "frame-ancestors 'none'" in tls.headers["content-security-policy"]
            plain = proxy.get("/", headers={"X-Forwarded-Proto": "http"})
            assert "strict-transport-security" not in plain.headers
    finally:
        cp.stop()
