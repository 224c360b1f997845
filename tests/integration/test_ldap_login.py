"""Directory login through the product against a real OpenLDAP slapd (fixture `slapd`).

A directory user logs in with their directory password and gets an account; their directory
groups become StreamSpace groups and their role comes from the admin/operator group; changes
in the directory apply at the next login; a removed or disabled directory user can no longer
log in or refresh; an unreachable directory is a 503 for directory users only.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

from streamspace_testing.ldap import PASSWORDS

LOCAL_PASSWORD = "local-pass-12345"


def ldap_cp(make_control_plane: Any, slapd: Any, **settings: Any) -> Any:
    return make_control_plane(**NO_LIMIT, **slapd.settings(**settings))


def directory_login(cp: Any, username: str, **extra: Any) -> httpx.Response:
    with client(cp) as anon:
        return anon.post(
            "/api/v1/auth/login",
            json={"username": username, "password": PASSWORDS[username], **extra},
        )


def groups(admin: httpx.Client) -> dict[str, dict[str, Any]]:
    r = admin.get("/api/v1/groups")
    assert r.status_code == 200, r.text
    return {g["name"]: g for g in r.json()}


def user_row(admin: httpx.Client, name: str) -> dict[str, Any]:
    r = admin.get(f"/api/v1/users/{name}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_directory_users_get_accounts_roles_and_groups(
    make_control_plane: Any, slapd: Any, db_url: str
) -> None:
    cp = ldap_cp(make_control_plane, slapd, database_url=db_url)
    admin = login(cp)

    r = directory_login(cp, "alice")
    assert r.status_code == 200, r.text
    me = r.json()["user"]
    assert me["username"] == "alice" and me["auth_source"] == "ldap"
    assert me["role"] == "admin"  # member of the directory group "admins"
    assert me["display_name"] == "Alice Example" and me["email"] == "alice@example.org"
    with client(cp, r.json()["access_token"]) as alice:
        assert alice.get("/api/v1/users").status_code == 200  # really an admin

    r = directory_login(cp, "bob")
    assert r.status_code == 200, r.text
    assert r.json()["user"]["role"] == "user"

    found = groups(admin)
    assert {"engineers", "admins", "designers"} <= set(found)
    assert found["engineers"]["source"] == "ldap"
    assert found["engineers"]["members"] == ["alice", "bob"]
    assert found["admins"]["members"] == ["alice"]
    assert found["designers"]["members"] == ["bob"]

    # a second login updates, never duplicates
    assert directory_login(cp, "alice").status_code == 200
    listed = admin.get("/api/v1/users").json()
    by_name = {u["username"]: u for u in listed["items"]}
    assert set(by_name) == {"admin", "alice", "bob"}
    assert by_name["admin"]["auth_source"] == "local"
    assert by_name["bob"]["auth_source"] == "ldap"

    audit = admin.get("/api/v1/audit", params={"action": "auth.login", "actor": "alice"}).json()
    assert audit["total"] == 2
    first = audit["items"][-1]["detail"]
    assert first["method"] == "ldap" and first["created"] is True
    assert first["groups_joined"] == ["admins", "engineers"]
    assert audit["items"][0]["detail"]["created"] is False


def test_parallel_first_logins_make_one_account(
    make_control_plane: Any, slapd: Any, db_url: str
) -> None:
    cp = ldap_cp(make_control_plane, slapd, database_url=db_url)
    names = ["alice", "bob"] * 4
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda name: directory_login(cp, name), names))
    assert [r.status_code for r in answers] == [200] * len(names), [r.text for r in answers]
    admin = login(cp)
    users = [u["username"] for u in admin.get("/api/v1/users").json()["items"]]
    assert users == ["admin", "alice", "bob"]
    found = groups(admin)
    assert found["engineers"]["members"] == ["alice", "bob"]
    assert found["designers"]["members"] == ["bob"]


def test_wrong_password_answers_like_a_local_one(make_control_plane: Any, slapd: Any) -> None:
    cp = ldap_cp(make_control_plane, slapd)
    with client(cp) as anon:
        local = anon.post("/api/v1/auth/login", json={"username": "admin", "password": "nope-1"})
        directory = anon.post("/api/v1/auth/login", json={"username": "alice", "password": "no"})
        unknown = anon.post("/api/v1/auth/login", json={"username": "zed", "password": "nope"})
    bodies = [assert_problem(r, 401, "wrong username or password") for r in (local, directory)]
    bodies.append(assert_problem(unknown, 401, "wrong username or password"))
    assert len({b["detail"] for b in bodies}) == 1
    admin = login(cp)
    assert [u["username"] for u in admin.get("/api/v1/users").json()["items"]] == ["admin"]
    failed = admin.get("/api/v1/audit", params={"action": "auth.login_failed"}).json()["items"]
    assert {(a["resource_id"], a["detail"].get("method")) for a in failed} == {
        ("admin", "password"),
        ("alice", "ldap"),
        ("zed", "ldap"),
    }


def test_directory_changes_apply_at_next_login(make_control_plane: Any, slapd: Any) -> None:
    cp = ldap_cp(make_control_plane, slapd)
    admin = login(cp)
    # a local group bob is put in by an admin, and a local group that shares a directory name
    assert admin.post("/api/v1/groups", json={"name": "ops"}).status_code == 201
    assert admin.post("/api/v1/groups", json={"name": "qa"}).status_code == 201
    first = directory_login(cp, "bob")
    assert first.status_code == 200, first.text
    assert admin.put("/api/v1/groups/ops/members/bob").status_code == 200
    old_token = first.json()["access_token"]

    slapd.remove_member("designers", "bob")
    slapd.add_group("qa", "bob")  # the name of a local group: never joined
    slapd.add_group("testers", "bob")
    slapd.add_member("admins", "bob")

    again = directory_login(cp, "bob")
    assert again.status_code == 200, again.text
    assert again.json()["user"]["role"] == "admin"
    found = groups(admin)
    assert found["designers"]["members"] == []  # left: no longer in the directory group
    assert found["testers"]["members"] == ["bob"] and found["testers"]["source"] == "ldap"
    assert found["engineers"]["members"] == ["bob"]
    assert found["admins"]["members"] == ["bob"]
    assert found["ops"]["members"] == ["bob"] and found["ops"]["source"] == "local"
    assert found["qa"]["members"] == [] and found["qa"]["source"] == "local"

    # the role change ended the access tokens bob had (as an admin's role change does)
    with client(cp, old_token) as stale:
        assert_problem(stale.get("/api/v1/auth/me"), 401)
    with client(cp, again.json()["access_token"]) as fresh:
        assert fresh.get("/api/v1/auth/me").json()["role"] == "admin"

    slapd.remove_member("admins", "bob")
    assert directory_login(cp, "bob").json()["user"]["role"] == "user"


def test_removed_directory_user_cannot_log_in_or_refresh(
    make_control_plane: Any, slapd: Any
) -> None:
    cp = ldap_cp(make_control_plane, slapd)
    r = directory_login(cp, "carol", refresh_token_delivery="body")
    assert r.status_code == 200, r.text
    refresh, access = r.json()["refresh_token"], r.json()["access_token"]
    with client(cp) as anon:
        renewed = anon.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
        assert renewed.status_code == 200, renewed.text  # the directory still has her
        refresh = renewed.json()["refresh_token"]

    slapd.delete_user("carol")
    assert_problem(directory_login(cp, "carol"), 401, "wrong username or password")
    with client(cp) as anon:
        gone = anon.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
    assert_problem(gone, 401, "no longer exists")
    with client(cp, access) as c:
        assert_problem(c.get("/api/v1/auth/me"), 401)  # her sign-ins ended with it
    admin = login(cp)
    refused = admin.get("/api/v1/audit", params={"action": "auth.refresh_refused"}).json()
    assert refused["total"] == 1
    assert refused["items"][0]["resource_id"] == user_row(admin, "carol")["id"]


def test_a_filter_excludes_disabled_accounts(make_control_plane: Any, slapd: Any) -> None:
    cp = ldap_cp(
        make_control_plane, slapd, ldap_user_filter="(&(uid={username})(!(employeeType=disabled)))"
    )
    assert_problem(directory_login(cp, "dave"), 401, "wrong username or password")
    r = directory_login(cp, "alice", refresh_token_delivery="body")
    assert r.status_code == 200, r.text
    slapd.set_attribute("alice", "employeeType", "disabled")
    with client(cp) as anon:
        refused = anon.post(
            "/api/v1/auth/refresh", json={"refresh_token": r.json()["refresh_token"]}
        )
    assert_problem(refused, 401, "no longer exists")
    assert_problem(directory_login(cp, "alice"), 401, "wrong username or password")


def test_unreachable_directory_is_a_503_for_directory_users_only(
    make_control_plane: Any, slapd: Any
) -> None:
    cp = ldap_cp(make_control_plane, slapd, ldap_timeout_seconds=2.0)
    r = directory_login(cp, "alice", refresh_token_delivery="body")
    assert r.status_code == 200, r.text
    refresh = r.json()["refresh_token"]

    slapd.stop()
    body = assert_problem(directory_login(cp, "alice"), 503, "directory cannot be reached")
    assert body["type"].endswith("directory-unavailable")
    with client(cp) as anon:
        assert_problem(
            anon.post("/api/v1/auth/refresh", json={"refresh_token": refresh}), 503, "directory"
        )
    admin = login(cp)  # local accounts do not need the directory
    assert admin.get("/api/v1/auth/me").json()["username"] == "admin"

    slapd.start()
    with client(cp) as anon:
        # the refresh token was not spent by the failed attempt
        renewed = anon.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
    assert renewed.status_code == 200, renewed.text
    assert directory_login(cp, "alice").status_code == 200


def test_a_directory_that_does_not_answer_is_a_503_within_the_timeout(
    make_control_plane: Any, slapd: Any
) -> None:
    """A directory that accepts connections and then says nothing: each directory login ends
    after the timeout, and meanwhile a local login is not held up by them."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        port = hole.getsockname()[1]
        cp = ldap_cp(
            make_control_plane,
            slapd,
            ldap_url=f"ldap://localhost:{port}",
            ldap_timeout_seconds=2.0,
        )
        with ThreadPoolExecutor(12) as pool:
            started = time.monotonic()
            hung = [pool.submit(directory_login, cp, "alice") for _ in range(12)]
            time.sleep(0.3)
            local_started = time.monotonic()
            admin = login(cp)
            local_took = time.monotonic() - local_started
            answers = [f.result() for f in hung]
        took = time.monotonic() - started
    for r in answers:
        assert_problem(r, 503, "directory cannot be reached")
    assert took < 10.0, took  # 12 logins, 8 at once, each ends at the 2 s timeout
    assert local_took < 0.8, local_took
    assert admin.get("/api/v1/auth/me").status_code == 200


