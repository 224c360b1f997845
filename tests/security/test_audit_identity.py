"""The audit log records every sign-in with how it was made (password, TOTP, API key; the
directory's in test_ldap_login, passkeys in the browser tests), every refused one, MFA
changes, and API keys' creation, use and revocation. Through the product; the rows are read
back through the audit API."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pyotp
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

PASSWORD = "user-pass-12345"


def rows(admin: httpx.Client, action: str, **params: str) -> list[dict[str, Any]]:
    r = admin.get("/api/v1/audit", params={"action": action, "limit": "100", **params})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def password_login(cp: Any, username: str, password: str) -> httpx.Response:
    with client(cp) as anon:
        return anon.post("/api/v1/auth/login", json={"username": username, "password": password})


def test_logins_mfa_changes_and_api_keys_are_audited(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    admin = login(cp)
    r = admin.post("/api/v1/users", json={"username": "ivy", "password": PASSWORD})
    assert r.status_code == 201, r.text
    ivy_id = r.json()["id"]

    # password: a failure and a success
    assert_problem(password_login(cp, "ivy", "wrong-password-1"), 401)
    ok = password_login(cp, "ivy", PASSWORD)
    assert ok.status_code == 200, ok.text
    ivy = client(cp, ok.json()["access_token"])
    failed = rows(admin, "auth.login_failed")
    assert [(a["resource_id"], a["detail"]["method"]) for a in failed] == [("ivy", "password")]
    logins = rows(admin, "auth.login", actor="ivy")
    assert [a["detail"]["method"] for a in logins] == ["password"]
    assert logins[0]["ip"] == "127.0.0.1"

    # TOTP: enabling it, a wrong code, a login with a code, disabling it
    start = ivy.post("/api/v1/auth/mfa/totp").json()
    totp = pyotp.TOTP(start["secret"])
    assert ivy.post("/api/v1/auth/mfa/totp/confirm", json={"code": totp.now()}).status_code == 200
    assert [a["actor"] for a in rows(admin, "mfa.totp_enabled")] == ["ivy"]
    step = password_login(cp, "ivy", PASSWORD)
    assert step.status_code == 401 and step.json()["type"].endswith("mfa-required")
    mfa_token = step.json()["mfa_token"]
    with client(cp) as anon:
        wrong = anon.post(
            "/api/v1/auth/mfa/verify", json={"mfa_token": mfa_token, "code": "000000"}
        )
        assert_problem(wrong, 401)
        next_code = totp.at(time.time() + 30)  # the confirm used this step's code
        right = anon.post(
            "/api/v1/auth/mfa/verify", json={"mfa_token": mfa_token, "code": next_code}
        )
    assert right.status_code == 200, right.text
    mfa_failed = rows(admin, "auth.mfa_failed")
    assert [(a["resource_id"], a["detail"]["method"]) for a in mfa_failed] == [(ivy_id, "totp")]
    newest = rows(admin, "auth.login", actor="ivy")[0]["detail"]
    assert newest["method"] == "password" and newest["mfa"] == "totp"
    ivy = client(cp, right.json()["access_token"])
    off = ivy.post("/api/v1/auth/mfa/totp/disable", json={"password": PASSWORD})
    assert off.status_code == 204, off.text
    assert [a["actor"] for a in rows(admin, "mfa.totp_disabled")] == ["ivy"]

    # API keys: created, used (a sign-in with method api-key), refused, revoked
    made = ivy.post("/api/v1/auth/api-keys", json={"name": "cron", "scopes": ["sessions:read"]})
    assert made.status_code == 201, made.text
    key_id, token = made.json()["id"], made.json()["key"]
    created = rows(admin, "api_key.create")
    assert [(a["actor"], a["resource_id"]) for a in created] == [("ivy", key_id)]
    with client(cp, token) as script:
        assert script.get("/api/v1/sessions").status_code == 200
        assert script.get("/api/v1/sessions").status_code == 200  # within the minute: one row
    forged = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
    with client(cp, forged) as bad:
        assert_problem(bad.get("/api/v1/sessions"), 401)
    used = [a for a in rows(admin, "auth.login", actor="ivy") if a["detail"]["method"] == "api-key"]
    assert len(used) == 1 and used[0]["detail"]["api_key"] == key_id
    refused = [a for a in rows(admin, "auth.login_failed") if a["detail"]["method"] == "api-key"]
    assert len(refused) == 1
    assert refused[0]["detail"] == {
        "method": "api-key",
        "api_key": key_id,
        "reason": "wrong secret",
    }
    assert ivy.delete(f"/api/v1/auth/api-keys/{key_id}").status_code == 204
    assert [a["resource_id"] for a in rows(admin, "api_key.delete")] == [key_id]
