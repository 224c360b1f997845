"""Directory login's defences against a real slapd: filter injection, no unauthenticated bind,
TLS verified for real (StartTLS and LDAPS, a wrong CA refused), no timing tell between a
directory name and an unknown one, and the service account's password nowhere in logs or
answers."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import Any

import httpx
import pytest
from api_support import (
    NO_LIMIT,
    _cheap_password_hashing,  # noqa: F401 - autouse fixture
    assert_problem,
    client,
    login,
)

from streamspace.config import Settings
from streamspace.controlplane.directory import Directory, DirectoryUnavailable
from streamspace_testing.ldap import PASSWORDS, SERVICE_PASSWORD


def ldap_cp(make_control_plane: Any, slapd: Any, **settings: Any) -> Any:
    return make_control_plane(**NO_LIMIT, **slapd.settings(**settings))


def post_login(cp: Any, username: str, password: str) -> httpx.Response:
    with client(cp) as anon:
        return anon.post("/api/v1/auth/login", json={"username": username, "password": password})


INJECTIONS = [
    "*",
    "*)(uid=*",
    "alice)(|(uid=*",
    "*)(|(objectClass=*",
    "a*",
    "alice\x00",
    "alice)(uid=bob",
    "\\2a",
]


def test_filter_injection_logs_in_as_nobody(make_control_plane: Any, slapd: Any) -> None:
    cp = ldap_cp(make_control_plane, slapd)
    for username in INJECTIONS:
        for password in (PASSWORDS["alice"], PASSWORDS["bob"]):
            assert_problem(post_login(cp, username, password), 401, "wrong username or password")
    admin = login(cp)
    assert [u["username"] for u in admin.get("/api/v1/users").json()["items"]] == ["admin"]
    assert admin.get("/api/v1/groups").json() == []
    # the same names straight at the directory client: not one entry matches
    directory = Directory(Settings(**slapd.settings()))
    for username in INJECTIONS:
        assert asyncio.run(directory.lookup(username)) is None, username
    assert asyncio.run(directory.lookup("alice")) is not None


def test_an_empty_password_is_never_sent(make_control_plane: Any, slapd: Any) -> None:
    cp = ldap_cp(make_control_plane, slapd)
    assert_problem(post_login(cp, "alice", ""), 422, "password")
    # A bind with a DN and no password is an unauthenticated bind that succeeds on many
    # directories (RFC 4513 5.1.2). The client refuses before it connects at all: with the
    # directory down, an empty password is a plain "no", any other a connection failure.
    directory = Directory(Settings(**slapd.settings()))
    slapd.stop()
    assert asyncio.run(directory.authenticate("alice", "")) is None
    with pytest.raises(DirectoryUnavailable):
        asyncio.run(directory.authenticate("alice", "x"))


def test_starttls_and_ldaps_verify_the_server(
    make_control_plane: Any, slapd: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    starttls = ldap_cp(make_control_plane, slapd)
    assert post_login(starttls, "alice", PASSWORDS["alice"]).status_code == 200
    ldaps = ldap_cp(make_control_plane, slapd, ldap_url=slapd.ldaps_url, ldap_start_tls=False)
    assert post_login(ldaps, "bob", PASSWORDS["bob"]).status_code == 200
    assert "ldap_cleartext" not in caplog.text

    caplog.clear()
    for cp in (
        ldap_cp(make_control_plane, slapd, ldap_ca_file=slapd.other_ca_path),
        ldap_cp(
            make_control_plane,
            slapd,
            ldap_url=slapd.ldaps_url,
            ldap_start_tls=False,
            ldap_ca_file=slapd.other_ca_path,
        ),
    ):
        assert_problem(post_login(cp, "alice", PASSWORDS["alice"]), 503, "directory")
    refusals = [r.getMessage() for r in caplog.records if "directory_unavailable" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert all("CERTIFICATE_VERIFY_FAILED" in m for m in refusals), refusals


def test_plain_ldap_is_logged_as_cleartext(
    make_control_plane: Any, slapd: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cp = ldap_cp(make_control_plane, slapd, ldap_start_tls=False)
    assert post_login(cp, "alice", PASSWORDS["alice"]).status_code == 200
    assert any(
        "ldap_cleartext" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )


def test_the_bind_password_is_never_logged_or_answered(
    make_control_plane: Any, slapd: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cp = ldap_cp(make_control_plane, slapd)
    answers: list[str] = []
    for username, password in (
        ("alice", PASSWORDS["alice"]),
        ("alice", "wrong"),
        ("nobody", "x"),
        ("*)(uid=*", "x"),
    ):
        answers.append(post_login(cp, username, password).text)
    admin = login(cp)
    for path in ("/api/v1/users", "/api/v1/groups", "/api/v1/audit", "/api/v1/auth/me"):
        r = admin.get(path)
        assert r.status_code == 200, r.text
        answers.append(r.text)
    wrong_service = ldap_cp(make_control_plane, slapd, ldap_bind_password="not-the-service-pw")
    answers.append(post_login(wrong_service, "alice", PASSWORDS["alice"]).text)
    slapd.stop()
    answers.append(post_login(cp, "alice", PASSWORDS["alice"]).text)

    assert "the service account's bind was refused" in caplog.text  # the logs did run
    for secret in (SERVICE_PASSWORD, "not-the-service-pw", PASSWORDS["alice"]):
        assert secret not in caplog.text
        assert all(secret not in a for a in answers)
        assert secret not in repr(cp.settings)


@pytest.mark.slow
def test_a_directory_name_costs_the_same_as_an_unknown_one(
    make_control_plane: Any, slapd: Any
) -> None:
    """A wrong password for a directory user and any password for a name nobody has both take
    a service bind, a search and a user bind (of an absent DN for the unknown name)."""
    cp = ldap_cp(make_control_plane, slapd)
    rounds, wrong, unknown = 30, [], []
    with client(cp) as c:

        def timed(username: str) -> float:
            started = time.perf_counter()
            r = c.post("/api/v1/auth/login", json={"username": username, "password": "nope-1"})
            assert r.status_code == 401, r.text
            return time.perf_counter() - started

        for i in range(5):
            timed("alice")
            timed(f"warmup-ghost-{i}")
        for i in range(rounds):
            wrong.append(timed("alice"))
            unknown.append(timed(f"ghost-{i}"))
    m_wrong, m_unknown = statistics.median(wrong), statistics.median(unknown)
    print(
        f"\ndirectory login medians over {rounds} rounds: wrong password "
        f"{m_wrong * 1000:.1f} ms, unknown name {m_unknown * 1000:.1f} ms"
    )
    assert abs(m_unknown - m_wrong) <= 0.25 * m_wrong, (m_unknown, m_wrong)
