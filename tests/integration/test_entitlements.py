"""Template entitlements through the product: a template limited to groups (`allowed_groups`)
is listed and launchable only by their members (and admins); others get a 403 problem of type
`template-not-entitled`, on create and on wake. Membership counts whatever made it: an admin
(local groups) or a directory login against a real OpenLDAP slapd (fixture `slapd`), so a user
the directory drops from the group loses the template at their next login."""

from __future__ import annotations

from typing import Any

import httpx
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)
from sqlalchemy import update

from streamspace.db.models import Session as SessionRow
from streamspace_testing.ldap import PASSWORDS

USER_PASSWORD = "user-pass-12345"


def limit_template(admin: httpx.Client, name: str, groups: list[str]) -> dict[str, Any]:
    spec = admin.get(f"/api/v1/templates/{name}").json()["spec"]
    r = admin.put(f"/api/v1/templates/{name}", json={**spec, "allowed_groups": groups})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def catalog(c: httpx.Client) -> set[str]:
    r = c.get("/api/v1/templates")
    assert r.status_code == 200, r.text
    return {t["name"] for t in r.json()}


def create(c: httpx.Client, template: str) -> httpx.Response:
    return c.post("/api/v1/sessions", json={"template": template, "persistent_home": False})


def directory_login(cp: Any, username: str) -> httpx.Client:
    with client(cp) as anon:
        r = anon.post(
            "/api/v1/auth/login", json={"username": username, "password": PASSWORDS[username]}
        )
    assert r.status_code == 200, r.text
    return client(cp, r.json()["access_token"])


def test_directory_group_removal_takes_the_template_away_at_next_login(
    make_control_plane: Any, slapd: Any
) -> None:
    cp = make_control_plane(**NO_LIMIT, **slapd.settings())
    cp.start_full_agent()  # templates available; sessions stay pending
    admin = login(cp)
    shown = limit_template(admin, "xterm", ["designers"])  # bob's directory group
    assert shown["allowed_groups"] == ["designers"]

    bob = directory_login(cp, "bob")
    assert "xterm" in catalog(bob)
    assert create(bob, "xterm").status_code == 201

    slapd.remove_member("designers", "bob")
    bob = directory_login(cp, "bob")
    assert "xterm" not in catalog(bob)
    assert_problem(bob.get("/api/v1/templates/xterm"), 404)
    body = assert_problem(create(bob, "xterm"), 403, "xterm", "designers")
    assert body["type"].endswith("template-not-entitled")
    assert body["allowed_groups"] == ["designers"]

    # admins see it, with who may launch it, and may launch it themselves
    listed = {t["name"]: t for t in admin.get("/api/v1/templates").json()}
    assert listed["xterm"]["allowed_groups"] == ["designers"]
    assert all(t["allowed_groups"] == [] for n, t in listed.items() if n != "xterm")
    assert create(admin, "xterm").status_code == 201

    slapd.add_member("designers", "bob")
    bob = directory_login(cp, "bob")
    assert "xterm" in catalog(bob)


def test_local_groups_entitle_and_a_hibernated_session_cannot_be_woken_after_removal(
    make_control_plane: Any,
) -> None:
    cp = make_control_plane(**NO_LIMIT)
    cp.start_full_agent()
    admin = login(cp)
    r = admin.post(
        "/api/v1/users", json={"username": "erin", "password": USER_PASSWORD, "role": "user"}
    )
    assert r.status_code == 201, r.text
    assert admin.post("/api/v1/groups", json={"name": "editors"}).status_code == 201
    limit_template(admin, "xterm", ["editors"])
    erin = login(cp, "erin", USER_PASSWORD)
    assert "xterm" not in catalog(erin)
    assert_problem(create(erin, "xterm"), 403, "editors")

    assert admin.put("/api/v1/groups/editors/members/erin").status_code == 200
    assert "xterm" in catalog(erin)
    made = create(erin, "xterm")
    assert made.status_code == 201, made.text
    session_id = made.json()["id"]

    async def hibernated() -> None:
        async with cp.state.db() as db:
            await db.execute(
                update(SessionRow).where(SessionRow.id == session_id).values(state="hibernated")
            )
            await db.commit()

    cp.run(hibernated())
    assert admin.delete("/api/v1/groups/editors/members/erin").status_code in (200, 204)
    body = assert_problem(erin.post(f"/api/v1/sessions/{session_id}/wake"), 403, "editors")
    assert body["type"].endswith("template-not-entitled")
    assert erin.get(f"/api/v1/sessions/{session_id}").json()["state"] == "hibernated"
    assert erin.delete(f"/api/v1/sessions/{session_id}").status_code == 202  # may still stop

    # an empty list opens it to everyone again
    limit_template(admin, "xterm", [])
    assert "xterm" in catalog(erin)


def test_bad_allowed_groups_are_422_problems(make_control_plane: Any) -> None:
    cp = make_control_plane(**NO_LIMIT)
    admin = login(cp)
    spec = admin.get("/api/v1/templates/xterm").json()["spec"]
    for bad in (["no spaces allowed"], "editors", [""], ["x" * 65], [7]):
        r = admin.put("/api/v1/templates/xterm", json={**spec, "allowed_groups": bad})
        assert_problem(r, 422, "allowed_groups")