def test_a_local_account_wins_over_a_directory_entry(make_control_plane: Any, slapd: Any) -> None:
    cp = ldap_cp(make_control_plane, slapd)
    admin = login(cp)
    r = admin.post("/api/v1/users", json={"username": "bob", "password": LOCAL_PASSWORD})
    assert r.status_code == 201, r.text
    with client(cp) as anon:
        local = anon.post(
            "/api/v1/auth/login", json={"username": "bob", "password": LOCAL_PASSWORD}
        )
        assert local.status_code == 200, local.text
        assert local.json()["user"]["auth_source"] == "local"
        # the directory's password for bob is not his password here
        assert_problem(directory_login(cp, "bob"), 401, "wrong username or password")
        # neither for the bootstrap admin, whatever a directory entry named admin says
        assert_problem(
            anon.post("/api/v1/auth/login", json={"username": "Admin", "password": "x" * 12}),
            401,
            "wrong username or password",
        )
    assert "engineers" not in groups(admin)  # no directory sync for a local account


def test_directory_accounts_have_no_password_here(make_control_plane: Any, slapd: Any) -> None:
    cp = ldap_cp(make_control_plane, slapd)
    admin = login(cp)
    r = directory_login(cp, "bob")
    assert r.status_code == 200, r.text
    assert_problem(
        admin.patch("/api/v1/users/bob", json={"password": "a-new-strong-pass-9"}),
        400,
        "directory",
    )
    with client(cp, r.json()["access_token"]) as bob:
        assert_problem(
            bob.post(
                "/api/v1/auth/password",
                json={"current_password": PASSWORDS["bob"], "new_password": "another-pass-123"},
            ),
            400,
            "directory",
        )
    assert user_row(admin, "bob")["auth_source"] == "ldap"
    # an admin can still disable a directory user here
    assert admin.patch("/api/v1/users/bob", json={"is_active": False}).status_code == 200
    assert_problem(directory_login(cp, "bob"), 401, "disabled")
