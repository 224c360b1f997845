"""Authorization matrix: every /api/v1 route, every role, against a real control plane.

The matrix must list every /api/v1 route of the OpenAPI document; a new endpoint without a row
fails `test_authorization_matrix`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from api_support import (
    NO_LIMIT,
    PROBLEM_KEYS,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    client,
    login,
)

from conftest import wait_for

# Agent routes authenticated with an agent credential, not a user token: checked separately.
AGENT_CREDENTIAL_ROUTES = {("POST", "/api/v1/agents/enroll"), ("GET", "/api/v1/agents/catalog")}
ROLES = ("user", "operator", "admin")
QUOTA = {"max_sessions": 3, "max_cpu_millis": 4000, "max_memory_mb": 4096}
TEMPLATE = {
    "name": "tpl-x",
    "display_name": "Matrix template",
    "category": "Test",
    "launch": {"local": {"command": ["xterm"]}},
}


def tpl(name: str) -> dict[str, Any]:
    return {**TEMPLATE, "name": name}


def problem_errors(r: httpx.Response) -> list[str]:
    """Every 4xx must be problem JSON."""
    if not 400 <= r.status_code < 500:
        return []
    errs = []
    if not r.headers.get("content-type", "").startswith("application/problem+json"):
        errs.append(f"content-type {r.headers.get('content-type')!r}")
    try:
        body = r.json()
    except ValueError:
        return [*errs, "body is not JSON"]
    if not set(body) >= PROBLEM_KEYS:
        errs.append(f"missing keys {PROBLEM_KEYS - set(body)}")
    elif body["status"] != r.status_code:
        errs.append(f"status field {body['status']} != {r.status_code}")
    return errs


@dataclass
class Row:
    method: str
    route: str  # the OpenAPI path template
    path: str  # with ids filled in
    expect: dict[str, int]  # role -> status
    body: Any = None
    stream: bool = False
    note: str = ""
    anon: int = 401
    headers: dict[str, str] = field(default_factory=dict)


def call(client: httpx.Client, row: Row) -> httpx.Response:
    kwargs: dict[str, Any] = {"headers": row.headers}
    if row.body is not None:
        kwargs["json"] = row.body
    if row.stream:
        with client.stream(row.method, row.path, **kwargs) as r:
            if r.status_code >= 400:
                r.read()
            return r
    return client.request(row.method, row.path, **kwargs)


def add_user(cp: Any, admin: httpx.Client, name: str, role: str = "user") -> httpx.Client:
    """Create a user with the admin's client and log in."""
    r = admin.post(
        "/api/v1/users", json={"username": name, "password": "user-pass-123", "role": role}
    )
    assert r.status_code == 201, r.text
    return login(cp, name, "user-pass-123")


def enroll_agent(cp: Any, admin: httpx.Client, name: str) -> str:
    r = admin.post("/api/v1/agents/join-tokens", json={})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    with client(cp) as anon:
        r = anon.post(
            "/api/v1/agents/enroll",
            json={
                "join_token": token,
                "name": name,
                "cluster_id": "c1",
                "cluster_name": "Cluster 1",
                "backend": "local",
            },
        )
        assert r.status_code == 201, r.text
        return str(r.json()["agent_id"])


def openapi_routes(client: httpx.Client) -> set[tuple[str, str]]:
    spec = client.get("/api/openapi.json").json()
    routes = set()
    for path, ops in spec["paths"].items():
        if not path.startswith("/api/v1"):
            continue
        for method in ops:
            if method.upper() in {"GET", "POST", "PUT", "PATCH", "DELETE"}:
                routes.add((method.upper(), path))
    return routes


