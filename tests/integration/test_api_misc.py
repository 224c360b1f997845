"""Health, readiness, metrics, the OpenAPI document, the audit log and template management."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

from conftest import wait_for

SPEC = {
    "name": "my-editor",
    "display_name": "My Editor",
    "category": "Office",
    "description": "An editor added through the API",
    "icon": "editor.svg",
    "tags": ["text", "edit"],
    "resources": {"cpu_millis": 250, "memory_mb": 256},
    "launch": {"local": {"command": ["xterm"]}, "docker": {"image": "example/editor:1"}},
}
"""Runs xterm: a template the agent of the test can run, so users see it and may launch it."""


def test_health_ready_metrics_openapi(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    with client(cp) as anon:
        r = anon.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = anon.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok" and r.json()["database"] == "ok"
        # some traffic so that the request counter has samples
        anon.get("/api/v1/sessions")
        r = anon.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert "streamspace_http_requests_total" in text
        assert 'route="/api/v1/sessions"' in text and 'status="401"' in text
        assert "streamspace_sessions" in text
        r = anon.get("/api/openapi.json")
        assert r.status_code == 200
        spec = json.loads(r.text)
        assert spec["openapi"].startswith("3.")
        assert spec["info"]["title"] == "StreamSpace"
        for path in (
            "/api/v1/sessions",
            "/api/v1/auth/login",
            "/api/v1/templates",
            "/api/v1/users",
            "/api/v1/agents",
            "/api/v1/audit",
        ):
            assert path in spec["paths"], path
        # request bodies refuse unknown fields, and the schema says so
        schemas = spec["components"]["schemas"]
        assert schemas["SessionCreateIn"].get("additionalProperties") is False


def test_audit_log_records_actor(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    admin = login(cp)
    r = admin.post("/api/v1/users", json={"username": "audrey", "password": "audrey-pass-1"})
    assert r.status_code == 201, r.text
    audrey_id = r.json()["id"]
    audrey = login(cp, "audrey", "audrey-pass-1")
    r = audrey.post("/api/v1/sessions", json={"template": "xterm"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert audrey.delete(f"/api/v1/sessions/{sid}").status_code == 202
    with client(cp) as anon:
        anon.post("/api/v1/auth/login", json={"username": "audrey", "password": "wrong-one"})

    def entries(**params: Any) -> list[dict[str, Any]]:
        r = admin.get("/api/v1/audit", params=params)
        assert r.status_code == 200, r.text
        return list(r.json()["items"])

    created = entries(action="user.create")
    assert len(created) == 1, created
    assert created[0]["actor"] == "admin"
    assert created[0]["resource_type"] == "user" and created[0]["resource_id"] == audrey_id
    assert created[0]["detail"]["username"] == "audrey"
    assert created[0]["ip"] == "127.0.0.1"

    sess = entries(action="session.create")
    assert len(sess) == 1, sess
    assert sess[0]["actor"] == "audrey" and sess[0]["resource_id"] == sid
    assert sess[0]["status_code"] == 201
    assert sess[0]["detail"]["template"] == "xterm"
    stop = entries(action="session.stop")
    assert [e["actor"] for e in stop] == ["audrey"] and stop[0]["resource_id"] == sid
    failed = entries(action="auth.login_failed")
    assert failed and failed[0]["actor"] == "" and failed[0]["resource_id"] == "audrey"
    assert failed[0]["status_code"] == 401
    # filters, newest first, pagination
    mine = entries(actor="audrey")
    assert {e["action"] for e in mine} >= {"session.create", "session.stop", "auth.login"}
    ids = [e["id"] for e in entries()]
    assert ids == sorted(ids, reverse=True)
    page = admin.get("/api/v1/audit", params={"limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_offset"] == 2 and page["total"] >= 5
    # users cannot read it
    assert_problem(audrey.get("/api/v1/audit"), 403)
    admin.close()
    audrey.close()


def test_templates_crud(make_control_plane: Any) -> None:
    cp = make_control_plane(agent_heartbeat_seconds=0.5, **NO_LIMIT)
    cp.start_full_agent()  # templates available; sessions stay pending
    admin = login(cp)
    r = admin.post("/api/v1/users", json={"username": "tess", "password": "tess-pass-12"})
    assert r.status_code == 201, r.text
    user = login(cp, "tess", "tess-pass-12")

    # file templates are there
    names = {t["name"] for t in user.get("/api/v1/templates").json()}
    assert {"xterm", "firefox"} <= names
    xterm = user.get("/api/v1/templates/xterm").json()
    assert xterm["source"] == "file" and xterm["enabled"] is True

    # create
    r = admin.post("/api/v1/templates", json=SPEC)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "my-editor" and body["source"] == "api"
    assert body["tags"] == ["text", "edit"] and body["category"] == "Office"
    assert body["spec"]["resources"] == {"cpu_millis": 250, "memory_mb": 256}
    assert_problem(admin.post("/api/v1/templates", json=SPEC), 409, "my-editor")
    # users see it once an agent reports it runnable (agents read the catalog again on their own)
    wait_for(
        lambda: admin.get("/api/v1/templates/my-editor").json()["available"],
        15,
        what="the agent to report my-editor runnable",
    )
    got = user.get("/api/v1/templates/my-editor")
    assert got.status_code == 200 and got.json()["display_name"] == "My Editor"
    # it can be used, with its resources
    r = user.post("/api/v1/sessions", json={"template": "my-editor"})
    assert r.status_code == 201, r.text
    assert r.json()["resources"] == {"cpu_millis": 250, "memory_mb": 256}
    # filters
    office = admin.get("/api/v1/templates", params={"category": "Office"}).json()
    assert "my-editor" in {t["name"] for t in office}
    assert all(t["category"] == "Office" for t in office)
    tagged = admin.get("/api/v1/templates", params={"tag": "edit"}).json()
    assert [t["name"] for t in tagged] == ["my-editor"]

    # invalid specs name the field
    invalid = [
        ({**SPEC, "name": "other", "launch": {}}, "launch"),
        (
            {k: v for k, v in SPEC.items() if k != "display_name"} | {"name": "other"},
            "display_name",
        ),
        ({**SPEC, "name": "Other_Name"}, "name"),
        ({**SPEC, "name": "other", "resources": {"cpu_millis": 5}}, "resources.cpu_millis"),
        ({**SPEC, "name": "other", "launch": {"local": {"command": []}}}, "launch.local.command"),
        ({**SPEC, "name": "other", "display": {"depth": 8}}, "display.depth"),
        ({**SPEC, "name": "other", "colour": "red"}, "colour"),
        (
            {**SPEC, "name": "other", "launch": {"local": {"command": ["x"], "shell": True}}},
            "launch.local.shell",
        ),
    ]
    for spec, field in invalid:
        assert_problem(admin.post("/api/v1/templates", json=spec), 422, field)
    assert admin.get("/api/v1/templates/other").status_code == 404

    # PUT replaces; the name in the body must match the URL
    replaced = {**SPEC, "display_name": "My Editor 2", "tags": ["text"]}
    r = admin.put("/api/v1/templates/my-editor", json=replaced)
    assert r.status_code == 200, r.text
    assert r.json()["display_name"] == "My Editor 2" and r.json()["tags"] == ["text"]
    assert user.get("/api/v1/templates/my-editor").json()["display_name"] == "My Editor 2"
    assert_problem(admin.put("/api/v1/templates/else", json=replaced), 400, "differs")
    assert_problem(
        admin.put("/api/v1/templates/my-editor", json={**replaced, "launch": {}}), 422, "launch"
    )
    # PUT on a new name creates
    r = admin.put("/api/v1/templates/fresh-one", json={**SPEC, "name": "fresh-one"})
    assert r.status_code in (200, 201), r.text
    wait_for(
        lambda: user.get("/api/v1/templates/fresh-one").status_code == 200,
        15,
        what="the agent to report fresh-one runnable",
    )

    # disabled templates: only admins see them, nobody can start them
    r = admin.put("/api/v1/templates/my-editor", json={**replaced, "enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False
    assert "my-editor" not in {t["name"] for t in user.get("/api/v1/templates").json()}
    assert_problem(user.get("/api/v1/templates/my-editor"), 404)
    assert "my-editor" in {t["name"] for t in admin.get("/api/v1/templates").json()}
    assert admin.get("/api/v1/templates/my-editor").status_code == 200
    assert_problem(user.post("/api/v1/sessions", json={"template": "my-editor"}), 422, "my-editor")

    # delete
    assert admin.delete("/api/v1/templates/fresh-one").status_code == 204
    assert_problem(admin.get("/api/v1/templates/fresh-one"), 404)
    assert_problem(admin.delete("/api/v1/templates/fresh-one"), 404)
    assert_problem(user.post("/api/v1/sessions", json={"template": "fresh-one"}), 422, "fresh-one")

    # audit trail of the template changes
    actions = [
        e["action"]
        for e in admin.get("/api/v1/audit", params={"resource_type": "template"}).json()["items"]
    ]
    assert actions.count("template.create") == 2, actions  # POST my-editor, PUT fresh-one
    assert "template.update" in actions and "template.delete" in actions
    admin.close()
    user.close()


def test_exhausted_connection_pool_answers_503_database_busy(
    pg_url: str, make_control_plane: Any
) -> None:
    """Every pooled connection held elsewhere: a request waits the pool timeout, then gets a
    problem that says the server is busy (not that the database is down), and the next request
    after the connection is returned succeeds."""
    cp = make_control_plane(
        database_url=pg_url, db_pool_size=2, db_max_overflow=0, db_pool_timeout_seconds=0.5
    )
    with login(cp) as admin:
        assert admin.get("/api/v1/sessions").status_code == 200
        held = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            async with cp.state.engine.connect(), cp.state.engine.connect():
                held.set()
                await release.wait()

        holder = asyncio.run_coroutine_threadsafe(hold(), cp.loop)
        cp.run(asyncio.wait_for(held.wait(), 5))
        try:
            body = assert_problem(admin.get("/api/v1/sessions"), 503, "overloaded")
            assert body["type"].endswith("/database-busy")
        finally:
            cp.loop.call_soon_threadsafe(release.set)
            holder.result(5)
        assert admin.get("/api/v1/sessions").status_code == 200


def test_open_event_streams_hold_no_database_slot(pg_url: str, make_control_plane: Any) -> None:
    """Requests queue for a database slot (one here); a browser's live event stream must give its
    slot back once authenticated, or a few open tabs would block the API."""
    cp = make_control_plane(
        database_url=pg_url, db_pool_size=2, db_max_overflow=0, db_pool_timeout_seconds=1.0
    )
    with login(cp) as admin, admin.stream("GET", "/api/v1/events") as events:
        assert events.status_code == 200
        assert next(events.iter_lines()).startswith("event: hello")
        for _ in range(3):
            assert admin.get("/api/v1/sessions").status_code == 200
