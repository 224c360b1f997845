"""Bad input on every endpoint: always a 4xx problem JSON naming what is wrong, never a 5xx."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from api_support import (
    NO_LIMIT,
    PROBLEM_KEYS,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    login,
)

JSON = {"content-type": "application/json"}
TEMPLATE = {
    "name": "tpl-bad",
    "display_name": "Bad input template",
    "category": "Test",
    "launch": {"local": {"command": ["xterm"]}},
}
QUOTA = {"max_sessions": 3, "max_cpu_millis": 4000, "max_memory_mb": 4096}
# A valid body for every route that takes one (unknown fields are added to these).
VALID_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/api/v1/auth/login"): {"username": "admin", "password": "x"},
    ("POST", "/api/v1/auth/refresh"): {"refresh_token": "r" * 20},
    ("POST", "/api/v1/auth/logout"): {},
    ("POST", "/api/v1/auth/password"): {"current_password": "x", "new_password": "y" * 12},
    ("POST", "/api/v1/users"): {"username": "newbie", "password": "newbie-pass-1"},
    ("PATCH", "/api/v1/users/{user_id}"): {"display_name": "X"},
    ("PUT", "/api/v1/users/{user_id}/quota"): QUOTA,
    ("POST", "/api/v1/groups"): {"name": "newgroup"},
    ("PATCH", "/api/v1/groups/{group_id}"): {"description": "d"},
    ("PUT", "/api/v1/groups/{group_id}/quota"): QUOTA,
    ("POST", "/api/v1/templates"): TEMPLATE,
    ("PUT", "/api/v1/templates/{name}"): TEMPLATE,
    ("POST", "/api/v1/sessions"): {"template": "xterm"},
    ("PATCH", "/api/v1/sessions/{session_id}"): {"tags": ["a"]},
    ("POST", "/api/v1/agents/join-tokens"): {},
    ("POST", "/api/v1/auth/mfa/verify"): {"mfa_token": "t", "code": "123456"},
    ("POST", "/api/v1/auth/mfa/webauthn/register"): {
        "challenge_id": "x",
        "name": "k",
        "credential": {},
    },
    ("POST", "/api/v1/auth/mfa/webauthn/options"): {"mfa_token": "t"},
    ("POST", "/api/v1/auth/passkey/login"): {"challenge_id": "x", "credential": {}},
    ("POST", "/api/v1/auth/mfa/totp"): {},
    ("POST", "/api/v1/auth/mfa/totp/confirm"): {"code": "123456"},
    ("POST", "/api/v1/auth/mfa/totp/disable"): {"password": "x"},
    ("POST", "/api/v1/auth/mfa/recovery-codes"): {"code": "123456"},
    ("POST", "/api/v1/auth/api-keys"): {"name": "k", "scopes": ["sessions:read"]},
    ("POST", "/api/v1/users/{user_id}/api-keys"): {"name": "k", "scopes": ["sessions:read"]},
    ("POST", "/api/v1/agents/enroll"): {
        "join_token": "ssj_xxxxxxxxxx",
        "name": "a",
        "cluster_id": "c",
        "cluster_name": "C",
        "backend": "local",
    },
}


NOT_5XX = -1


@dataclass
class Case:
    label: str
    method: str
    path: str
    expect: int | None = None  # None: any 4xx; NOT_5XX: any status below 500
    fragments: tuple[str, ...] = ()
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None


def problem_failures(r: httpx.Response) -> list[str]:
    out = []
    if not r.headers.get("content-type", "").startswith("application/problem+json"):
        out.append(f"content-type is {r.headers.get('content-type')!r}")
    try:
        body = r.json()
    except ValueError:
        return [*out, "body is not JSON"]
    missing = PROBLEM_KEYS - set(body)
    if missing:
        out.append(f"problem keys missing: {sorted(missing)}")
    elif body["status"] != r.status_code or not body["detail"]:
        out.append(f"bad problem body {body}")
    return out


def send(client: httpx.Client, case: Case) -> httpx.Response:
    kwargs: dict[str, Any] = {"headers": case.headers, "params": case.params}
    if case.json is not None:
        kwargs["json"] = case.json
    if case.content is not None:
        kwargs["content"] = case.content
    try:
        return client.request(case.method, case.path, **kwargs)
    except httpx.TransportError:
        # a previous 500 may have left a dead keep-alive connection in the pool
        return client.request(case.method, case.path, **kwargs)


def run_cases(client: httpx.Client, cases: list[Case]) -> list[str]:
    failures = []
    for case in cases:
        where = f"[{case.label}] {case.method} {case.path[:80]}"
        try:
            r = send(client, case)
        except httpx.HTTPError as exc:
            failures.append(f"{where}: {exc!r}")
            continue
        if case.expect == NOT_5XX:
            ok_status, wanted = r.status_code < 500, "< 500"
        elif case.expect is None:
            ok_status, wanted = 400 <= r.status_code < 500, "4xx"
        else:
            ok_status, wanted = r.status_code == case.expect, str(case.expect)
        if not ok_status:
            failures.append(f"{where}: expected {wanted}, got {r.status_code} {r.text[:160]}")
            continue
        if 400 <= r.status_code < 500:
            failures += [f"{where}: {e}" for e in problem_failures(r)]
            detail = str(r.json().get("detail", "")).lower() if r.content else ""
            for fragment in case.fragments:
                if fragment.lower() not in detail:
                    failures.append(
                        f"{where}: detail {detail[:160]!r} does not mention {fragment!r}"
                    )
    return failures


FORM_ROUTES = {("POST", "/api/v1/auth/saml/{provider_id}/acs")}
"""Routes whose body is a form, not JSON: the SAML IdP posts one. Their bad bodies are tested
where the route is (tests/integration/test_saml_login.py::test_bad_input_answers_problem_json)."""


def body_routes(client: httpx.Client, media_type: str = "application/json") -> set[tuple[str, str]]:
    spec = client.get("/api/openapi.json").json()
    return {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if "requestBody" in op and media_type in op["requestBody"].get("content", {})
    }


def fill(route: str, ids: dict[str, str]) -> str:
    return route.format(
        **{
            k: ids.get(k, "x")
            for k in (
                "user_id",
                "group_id",
                "name",
                "session_id",
                "agent_id",
                "key_id",
                "passkey_id",
                "sign_in_id",
                "provider_id",
            )
        }
    )


def prepare(cp: Any) -> tuple[httpx.Client, dict[str, str]]:
    admin = login(cp)
    r = admin.post("/api/v1/sessions", json={"template": "xterm"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = admin.post("/api/v1/groups", json={"name": "grp"})
    assert r.status_code == 201, r.text
    ids = {
        "user_id": "admin",
        "group_id": r.json()["id"],
        "name": "tpl-bad",
        "session_id": sid,
        "agent_id": "0" * 32,
    }
    return admin, ids


def test_body_errors_on_every_endpoint(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    admin, ids = prepare(cp)
    routes = body_routes(admin)
    assert body_routes(admin, "application/x-www-form-urlencoded") == FORM_ROUTES
    assert routes == set(VALID_BODIES), (
        f"routes with a body but no valid example here: {sorted(routes - set(VALID_BODIES))}; "
        f"stale examples: {sorted(set(VALID_BODIES) - routes)}"
    )
    cases: list[Case] = []
    for method, route in sorted(routes):
        path = fill(route, ids)
        valid = VALID_BODIES[(method, route)]
        cases += [
            Case(
                "malformed JSON",
                method,
                path,
                422,
                ("malformed JSON",),
                content=b"{bad",
                headers=JSON,
            ),
            Case(
                "truncated JSON",
                method,
                path,
                422,
                ("malformed JSON",),
                content=b'{"a": ',
                headers=JSON,
            ),
            Case(
                "unknown field", method, path, 422, ("zz_unknown",), json={**valid, "zz_unknown": 1}
            ),
            Case("array body", method, path, 422, json=[valid]),
            Case("string body", method, path, 422, json="hello"),
            Case(
                "form body",
                method,
                path,
                None,
                content=b"a=1",
                headers={"content-type": "application/x-www-form-urlencoded"},
            ),
            Case(
                "xml body",
                method,
                path,
                None,
                content=b"<a/>",
                headers={"content-type": "application/xml"},
            ),
            Case(
                "text body",
                method,
                path,
                None,
                content=b"hello",
                headers={"content-type": "text/plain"},
            ),
            Case(
                "oversize body",
                method,
                path,
                413,
                ("exceeds",),
                content=b'{"x": "' + b"a" * (1 << 20) + b'"}',
                headers=JSON,
            ),
        ]

    s = f"/api/v1/sessions/{ids['session_id']}"
    long = "x" * 300
    cases += [
        # wrong types
        Case("template type", "POST", "/api/v1/sessions", 422, ("template",), json={"template": 5}),
        Case(
            "tags type",
            "POST",
            "/api/v1/sessions",
            422,
            ("tags",),
            json={"template": "xterm", "tags": "a"},
        ),
        Case(
            "tag item type",
            "POST",
            "/api/v1/sessions",
            422,
            ("tags",),
            json={"template": "xterm", "tags": [1]},
        ),
        Case(
            "bool type",
            "POST",
            "/api/v1/sessions",
            422,
            ("persistent_home",),
            json={"template": "xterm", "persistent_home": "maybe"},
        ),
        Case(
            "resources type",
            "POST",
            "/api/v1/sessions",
            422,
            ("resources",),
            json={"template": "xterm", "resources": "big"},
        ),
        Case(
            "cpu type",
            "POST",
            "/api/v1/sessions",
            422,
            ("resources.cpu_millis",),
            json={"template": "xterm", "resources": {"cpu_millis": "lots"}},
        ),
        Case(
            "cpu float",
            "POST",
            "/api/v1/sessions",
            422,
            ("cpu_millis",),
            json={"template": "xterm", "resources": {"cpu_millis": 1.5}},
        ),
        Case(
            "cpu range",
            "POST",
            "/api/v1/sessions",
            422,
            ("cpu_millis",),
            json={"template": "xterm", "resources": {"cpu_millis": 10**12}},
        ),
        Case(
            "nested unknown",
            "POST",
            "/api/v1/sessions",
            422,
            ("resources.gpu",),
            json={"template": "xterm", "resources": {"gpu": 1}},
        ),
        Case(
            "idle range",
            "POST",
            "/api/v1/sessions",
            422,
            ("idle_timeout_seconds",),
            json={"template": "xterm", "idle_timeout_seconds": 1},
        ),
        Case("missing template", "POST", "/api/v1/sessions", 422, ("template",), json={}),
        Case(
            "null template", "POST", "/api/v1/sessions", 422, ("template",), json={"template": None}
        ),
        Case(
            "role enum",
            "POST",
            "/api/v1/users",
            422,
            ("role",),
            json={"username": "r1", "password": "pass-word-123", "role": "root"},
        ),
        Case(
            "username type",
            "POST",
            "/api/v1/users",
            422,
            ("username",),
            json={"username": 12, "password": "pass-word-123"},
        ),
        Case(
            "quota negative",
            "PUT",
            "/api/v1/users/admin/quota",
            422,
            ("max_sessions",),
            json={**QUOTA, "max_sessions": -1},
        ),
        Case(
            "quota type",
            "PUT",
            "/api/v1/users/admin/quota",
            422,
            ("max_cpu_millis",),
            json={**QUOTA, "max_cpu_millis": "three"},
        ),
        Case(
            "quota missing",
            "PUT",
            f"/api/v1/groups/{ids['group_id']}/quota",
            422,
            ("max_memory_mb",),
            json={"max_sessions": 1, "max_cpu_millis": 1},
        ),
        Case(
            "is_active type",
            "PATCH",
            "/api/v1/users/admin",
            422,
            ("is_active",),
            json={"is_active": "nope"},
        ),
        Case(
            "user idle range",
            "PATCH",
            "/api/v1/users/admin",
            422,
            ("idle_timeout_seconds",),
            json={"idle_timeout_seconds": 5},
        ),
        Case(
            "login null",
            "POST",
            "/api/v1/auth/login",
            422,
            ("username",),
            json={"username": None, "password": "x"},
        ),
        Case(
            "ttl type",
            "POST",
            "/api/v1/agents/join-tokens",
            422,
            ("ttl_seconds",),
            json={"ttl_seconds": "soon"},
        ),
        Case(
            "ttl range",
            "POST",
            "/api/v1/agents/join-tokens",
            422,
            ("ttl_seconds",),
            json={"ttl_seconds": 10**9},
        ),
        Case("patch tags type", "PATCH", s, 422, ("tags",), json={"tags": "x"}),
        Case(
            "template launch empty",
            "POST",
            "/api/v1/templates",
            422,
            ("launch",),
            json={**TEMPLATE, "launch": {}},
        ),
        Case(
            "template toleration effect",
            "POST",
            "/api/v1/templates",
            422,
            ("launch.kubernetes.tolerations.0.effect",),
            json={
                **TEMPLATE,
                "launch": {
                    "kubernetes": {
                        "image": "localhost/streamspace/xterm:latest",
                        "tolerations": [{"key": "gpu", "effect": "Sometimes"}],
                    }
                },
            },
        ),
        Case(
            "template resources",
            "POST",
            "/api/v1/templates",
            422,
            ("resources.cpu_millis",),
            json={**TEMPLATE, "resources": {"cpu_millis": 1}},
        ),
        # over-long strings
        Case(
            "username long",
            "POST",
            "/api/v1/users",
            422,
            ("username",),
            json={"username": "u" * 65, "password": "pass-word-123"},
        ),
        Case(
            "password long",
            "POST",
            "/api/v1/users",
            422,
            ("password",),
            json={"username": "u1", "password": "p" * 1025},
        ),
        Case(
            "password short",
            "POST",
            "/api/v1/users",
            422,
            ("password",),
            json={"username": "u1", "password": "p"},
        ),
        Case(
            "display name long",
            "PATCH",
            "/api/v1/users/admin",
            422,
            ("display_name",),
            json={"display_name": "d" * 129},
        ),
        Case(
            "email long", "PATCH", "/api/v1/users/admin", 422, ("email",), json={"email": "e" * 255}
        ),
        Case(
            "login username long",
            "POST",
            "/api/v1/auth/login",
            422,
            ("username",),
            json={"username": "u" * 65, "password": "x"},
        ),
        Case(
            "login password long",
            "POST",
            "/api/v1/auth/login",
            422,
            ("password",),
            json={"username": "admin", "password": "x" * 1025},
        ),
        Case("group name long", "POST", "/api/v1/groups", 422, ("name",), json={"name": "g" * 65}),
        Case(
            "group description long",
            "PATCH",
            f"/api/v1/groups/{ids['group_id']}",
            422,
            ("description",),
            json={"description": "d" * 513},
        ),
        Case(
            "template display long",
            "POST",
            "/api/v1/templates",
            422,
            ("display_name",),
            json={**TEMPLATE, "display_name": "d" * 129},
        ),
        Case(
            "template description long",
            "POST",
            "/api/v1/templates",
            422,
            ("description",),
            json={**TEMPLATE, "description": "d" * 2001},
        ),
        Case(
            "tag long",
            "POST",
            "/api/v1/sessions",
            422,
            ("tag",),
            json={"template": "xterm", "tags": ["t" * 65]},
        ),
        Case(
            "too many tags",
            "POST",
            "/api/v1/sessions",
            422,
            ("tags",),
            json={"template": "xterm", "tags": [f"t{i}" for i in range(21)]},
        ),
        Case(
            "cluster long",
            "POST",
            "/api/v1/sessions",
            422,
            ("cluster_id",),
            json={"template": "xterm", "cluster_id": "c" * 65},
        ),
        Case(
            "idempotency key long",
            "POST",
            "/api/v1/sessions",
            422,
            ("idempotency-key",),
            json={"template": "xterm"},
            headers={"Idempotency-Key": "k" * 129},
        ),
        Case(
            "refresh token long",
            "POST",
            "/api/v1/auth/refresh",
            422,
            ("refresh_token",),
            json={"refresh_token": "r" * 513},
        ),
        # semantic errors
        Case(
            "unknown template",
            "POST",
            "/api/v1/sessions",
            422,
            ("template", "nope-tpl"),
            json={"template": "nope-tpl"},
        ),
        Case(
            "template name pattern",
            "POST",
            "/api/v1/sessions",
            422,
            ("template",),
            json={"template": "../etc/passwd"},
        ),
        Case(
            "tag chars",
            "POST",
            "/api/v1/sessions",
            422,
            ("tag", "bad tag!"),
            json={"template": "xterm", "tags": ["bad tag!"]},
        ),
        Case(
            "tag unicode",
            "POST",
            "/api/v1/sessions",
            422,
            ("tag",),
            json={"template": "xterm", "tags": ["ümlaut"]},
        ),
        Case("tag leading dash", "PATCH", s, 422, ("tag",), json={"tags": ["-x"]}),
        Case("tag chars patch", "PATCH", s, 422, ("tag",), json={"tags": ["a b"]}),
        Case(
            "owner_id field",
            "POST",
            "/api/v1/sessions",
            422,
            ("owner_id",),
            json={"template": "xterm", "owner_id": "x"},
        ),
        Case(
            "username chars",
            "POST",
            "/api/v1/users",
            422,
            ("username",),
            json={"username": "bad name", "password": "pass-word-123"},
        ),
        Case(
            "template name chars",
            "POST",
            "/api/v1/templates",
            422,
            ("name",),
            json={**TEMPLATE, "name": "Bad_Name"},
        ),
        # query parameters
        Case(
            "state filter",
            "GET",
            "/api/v1/sessions",
            422,
            ("state", "bogus"),
            params={"state": "bogus"},
        ),
        Case(
            "state filter mixed",
            "GET",
            "/api/v1/sessions",
            422,
            ("state",),
            params={"state": "pending,Running"},
        ),
        Case("limit 0", "GET", "/api/v1/sessions", 422, ("limit",), params={"limit": 0}),
        Case("limit huge", "GET", "/api/v1/sessions", 422, ("limit",), params={"limit": 100000}),
        Case("limit text", "GET", "/api/v1/sessions", 422, ("limit",), params={"limit": "ten"}),
        Case("offset negative", "GET", "/api/v1/sessions", 422, ("offset",), params={"offset": -1}),
        Case(
            "offset huge sessions",
            "GET",
            "/api/v1/sessions",
            422,
            ("offset",),
            params={"offset": 10**20},
        ),
        Case("all text", "GET", "/api/v1/sessions", 422, ("all",), params={"all": "maybe"}),
        Case(
            "active text",
            "GET",
            "/api/v1/sessions",
            422,
            ("active",),
            params={"active": "sometimes"},
        ),
        Case("tag filter long", "GET", "/api/v1/sessions", 422, ("tag",), params={"tag": "t" * 65}),
        Case("users limit 0", "GET", "/api/v1/users", 422, ("limit",), params={"limit": 0}),
        Case("users limit huge", "GET", "/api/v1/users", 422, ("limit",), params={"limit": 100000}),
        Case("audit limit 0", "GET", "/api/v1/audit", 422, ("limit",), params={"limit": 0}),
        Case("audit limit huge", "GET", "/api/v1/audit", 422, ("limit",), params={"limit": 100000}),
        Case(
            "audit action long",
            "GET",
            "/api/v1/audit",
            422,
            ("action",),
            params={"action": "a" * 65},
        ),
        # routing and headers
        Case("unknown route", "GET", "/api/v1/nope", 404),
        Case("wrong method", "PUT", "/api/v1/sessions", 405),
        Case(
            "basic auth",
            "GET",
            "/api/v1/sessions",
            401,
            headers={"Authorization": "Basic YWRtaW46eA=="},
        ),
        Case("empty bearer", "GET", "/api/v1/sessions", 401, headers={"Authorization": "Bearer"}),
        Case(
            "long bearer",
            "GET",
            "/api/v1/sessions",
            401,
            headers={"Authorization": "Bearer " + long},
        ),
    ]
    failures = run_cases(admin, cases)
    assert not failures, f"{len(failures)} of {len(cases)} bad-input cases failed:\n" + "\n".join(
        failures
    )
    # nothing above changed state: still one session, one group, no new template or user
    assert admin.get("/api/v1/sessions").json()["total"] == 1
    assert [u["username"] for u in admin.get("/api/v1/users").json()["items"]] == ["admin"]
    assert admin.get("/api/v1/templates/tpl-bad").status_code == 404
    admin.close()


def bad_id_cases(admin: httpx.Client, ids: dict[str, str]) -> list[Case]:
    spec = admin.get("/api/openapi.json").json()
    bad_ids = {
        "300 chars": "x" * 300,
        "unicode": "ü日本語😀",
        "dot-dot": "..%2F..%2Fetc%2Fpasswd",
        "dots": "%2E%2E",  # encoded: httpx would resolve a literal ".." client-side
        "sql": "x'%20OR%20'1'='1",
        "nul byte": "a%00b",
    }
    cases = []
    for route, ops in spec["paths"].items():
        if "{" not in route:
            continue
        params = [p.strip("{}") for p in route.split("/") if p.startswith("{")]
        for method in ops:
            body = VALID_BODIES.get((method.upper(), route))
            for label, bad in bad_ids.items():
                for param in params:
                    filled = {**ids, param: bad}
                    cases.append(
                        Case(
                            f"{label} as {param}",
                            method.upper(),
                            fill(route, filled),
                            None,
                            json=body,
                        )
                    )
    return cases


def test_bad_ids_never_5xx(db_url: str, make_control_plane: Any) -> None:
    cp = make_control_plane(database_url=db_url, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    admin, ids = prepare(cp)
    cases = bad_id_cases(admin, ids)
    # strings in queries and bodies that reach the database: accepted or refused, never a 5xx
    nul = "a\x00b"
    cases += [
        Case("nul in tag filter", "GET", "/api/v1/sessions", NOT_5XX, params={"tag": nul}),
        Case(
            "nul in template filter", "GET", "/api/v1/sessions", NOT_5XX, params={"template": nul}
        ),
        Case(
            "nul in owner filter",
            "GET",
            "/api/v1/sessions",
            NOT_5XX,
            params={"all": "true", "owner": nul},
        ),
        Case("nul in users q", "GET", "/api/v1/users", NOT_5XX, params={"q": nul}),
        Case("nul in audit actor", "GET", "/api/v1/audit", NOT_5XX, params={"actor": nul}),
        Case("nul in agents cluster", "GET", "/api/v1/agents", NOT_5XX, params={"cluster_id": nul}),
        Case(
            "nul in login",
            "POST",
            "/api/v1/auth/login",
            NOT_5XX,
            json={"username": nul, "password": "x"},
        ),
        Case(
            "nul in display name",
            "POST",
            "/api/v1/users",
            NOT_5XX,
            json={"username": "nully", "password": "pass-word-123", "display_name": nul},
        ),
        Case(
            "nul in group description",
            "POST",
            "/api/v1/groups",
            NOT_5XX,
            json={"name": "nullgroup", "description": nul},
        ),
        Case(
            "nul in template",
            "POST",
            "/api/v1/templates",
            NOT_5XX,
            json={**TEMPLATE, "name": "tpl-nul", "description": nul},
        ),
        Case(
            "offset beyond int64 (users)",
            "GET",
            "/api/v1/users",
            NOT_5XX,
            params={"offset": 10**20},
        ),
        Case(
            "offset beyond int64 (audit)",
            "GET",
            "/api/v1/audit",
            NOT_5XX,
            params={"offset": 10**20},
        ),
    ]
    failures = run_cases(admin, cases)
    assert not failures, (
        f"{len(failures)} of {len(cases)} bad-id cases were not a 4xx problem:\n"
        + "\n".join(failures)
    )
    # the session the ids were aimed at is untouched
    got = admin.get(f"/api/v1/sessions/{ids['session_id']}").json()
    assert got["state"] == "pending"
    admin.close()


def test_oversize_body_without_content_length_is_413(make_control_plane: Any) -> None:
    """A chunked upload (no Content-Length) over the limit gets the same 413 problem."""
    cp = make_control_plane(**NO_LIMIT)
    admin = login(cp)

    def chunks() -> Any:
        yield b'{"template": "'
        for _ in range(12):
            yield b"a" * 100_000
        yield b'"}'

    r = admin.post("/api/v1/sessions", content=chunks(), headers=JSON)
    failures = [f"status {r.status_code}: {r.text[:200]}"] if r.status_code != 413 else []
    failures += problem_failures(r)
    assert not failures, failures
    admin.close()
