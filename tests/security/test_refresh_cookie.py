"""The refresh token is out of reach of page scripts, and the cookie refresh of other sites.

Before, login answered the refresh token in JSON and the web UI kept it in localStorage, so
one XSS could carry away a week-long credential. Now browsers get an HttpOnly SameSite=Strict
cookie scoped to the refresh path; only a client that asks (the CLI) gets it in the body.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ROOT, ControlPlane

PASSWORD = "alice-correct-horse-42"
REFRESH = "/api/v1/auth/refresh"
CSRF = {"X-StreamSpace-CSRF": "1"}


@pytest.fixture
def cp(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    plane = ControlPlane(tmp_path / "cp", **getattr(request, "param", {})).start()
    try:
        plane.create_user("alice", password=PASSWORD).close()
        yield plane
    finally:
        plane.stop()


def refresh_cookie_header(r: httpx.Response) -> str:
    headers = [h for h in r.headers.get_list("set-cookie") if h.startswith("streamspace_refresh=")]
    assert len(headers) == 1, r.headers
    return headers[0]


def attributes(set_cookie: str) -> dict[str, str]:
    out = {}
    for part in set_cookie.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        out[name.lower()] = value
    return out


def browser_login(c: httpx.Client) -> httpx.Response:
    r = c.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 200, r.text
    return r


def test_login_sets_an_httponly_strict_cookie_and_no_token_in_json(cp: ControlPlane) -> None:
    with httpx.Client(base_url=cp.url, timeout=30) as browser:
        r = browser_login(browser)
        body = r.json()
        assert "refresh_token" not in body and body["access_token"]
        cookie = refresh_cookie_header(r)
        token = cookie.split(";")[0].split("=", 1)[1]
        assert len(token) >= 32 and token not in r.text
        attrs = attributes(cookie)
        assert "httponly" in attrs
        assert attrs["samesite"].lower() == "strict"
        assert attrs["path"] == REFRESH
        assert int(attrs["max-age"]) == cp.settings.refresh_token_ttl_seconds
        assert "secure" not in attrs, "plain http: a Secure cookie would never come back"

        # The browser's cookie refresh: a new access token, a rotated cookie, still no token.
        r2 = browser.post(REFRESH, headers={**CSRF, "Origin": cp.url})
        assert r2.status_code == 200, r2.text
        assert "refresh_token" not in r2.json()
        rotated = refresh_cookie_header(r2).split(";")[0].split("=", 1)[1]
        assert rotated != token
        with cp.client(r2.json()["access_token"]) as c:
            assert c.get("/api/v1/auth/me").json()["username"] == "alice"
        # A cookie refresh never hands out a body token, whatever the body asks.
        r3 = browser.post(REFRESH, headers=CSRF, json={"refresh_token_delivery": "body"})
        assert r3.status_code == 422, r3.text

    # The used cookie replayed (e.g. stolen earlier): refused, and the family revoked.
    with httpx.Client(base_url=cp.url, timeout=30, cookies={"streamspace_refresh": token}) as old:
        r4 = old.post(REFRESH, headers=CSRF)
        assert r4.status_code == 401 and "already used" in r4.json()["detail"], r4.text
        assert "max-age=0" in refresh_cookie_header(r4).lower(), "a dead cookie is cleared"
    with httpx.Client(
        base_url=cp.url, timeout=30, cookies={"streamspace_refresh": rotated}
    ) as newer:
        assert newer.post(REFRESH, headers=CSRF).status_code == 401


def test_cookie_refresh_cannot_be_triggered_cross_site(cp: ControlPlane) -> None:
    with httpx.Client(base_url=cp.url, timeout=30) as browser:
        browser_login(browser)
        # A form post or simple fetch from another site carries no custom header.
        r = browser.post(REFRESH, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["type"].endswith("/csrf"), r.text
        r = browser.post(REFRESH)
        assert r.status_code == 403, r.text
        # Even with the header (were SameSite not enforced), a foreign Origin is refused.
        for origin in ("https://evil.example", "null", f"{cp.url}.evil.example"):
            r = browser.post(REFRESH, headers={**CSRF, "Origin": origin})
            assert r.status_code == 403 and r.json()["type"].endswith("/cross-origin"), r.text
        # None of that used the cookie up: the real page still refreshes.
        assert browser.post(REFRESH, headers={**CSRF, "Origin": cp.url}).status_code == 200


def test_logout_clears_the_cookie_and_revokes_it(cp: ControlPlane) -> None:
    with httpx.Client(base_url=cp.url, timeout=30) as browser:
        token = browser_login(browser).json()["access_token"]
        cookie = browser.cookies.get("streamspace_refresh")
        assert cookie
        r = browser.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 204, r.text
        cleared = attributes(refresh_cookie_header(r))
        assert (
            cleared.get("max-age") == "0" or parsedate_to_datetime(cleared["expires"]).year < 2000
        )
        assert browser.cookies.get("streamspace_refresh") is None
    with httpx.Client(base_url=cp.url, timeout=30, cookies={"streamspace_refresh": cookie}) as c:
        assert c.post(REFRESH, headers=CSRF).status_code == 401


@pytest.mark.parametrize("cp", [{"trusted_proxies": ["127.0.0.5"]}], indirect=True)
def test_cookie_is_secure_behind_a_tls_proxy(cp: ControlPlane) -> None:
    transport = httpx.HTTPTransport(local_address="127.0.0.5")
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    with httpx.Client(base_url=cp.url, transport=transport, headers=headers, timeout=30) as c:
        r = browser_login(c)
        assert "secure" in attributes(refresh_cookie_header(r))
        assert r.headers["strict-transport-security"].startswith("max-age=")
    # the same headers from a peer that is not the proxy: not TLS, no Secure, no HSTS
    with httpx.Client(base_url=cp.url, headers=headers, timeout=30) as c:
        r = browser_login(c)
        assert "secure" not in attributes(refresh_cookie_header(r))
        assert "strict-transport-security" not in r.headers


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamspace.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_cli_keeps_its_refresh_token_and_keeps_working(cp: ControlPlane, tmp_path: Path) -> None:
    cp.start_full_agent()  # users see only templates an agent can run; the listing shows xterm
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSPACE_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    r = cli(env, "login", "--server", cp.url, "--username", "alice", "--password", PASSWORD)
    assert r.returncode == 0, r.stdout + r.stderr
    path = tmp_path / "config" / "streamspace" / "cli.json"
    assert path.stat().st_mode & 0o777 == 0o600
    saved = json.loads(path.read_text())
    assert saved["refresh_token"] and saved["access_token"]

    # An expired (here: garbage) access token: the CLI refreshes with its body token.
    path.write_text(json.dumps({**saved, "access_token": "expired.not.valid"}))
    r = cli(env, "templates", "ls")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "xterm" in r.stdout
    renewed = json.loads(path.read_text())
    assert renewed["refresh_token"] != saved["refresh_token"]
    assert renewed["access_token"] != "expired.not.valid"
    # the old one is spent: rotation worked through the body, as before
    with httpx.Client(base_url=cp.url, timeout=30) as anon:
        r2 = anon.post(REFRESH, json={"refresh_token": saved["refresh_token"]})
        assert r2.status_code == 401