def test_authorization_matrix(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    admin = login(cp)
    clients = {
        "user": add_user(cp, admin, "bob"),
        "operator": add_user(cp, admin, "oscar", role="operator"),
        "admin": admin,
    }
    alice = add_user(cp, admin, "alice")
    for name in ("victim", "quota-target"):
        r = admin.post("/api/v1/users", json={"username": name, "password": "victim-pass-1"})
        assert r.status_code == 201, r.text
    r = admin.post("/api/v1/users", json={"username": "robot", "service_account": True})
    assert r.status_code == 201, r.text
    r = alice.post("/api/v1/auth/api-keys", json={"name": "k", "scopes": ["sessions:read"]})
    assert r.status_code == 201, r.text
    alice_key = r.json()["id"]
    gid = {}
    for name in ("g1", "gdel"):
        r = admin.post("/api/v1/groups", json={"name": name})
        assert r.status_code == 201, r.text
        gid[name] = r.json()["id"]
    for name in ("tpl-put", "tpl-del"):
        r = admin.post("/api/v1/templates", json=tpl(name))
        assert r.status_code == 201, r.text
    agent1 = enroll_agent(cp, admin, "agent-one")
    agent2 = enroll_agent(cp, admin, "agent-two")
    r = alice.post("/api/v1/sessions", json={"template": "xterm", "tags": ["mine"]})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    alice_sign_in = alice.get("/api/v1/auth/sessions").json()[0]["id"]

    U, OP, A = "user", "operator", "admin"

    def everyone(code: int) -> dict[str, int]:
        return dict.fromkeys(ROLES, code)

    def admin_only(code: int) -> dict[str, int]:
        return {U: 403, OP: 403, A: code}

    def staff(code: int) -> dict[str, int]:
        return {U: 403, OP: code, A: code}

    s = f"/api/v1/sessions/{sid}"
    rows = [
        # auth
        Row(
            "POST",
            "/api/v1/auth/login",
            "/api/v1/auth/login",
            {},
            body={"username": "nobody", "password": "wrong-pass"},
            note="anonymous by design: bad credentials -> 401",
        ),
        Row(
            "POST",
            "/api/v1/auth/refresh",
            "/api/v1/auth/refresh",
            {},
            body={"refresh_token": "not-a-real-refresh-token"},
            note="anonymous by design: unknown token -> 401",
        ),
        Row("GET", "/api/v1/auth/me", "/api/v1/auth/me", everyone(200)),
        Row(
            "GET",
            "/api/v1/auth/oidc/providers",
            "/api/v1/auth/oidc/providers",
            everyone(200),
            anon=200,
            note="public by design: the login page's buttons (ids and names only)",
        ),
        Row(
            "GET",
            "/api/v1/auth/oidc/{provider_id}/login",
            "/api/v1/auth/oidc/nope/login",
            everyone(404),
            anon=404,
            note="anonymous by design: starts a sign-in at the provider",
        ),
        Row(
            "GET",
            "/api/v1/auth/oidc/{provider_id}/callback",
            "/api/v1/auth/oidc/nope/callback",
            everyone(404),
            anon=404,
            note="anonymous by design: the provider's answer and the flow cookie are the proof",
        ),
        Row(
            "GET",
            "/api/v1/auth/oidc/logout",
            "/api/v1/auth/oidc/logout",
            everyone(303),
            anon=303,
            note="anonymous by design: only redirects (to the provider's logout or the UI)",
        ),
        Row(
            "POST",
            "/api/v1/auth/mfa/verify",
            "/api/v1/auth/mfa/verify",
            {},
            body={"mfa_token": "not-a-token", "code": "123456"},
            note="anonymous by design: the mfa_token is the credential -> 401",
        ),
        Row("GET", "/api/v1/auth/mfa", "/api/v1/auth/mfa", everyone(200)),
        Row(
            "POST",
            "/api/v1/auth/mfa/webauthn/register/options",
            "/api/v1/auth/mfa/webauthn/register/options",
            everyone(200),
        ),
        Row(
            "POST",
            "/api/v1/auth/mfa/webauthn/register",
            "/api/v1/auth/mfa/webauthn/register",
            everyone(400),
            body={"challenge_id": "x", "name": "k", "credential": {}},
            note="an unknown challenge",
        ),
        Row("GET", "/api/v1/auth/mfa/webauthn", "/api/v1/auth/mfa/webauthn", everyone(200)),
        Row(
            "DELETE",
            "/api/v1/auth/mfa/webauthn/{passkey_id}",
            "/api/v1/auth/mfa/webauthn/" + "0" * 32,
            everyone(404),
        ),
        Row(
            "POST",
            "/api/v1/auth/mfa/webauthn/options",
            "/api/v1/auth/mfa/webauthn/options",
            {},
            body={"mfa_token": "not-a-token"},
            note="anonymous by design: the mfa_token is the credential -> 401",
        ),
        Row(
            "POST",
            "/api/v1/auth/passkey/options",
            "/api/v1/auth/passkey/options",
            {},
            anon=200,
            note="anonymous by design: the start of a passwordless sign-in",
        ),
        Row(
            "POST",
            "/api/v1/auth/passkey/login",
            "/api/v1/auth/passkey/login",
            {},
            body={"challenge_id": "x", "credential": {}},
            note="anonymous by design: an unknown challenge -> 401",
        ),
        Row(
            "GET",
            "/api/v1/auth/saml",
            "/api/v1/auth/saml",
            {},
            anon=200,
            note="anonymous by design: the login page's identity providers",
        ),
        *(
            Row(
                method,
                f"/api/v1/auth/saml/{{provider_id}}/{step}",
                f"/api/v1/auth/saml/none/{step}",
                {},
                anon=anon,
                note=f"anonymous by design: SAML {step}; unknown IdP -> 404, no form -> 422",
            )
            for method, step, anon in (
                ("GET", "metadata", 404),
                ("GET", "login", 404),
                ("POST", "acs", 422),
                ("GET", "complete", 422),
            )
        ),
        Row("POST", "/api/v1/auth/mfa/totp", "/api/v1/auth/mfa/totp", everyone(201)),
        Row(
            "POST",
            "/api/v1/auth/mfa/totp/confirm",
            "/api/v1/auth/mfa/totp/confirm",
            everyone(400),
            body={"code": "000000"},
            note="a started enrolment, a wrong code",
        ),
        Row(
            "POST",
            "/api/v1/auth/mfa/totp/disable",
            "/api/v1/auth/mfa/totp/disable",
            everyone(403),
            body={"password": "wrong-pass"},
        ),
        Row(
            "POST",
            "/api/v1/auth/mfa/recovery-codes",
            "/api/v1/auth/mfa/recovery-codes",
            everyone(409),
            body={"code": "000000"},
            note="no confirmed factor",
        ),
        Row(
            "POST",
            "/api/v1/auth/password",
            "/api/v1/auth/password",
            everyone(403),
            body={"current_password": "wrong-pass", "new_password": "new-pass-123"},
        ),
        # sessions: alice's session; bob and the operator must not see it (404), admin may
        Row(
            "POST",
            "/api/v1/sessions",
            "/api/v1/sessions",
            everyone(201),
            body={"template": "xterm"},
        ),
        Row("GET", "/api/v1/sessions", "/api/v1/sessions", everyone(200)),
        Row("GET", "/api/v1/sessions/{session_id}", s, {U: 404, OP: 404, A: 200}),
        Row(
            "PATCH",
            "/api/v1/sessions/{session_id}",
            s,
            {U: 404, OP: 404, A: 200},
            body={"tags": ["mine", "seen-by-admin"]},
        ),
        Row(
            "POST",
            "/api/v1/sessions/{session_id}/hibernate",
            f"{s}/hibernate",
            {U: 404, OP: 404, A: 409},
        ),
        Row("POST", "/api/v1/sessions/{session_id}/wake", f"{s}/wake", {U: 404, OP: 404, A: 409}),
        Row(
            "POST",
            "/api/v1/sessions/{session_id}/connect",
            f"{s}/connect",
            {U: 404, OP: 404, A: 409},
        ),
        Row(
            "GET",
            "/api/v1/sessions/{session_id}/thumbnail",
            f"{s}/thumbnail",
            {U: 404, OP: 404, A: 409},
        ),
        Row(
            "GET",
            "/api/v1/sessions/{session_id}/files",
            f"{s}/files",
            {U: 404, OP: 404, A: 409},
            note="the session is pending: its files cannot be reached yet",
        ),
        Row(
            "GET",
            "/api/v1/sessions/{session_id}/files/content",
            f"{s}/files/content?path=Uploads/x",
            {U: 404, OP: 404, A: 409},
        ),
        Row(
            "PUT",
            "/api/v1/sessions/{session_id}/files/content",
            f"{s}/files/content?path=Uploads/x",
            {U: 404, OP: 404, A: 409},
            body={"raw": "bytes"},
        ),
        Row(
            "POST",
            "/api/v1/sessions/{session_id}/files/link",
            f"{s}/files/link?path=Uploads/x",
            {U: 404, OP: 404, A: 409},
        ),
        Row(
            "GET",
            "/api/v1/sessions/{session_id}/files/download",
            f"{s}/files/download?ticket=forged",
            {U: 403, OP: 403, A: 403},
            anon=403,
            note="the single-use link from /files/link is the credential; a token is not one",
        ),
        Row("DELETE", "/api/v1/sessions/{session_id}", s, {U: 404, OP: 404, A: 202}),
        # users and quotas
        Row("GET", "/api/v1/users", "/api/v1/users", admin_only(200)),
        Row(
            "POST",
            "/api/v1/users",
            "/api/v1/users",
            admin_only(201),
            body={"username": "made-by-admin", "password": "made-pass-1234"},
        ),
        Row("GET", "/api/v1/users/{user_id}", "/api/v1/users/alice", admin_only(200)),
        Row(
            "PATCH",
            "/api/v1/users/{user_id}",
            "/api/v1/users/victim",
            admin_only(200),
            body={"display_name": "Victim"},
        ),
        Row(
            "PUT",
            "/api/v1/users/{user_id}/quota",
            "/api/v1/users/quota-target/quota",
            admin_only(200),
            body=QUOTA,
        ),
        Row(
            "GET",
            "/api/v1/users/{user_id}/quota",
            "/api/v1/users/quota-target/quota",
            admin_only(200),
        ),
        Row(
            "DELETE",
            "/api/v1/users/{user_id}/quota",
            "/api/v1/users/quota-target/quota",
            admin_only(204),
        ),
        Row(
            "POST",
            "/api/v1/users/{user_id}/sign-out",
            "/api/v1/users/quota-target/sign-out",
            admin_only(204),
        ),
        Row("DELETE", "/api/v1/users/{user_id}", "/api/v1/users/victim", admin_only(204)),
        Row("GET", "/api/v1/me/quota", "/api/v1/me/quota", everyone(200)),
        Row(
            "DELETE",
            "/api/v1/users/{user_id}/mfa",
            "/api/v1/users/alice/mfa",
            admin_only(409),
            note="alice has no factor to reset",
        ),
        # API keys: each user's own; an admin's for service accounts
        Row(
            "POST",
            "/api/v1/auth/api-keys",
            "/api/v1/auth/api-keys",
            everyone(201),
            body={"name": "mine", "scopes": ["sessions:read"]},
        ),
        Row("GET", "/api/v1/auth/api-keys", "/api/v1/auth/api-keys", everyone(200)),
        Row(
            "DELETE",
            "/api/v1/auth/api-keys/{key_id}",
            f"/api/v1/auth/api-keys/{alice_key}",
            {U: 404, OP: 404, A: 204},
            note="someone else's key looks missing",
        ),
        Row(
            "POST",
            "/api/v1/users/{user_id}/api-keys",
            "/api/v1/users/robot/api-keys",
            admin_only(201),
            body={"name": "ci", "scopes": ["sessions:write"]},
        ),
        Row(
            "GET",
            "/api/v1/users/{user_id}/api-keys",
            "/api/v1/users/robot/api-keys",
            admin_only(200),
        ),
        # groups
        Row("GET", "/api/v1/groups", "/api/v1/groups", admin_only(200)),
        Row("POST", "/api/v1/groups", "/api/v1/groups", admin_only(201), body={"name": "gnew"}),
        Row("GET", "/api/v1/groups/{group_id}", f"/api/v1/groups/{gid['g1']}", admin_only(200)),
        Row(
            "PATCH",
            "/api/v1/groups/{group_id}",
            f"/api/v1/groups/{gid['g1']}",
            admin_only(200),
            body={"description": "patched"},
        ),
        Row(
            "PUT",
            "/api/v1/groups/{group_id}/members/{user_id}",
            f"/api/v1/groups/{gid['g1']}/members/alice",
            admin_only(200),
        ),
        Row(
            "DELETE",
            "/api/v1/groups/{group_id}/members/{user_id}",
            f"/api/v1/groups/{gid['g1']}/members/alice",
            admin_only(200),
        ),
        Row(
            "PUT",
            "/api/v1/groups/{group_id}/quota",
            f"/api/v1/groups/{gid['g1']}/quota",
            admin_only(200),
            body=QUOTA,
        ),
        Row(
            "DELETE",
            "/api/v1/groups/{group_id}/quota",
            f"/api/v1/groups/{gid['g1']}/quota",
            admin_only(204),
        ),
        Row(
            "DELETE", "/api/v1/groups/{group_id}", f"/api/v1/groups/{gid['gdel']}", admin_only(204)
        ),
        # templates: everyone reads, admins write
        Row("GET", "/api/v1/templates", "/api/v1/templates", everyone(200)),
        Row("GET", "/api/v1/templates/{name}", "/api/v1/templates/xterm", everyone(200)),
        Row("POST", "/api/v1/templates", "/api/v1/templates", admin_only(201), body=tpl("tpl-new")),
        Row(
            "PUT",
            "/api/v1/templates/{name}",
            "/api/v1/templates/tpl-put",
            admin_only(200),
            body={**tpl("tpl-put"), "display_name": "Replaced"},
        ),
        Row("DELETE", "/api/v1/templates/{name}", "/api/v1/templates/tpl-del", admin_only(204)),
        # agents: operators watch and drain, only admins mint, revoke and rotate
        Row(
            "POST",
            "/api/v1/agents/join-tokens",
            "/api/v1/agents/join-tokens",
            admin_only(201),
            body={},
        ),
        Row("GET", "/api/v1/agents", "/api/v1/agents", staff(200)),
        Row("GET", "/api/v1/agents/{agent_id}", f"/api/v1/agents/{agent1}", staff(200)),
        Row(
            "POST", "/api/v1/agents/{agent_id}/drain", f"/api/v1/agents/{agent1}/drain", staff(200)
        ),
        Row(
            "POST",
            "/api/v1/agents/{agent_id}/undrain",
            f"/api/v1/agents/{agent1}/undrain",
            staff(200),
        ),
        Row(
            "POST",
            "/api/v1/agents/{agent_id}/rotate-credential",
            f"/api/v1/agents/{agent1}/rotate-credential",
            admin_only(200),
        ),
        Row(
            "POST",
            "/api/v1/agents/{agent_id}/revoke",
            f"/api/v1/agents/{agent2}/revoke",
            admin_only(200),
        ),
        # audit and the event stream
        Row("GET", "/api/v1/audit", "/api/v1/audit", admin_only(200)),
        Row("GET", "/api/v1/events", "/api/v1/events", everyone(200), stream=True),
        # sign-ins: each caller's own; another user's is a 404, whatever the role
        Row("GET", "/api/v1/auth/sessions", "/api/v1/auth/sessions", everyone(200)),
        Row(
            "DELETE",
            "/api/v1/auth/sessions/{sign_in_id}",
            f"/api/v1/auth/sessions/{alice_sign_in}",
            everyone(404),
        ),
        Row(
            "POST",
            "/api/v1/auth/sessions/revoke-all",
            "/api/v1/auth/sessions/revoke-all",
            {},
            note="each role's own sign-ins (test_signins); here: anonymous is refused",
        ),
        # last: logging out kills each role's tokens
        Row("POST", "/api/v1/auth/logout", "/api/v1/auth/logout", everyone(204), body={}),
    ]

    # the matrix covers every /api/v1 route of the OpenAPI document, and nothing else
    with client(cp) as anon:
        documented = openapi_routes(anon) - AGENT_CREDENTIAL_ROUTES
    covered = {(row.method, row.route) for row in rows}
    missing, unknown = sorted(documented - covered), sorted(covered - documented)
    assert not missing, f"routes without a matrix row: {missing}"
    assert not unknown, f"matrix rows for routes the app does not have: {unknown}"

    failures: list[str] = []
    with client(cp) as anon:
        for row in rows:
            r = call(anon, row)
            if r.status_code != row.anon:
                failures.append(
                    f"anonymous {row.method} {row.path}: {r.status_code} {r.text[:150]}"
                )
            failures += [f"anonymous {row.method} {row.path}: {e}" for e in problem_errors(r)]
            challenge = r.headers.get("www-authenticate", "").lower()
            if r.status_code == 401 and row.expect and "bearer" not in challenge:
                failures.append(f"anonymous {row.method} {row.path}: no WWW-Authenticate")
            for role, expected in row.expect.items():
                r = call(clients[role], row)
                if r.status_code != expected:
                    failures.append(
                        f"{role} {row.method} {row.path}: expected {expected}, "
                        f"got {r.status_code} {r.text[:150]}"
                    )
                failures += [f"{role} {row.method} {row.path}: {e}" for e in problem_errors(r)]
    assert not failures, "authorization matrix mismatches:\n" + "\n".join(failures)

    # a bogus or tampered token is as good as none
    with client(cp, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl") as forged:
        r = forged.get("/api/v1/sessions")
        assert r.status_code == 401, r.text
    for c in (*clients.values(), alice):
        c.close()


def test_agent_credential_routes(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    with login(cp) as admin:
        # a user's access token is not an agent credential
        r = admin.get("/api/v1/agents/catalog")
        assert r.status_code == 401, r.text
    with client(cp) as anon:
        r = anon.get("/api/v1/agents/catalog")
        assert r.status_code == 401, r.text
        r = anon.post(
            "/api/v1/agents/enroll",
            json={
                "join_token": "ssj_not-a-token",
                "name": "a",
                "cluster_id": "c",
                "cluster_name": "C",
                "backend": "local",
            },
        )
        assert r.status_code == 401, r.text
        with login(cp) as admin:
            token = admin.post("/api/v1/agents/join-tokens", json={}).json()["token"]
        body = {
            "join_token": token,
            "name": "a",
            "cluster_id": "c",
            "cluster_name": "C",
            "backend": "local",
        }
        r = anon.post("/api/v1/agents/enroll", json=body)
        assert r.status_code == 201, r.text
        credential = r.json()["credential"]
        # a join token is single use
        r = anon.post("/api/v1/agents/enroll", json=body)
        assert r.status_code == 401, r.text
    with client(cp, credential) as agent:
        r = agent.get("/api/v1/agents/catalog")
        assert r.status_code == 200, r.text
        assert any(t["name"] == "xterm" for t in r.json()["templates"])
        # an agent credential is not a user token
        assert agent.get("/api/v1/sessions").status_code == 401
        assert agent.get("/api/v1/auth/me").status_code == 401


def test_users_cannot_touch_each_others_sessions(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    admin = login(cp)
    alice = add_user(cp, admin, "alice")
    bob = add_user(cp, admin, "bob")
    oscar = add_user(cp, admin, "oscar", role="operator")

    r = alice.post("/api/v1/sessions", json={"template": "xterm", "tags": ["alice-tag"]})
    assert r.status_code == 201, r.text
    a_sid = r.json()["id"]
    alice_id = r.json()["owner_id"]
    # let the placer record why it waits, so that nothing but the attempts below could change it
    before = wait_for(
        lambda: (
            (b := alice.get(f"/api/v1/sessions/{a_sid}").json())["status_message"].startswith(
                "waiting for capacity"
            )
            and b
        ),
        timeout=15,
        what="the placer to record why the session waits",
    )
    r = bob.post("/api/v1/sessions", json={"template": "xterm"})
    assert r.status_code == 201, r.text
    b_sid = r.json()["id"]

    attempts = [
        ("GET", "", None),
        ("PATCH", "", {"tags": ["stolen"]}),
        ("PATCH", "", {"idle_timeout_seconds": 600}),
        ("POST", "/hibernate", None),
        ("POST", "/wake", None),
        ("POST", "/connect", None),
        ("GET", "/thumbnail", None),
        ("GET", "/files", None),
        ("GET", "/files/content?path=Uploads/x", None),
        ("PUT", "/files/content?path=Uploads/x", {"raw": "bytes"}),
        ("POST", "/files/link?path=Uploads/x", None),
        ("DELETE", "", None),
    ]
    failures = []
    for who, intruder in (("bob", bob), ("operator", oscar)):
        for method, suffix, body in attempts:
            kwargs = {"json": body} if body is not None else {}
            r = intruder.request(method, f"/api/v1/sessions/{a_sid}{suffix}", **kwargs)
            if r.status_code != 404:
                failures.append(f"{who} {method} {suffix or '/'}: {r.status_code} {r.text[:150]}")
            elif a_sid not in r.json().get("detail", ""):
                failures.append(f"{who} {method} {suffix}: 404 detail should name the id")
    assert not failures, "\n".join(failures)

    after = alice.get(f"/api/v1/sessions/{a_sid}").json()
    for key in ("state", "tags", "idle_timeout_seconds", "updated_at", "owner_id", "events"):
        assert after[key] == before[key], (key, before[key], after[key])
    assert after["state"] == "pending"

    # a 404 for somebody else's session looks exactly like one for a missing session
    missing = bob.get("/api/v1/sessions/" + "0" * 32).json()
    theirs = bob.get(f"/api/v1/sessions/{a_sid}").json()
    assert missing["title"] == theirs["title"] and missing["type"] == theirs["type"]

    # lists: bob never sees alice's sessions, whatever the filters
    for params in (
        {},
        {"tag": "alice-tag"},
        {"owner": "alice"},
        {"template": "xterm"},
        {"state": "pending"},
        {"active": "true"},
        {"limit": 200},
    ):
        items = bob.get("/api/v1/sessions", params=params).json()["items"]
        assert a_sid not in {s["id"] for s in items}, params
        assert all(s["owner"] == "bob" for s in items), params
    # all=true is for admins and operators
    r = bob.get("/api/v1/sessions", params={"all": "true"})
    assert r.status_code == 403, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    for who, viewer in (("operator", oscar), ("admin", admin)):
        r = viewer.get("/api/v1/sessions", params={"all": "true"})
        assert r.status_code == 200, (who, r.text)
        ids = {s["id"] for s in r.json()["items"]}
        assert {a_sid, b_sid} <= ids, who
        r = viewer.get("/api/v1/sessions", params={"all": "true", "owner": "alice"})
        assert [s["id"] for s in r.json()["items"]] == [a_sid], who

    # the owner is always the token's user; the body cannot choose it
    for extra in ({"owner_id": alice_id}, {"owner": "alice"}):
        r = bob.post("/api/v1/sessions", json={"template": "xterm", **extra})
        assert r.status_code == 422, r.text
        assert next(iter(extra)) in r.json()["detail"], r.text
    r = bob.post("/api/v1/sessions", json={"template": "xterm"})
    assert r.status_code == 201
    assert r.json()["owner"] == "bob" and r.json()["owner_id"] != alice_id

    # the admin may act on alice's session
    r = admin.delete(f"/api/v1/sessions/{a_sid}")
    assert r.status_code == 202, r.text
    assert alice.get(f"/api/v1/sessions/{a_sid}").json()["state"] == "stopped"
    for c in (admin, alice, bob, oscar):
        c.close()
