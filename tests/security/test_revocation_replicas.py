"""Revocation reaches open connections on every replica (issue 12, part 4).

A real two-replica deployment (tests/integration/replicas_support.py: PostgreSQL, a private
redis-server, two `streamspace server` processes, one `streamspace agent` with real Xvnc): the
user's viewer and event stream are held by replica A, an admin acts through replica B, and A must
close both within 2 s and stop accepting the user's token at once, although A's auth cache would
keep the user for 30 s and A's database recheck runs once an hour here. Only the revocation
travelling through Redis can do that.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from replicas_support import (
    REDIS_MISSING,
    Cluster,
    RedisServer,
    Replica,
    TcpProxy,
    dump_logs_on_failure,
    wait_state_on,
)
from revocation_support import (
    LIMIT,
    assert_signed_out,
    closed_within,
    events_ended_within,
    open_events,
    open_viewer,
)

from conftest import (
    PG_ADMIN_URL,
    PG_UNAVAILABLE,
    XVNC_MISSING,
    drop_pg_database,
    make_pg_database,
    require,
)

pytestmark = [pytest.mark.postgres, pytest.mark.xvnc]

PASSWORD = "replica-user-pass-1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require(PG_UNAVAILABLE)
    require(REDIS_MISSING)
    require(XVNC_MISSING)
    root = tmp_path_factory.mktemp("revocation-replicas")
    pg_name, pg_dsn = make_pg_database()
    pg = urlsplit(PG_ADMIN_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432).start()
    redis = RedisServer(root)
    secret = "revocation-secret-" + uuid.uuid4().hex
    env = Cluster.replica_env(
        secret,
        STREAMSPACE_AUTH_CACHE_SECONDS="30",
        STREAMSPACE_CONNECTION_RECHECK_SECONDS="3600",
    )
    db_url = f"postgresql://127.0.0.1:{proxy.port}/{pg_name}"
    replicas = [
        Replica(root, rid, env, ["--database-url", db_url, "--redis-url", redis.url])
        for rid in ("replica-a", "replica-b")
    ]
    cl = Cluster(root, pg_name, pg_dsn, proxy, redis, replicas, secret)
    try:
        redis.start()
        for r in replicas:
            r.start()
        cl.bootstrap()
        cl.ensure_agent(cl.a.url, cl.a.id)
        yield cl
    finally:
        errors = cl.shutdown()
        drop_pg_database(pg_name)
        if errors:
            print(cl.log_tails())
            pytest.fail("cluster teardown: " + "; ".join(errors))


def new_user(c: Cluster, name: str) -> tuple[str, str]:
    """(user id, access token) of a fresh user with a roomy quota, created through B."""
    admin = c.admin(c.b.url)
    r = admin.post("/api/v1/users", json={"username": name, "password": PASSWORD})
    assert r.status_code == 201, r.text
    return str(r.json()["id"]), c.login(c.a.url, name, PASSWORD)


@pytest.mark.parametrize("trigger", ["disable", "sign-out"])
@dump_logs_on_failure()
async def test_a_user_revoked_through_b_is_cut_off_on_a_within_2_s(
    cluster: Cluster, trigger: str
) -> None:
    c = cluster
    user_id, token = new_user(c, f"carol-{trigger}")
    a = c.client(c.a.url, token)
    sid = await asyncio.to_thread(c.create_running, a)
    ticket, ws_path = c.connect_ticket(a, sid)
    viewer = await open_viewer(c.a.url, ws_path, ticket)
    sse = open_events(c.a.url, token)
    try:
        assert a.get("/api/v1/auth/me").status_code == 200  # A now caches the user for 30 s
        admin_b = c.admin(c.b.url)
        started = time.monotonic()
        if trigger == "disable":
            r = await asyncio.to_thread(
                admin_b.patch, f"/api/v1/users/{user_id}", json={"is_active": False}
            )
            assert r.status_code == 200, r.text
        else:
            r = await asyncio.to_thread(admin_b.post, f"/api/v1/users/{user_id}/sign-out")
            assert r.status_code == 204, r.text

        viewer_s = await closed_within(viewer, started)
        events_s = await events_ended_within(sse, started)
        assert_signed_out(viewer)
        # A's auth cache let the revoked user go at once, not after its 30 s.
        me = await asyncio.to_thread(a.get, "/api/v1/auth/me")
        assert me.status_code == 401, me.text
        assert time.monotonic() - started <= LIMIT
        print(f"{trigger} via B: A closed the viewer in {viewer_s:.3f} s, events {events_s:.3f} s")
        assert "connections_revoked" in c.a.log()

        if trigger == "disable":
            body = await asyncio.to_thread(wait_state_on, admin_b, sid, "hibernated", 60)
            assert any(
                e["kind"] == "hibernating" and "account was disabled by admin" in e["message"]
                for e in body["events"] or []
            ), body["events"]
    finally:
        await viewer.rfb.close()
        sse.close()
        with httpx.Client(base_url=c.b.url, timeout=20) as anon:
            anon.headers["Authorization"] = f"Bearer {c.admin_token}"
            anon.delete(f"/api/v1/sessions/{sid}")
