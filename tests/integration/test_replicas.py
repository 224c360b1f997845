"""Several control-plane replicas over PostgreSQL + Redis, with real failures.

Everything is a real process (see replicas_support.py): two `streamspace server` replicas, a
private redis-server, a TCP proxy in front of PostgreSQL (to cut the database off), nginx
rendered from deploy/replicas/nginx.conf.template, and a `streamspace agent` running real Xvnc +
xterm sessions. Streams are checked end to end: browser WebSocket -> replica -> agent dial-back
WebSocket -> Xvnc, with a non-blank RFB framebuffer as the proof.

Tests share one cluster (module scope); each starts by healing it (restarting whatever the
previous test killed) and stops its sessions when done. Tests 1-7 are the replica scenarios
(cross-replica lifecycle + SSE, SIGKILL mid-stream, Redis restart, PostgreSQL outage, full
restart, loop leadership, idempotent create); 8 and 9 guard startup and shutdown (replicas
started together on a fresh database, SIGTERM with an open event stream).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg2
import pytest
from replicas_support import (
    NGINX_MISSING,
    NOWHERE,
    PROBLEM_JSON,
    REDIS_MISSING,
    SMALL_TEMPLATE,
    Cluster,
    DbStatePoller,
    Nginx,
    RedisServer,
    Replica,
    SSEReader,
    TcpProxy,
    count_lines,
    dump_logs_on_failure,
    open_viewer,
    started_command_ids,
    tail,
    wait_dropped,
    wait_state_on,
)

from conftest import (
    PG_ADMIN_URL,
    PG_UNAVAILABLE,
    XVNC_MISSING,
    drop_pg_database,
    make_pg_database,
    require,
    wait_for,
)

pytestmark = pytest.mark.postgres


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require(PG_UNAVAILABLE)
    require(REDIS_MISSING)
    root = tmp_path_factory.mktemp("replicas")
    pg_name, pg_dsn = make_pg_database()
    pg = urlsplit(PG_ADMIN_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432).start()
    redis = RedisServer(root)
    secret = "replicas-secret-" + uuid.uuid4().hex
    env = Cluster.replica_env(secret)
    db_url = f"postgresql://127.0.0.1:{proxy.port}/{pg_name}"
    replicas = [
        Replica(root, rid, env, ["--database-url", db_url, "--redis-url", redis.url])
        for rid in ("replica-a", "replica-b")
    ]
    cl = Cluster(root, pg_name, pg_dsn, proxy, redis, replicas, secret)
    try:
        redis.start()
        # One after the other: see test_simultaneous_cold_start for starting both at once.
        for r in replicas:
            r.start()
        cl.bootstrap()
        if NGINX_MISSING is None:
            cl.nginx = Nginx(root, replicas).start()
        yield cl
    finally:
        errors = cl.shutdown()
        drop_pg_database(pg_name)
        if errors:
            print(cl.log_tails())
            pytest.fail("cluster teardown: " + "; ".join(errors))


@pytest.fixture(autouse=True)
def healed(cluster: Cluster) -> Iterator[None]:
    """Every test starts with every process up; sessions a test left are stopped after it."""
    cluster.heal()
    yield
    cluster.heal()
    problems = cluster.stop_all_sessions()
    assert not problems, problems


# ---- helpers ------------------------------------------------------------------------------------


def pending_session(c: httpx.Client, **headers: str) -> httpx.Response:
    """A session no agent can take (stays `pending`, starts no process)."""
    return c.post(
        "/api/v1/sessions",
        json={"template": SMALL_TEMPLATE["name"], "cluster_id": NOWHERE},
        headers=headers,
    )


def assert_problem(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert r.headers.get("content-type", "").startswith(PROBLEM_JSON), (
        f"{r.status_code} without problem JSON: {r.headers.get('content-type')} {r.text[:300]}"
    )
    body: dict[str, Any] = r.json()
    assert body.get("status") == r.status_code and body.get("detail"), body
    if status is not None:
        assert r.status_code == status, body
    return body


async def stream_nonblank(base_port: int, c: httpx.Client, session_id: str) -> None:
    """A new ticket from `c`, then a WebSocket on `base_port` showing a non-blank frame."""
    r = await asyncio.to_thread(c.post, f"/api/v1/sessions/{session_id}/connect")
    assert r.status_code == 200, r.text
    rfb = await open_viewer(base_port, r.json()["ws_path"], r.json()["ticket"])
    await rfb.close()


# ---- 1. agent on A, user on B -------------------------------------------------------------------


@pytest.mark.xvnc
@dump_logs_on_failure()
async def test_agent_on_a_user_on_b_lifecycle_stream_and_live_events(cluster: Cluster) -> None:
    """The user only talks to replica B while the agent is held by replica A: placement,
    commands (create/hibernate/wake/stop), the stream tunnel (B asks the agent via A to dial
    back to B) and live SSE events (results handled on A reach B's subscribers via Redis)."""
    require(XVNC_MISSING)
    c = cluster
    await asyncio.to_thread(c.ensure_agent, c.a.url, c.a.id)
    b = c.client(c.b.url)
    sse = SSEReader(c.b.url + "/api/v1/events", c.user_token)
    sse.start()
    try:
        assert sse.ready.wait(10) and sse.status == 200, (sse.status, sse.error)

        sid = await asyncio.to_thread(c.create_running, b)
        await stream_nonblank(c.b.port, b, sid)
        # Frames for the agent are published on its channel: only A, its holder, listens.
        assert c.agent_listeners() == 1

        r = b.post(f"/api/v1/sessions/{sid}/hibernate")
        assert r.status_code == 202, r.text
        await asyncio.to_thread(wait_state_on, b, sid, "hibernated", 60)
        r = b.post(f"/api/v1/sessions/{sid}/wake")
        assert r.status_code == 202, r.text
        await asyncio.to_thread(wait_state_on, b, sid, "running", 60)
        await stream_nonblank(c.b.port, b, sid)
        r = b.delete(f"/api/v1/sessions/{sid}")
        assert r.status_code == 202, r.text
        await asyncio.to_thread(wait_state_on, b, sid, "stopped", 60)

        # hibernate, wake and stop were asked of B and reached the agent through A's Redis
        # channel; A timed each hop.
        metrics = httpx.get(c.a.url + "/metrics", timeout=10).text
        forwarded = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("streamspace_router_forward_seconds_count")
        ]
        assert forwarded and forwarded[0] >= 3, forwarded

        # running / hibernated / stopped are decided by A (it receives the agent's results):
        # B's subscriber sees them only if the Redis fan-out works.
        a_log, b_log = c.a.log(), c.b.log()
        for kind in ("running", "hibernated", "stopped"):
            assert count_lines(a_log, "session_event", f"session_id={sid}", f"kind={kind}"), kind
            assert not count_lines(b_log, "session_event", f"session_id={sid}", f"kind={kind}")
        wanted = ["running", "hibernated", "running", "stopped"]

        def arrived() -> bool:
            states = [s for s in sse.session_states(sid) if s in wanted]
            return states == wanted

        await asyncio.to_thread(wait_for, arrived, 10, 0.1, "A's transitions on B's event stream")
        # B's own transitions are delivered locally too.
        assert {"hibernating", "waking", "stopping"} <= set(sse.session_states(sid))

        # A state change requested through A's API (pending -> stopped) reaches B's stream.
        r = pending_session(b)
        assert r.status_code == 201, r.text
        other = r.json()["id"]
        r = c.client(c.a.url).delete(f"/api/v1/sessions/{other}")
        assert r.status_code == 202, r.text
        await asyncio.to_thread(
            wait_for,
            lambda: "stopped" in sse.session_states(other),
            10,
            0.1,
            "a stop made through A on B's event stream",
        )
        assert sse.error is None, repr(sse.error)
    finally:
        sse.close()


# ---- 2. SIGKILL of a replica mid-stream ---------------------------------------------------------


@pytest.mark.xvnc
@dump_logs_on_failure()
async def test_sigkill_replica_holding_agent_and_viewer(cluster: Cluster) -> None:
    """Kill -9 the replica that holds both the agent and a live viewer (everything through
    nginx): that viewer drops while one pumped by the survivor keeps streaming, the agent
    reconnects to the survivor, a hibernate sent while the agent is away is delivered once, wake
    works, a new ticket streams again, and the session is never `failed`."""
    require(XVNC_MISSING)
    require(NGINX_MISSING)
    c = cluster
    assert c.nginx is not None
    await asyncio.to_thread(c.ensure_agent, c.nginx.url)
    holder = c.replica(c.agent_holder())
    survivor = c.other(holder)
    lb = c.client(c.nginx.url)
    sid = await asyncio.to_thread(c.create_running, lb)

    # Viewers through nginx until one is pumped by the replica holding the agent (`rfb`, it
    # must drop) and one by the survivor (`side`, which must not care about the kill).
    rfb = side = None
    for _ in range(12):
        r = await asyncio.to_thread(lb.post, f"/api/v1/sessions/{sid}/connect")
        assert r.status_code == 200, r.text
        before = {rep.id: rep.metric("streamspace_streams_active") or 0 for rep in c.replicas}
        viewer = await open_viewer(c.nginx.port, r.json()["ws_path"], r.json()["ticket"])
        if rfb is None and (holder.metric("streamspace_streams_active") or 0) > before[holder.id]:
            rfb = viewer
        elif (
            side is None
            and (survivor.metric("streamspace_streams_active") or 0) > before[survivor.id]
        ):
            side = viewer
        else:
            await viewer.close()
            # nginx alternates upstreams per request (connect, upgrade, connect, ...): one
            # extra request shifts which replica the next upgrade lands on.
            await asyncio.to_thread(lb.get, "/healthz")
        if rfb is not None and side is not None:
            break
    assert rfb is not None and side is not None, "nginx never spread the viewers over both"

    poller = DbStatePoller(c.pg_dsn, [sid])
    poller.start()
    log_before = len(c.agent_log())
    connects_before = count_lines(c.agent_log(), "event=connected ")
    try:
        holder.kill()
        dropped_after = await wait_dropped(rfb, 15)
        assert dropped_after < 10
        # The survivor's viewer is fed by the agent's own dial-back socket to the survivor.
        await side.request_update(False, timeout=10)
        assert side.framebuffer_nonblank()

        # Sent while the agent is away (or just reconnecting): nobody listens on the agent's
        # channel (the dead replica's subscription died with it), so the command must wait in
        # the database, not vanish, and be sent once the agent is back.
        r = await asyncio.to_thread(lb.post, f"/api/v1/sessions/{sid}/hibernate")
        assert r.status_code == 202, r.text

        def reconnected() -> bool:
            return (
                count_lines(c.agent_log(), "event=connected ") > connects_before
                and c.agent_holder() == survivor.id
            )

        await asyncio.to_thread(wait_for, reconnected, 30, 0.2, f"agent on {survivor.id}")
        assert c.agent_listeners() == 1
        new_log = c.agent_log()[log_before:]
        assert "event=disconnected" in new_log and "event=reconnecting" in new_log, new_log
        agents = c.admin(c.nginx.url).get("/api/v1/agents")
        assert agents.status_code == 200, agents.text
        mine = [a for a in agents.json() if a["id"] == c.agent_id]
        assert mine and mine[0]["status"] == "online", mine

        await asyncio.to_thread(wait_state_on, lb, sid, "hibernated", 60)
        r = await asyncio.to_thread(lb.post, f"/api/v1/sessions/{sid}/wake")
        assert r.status_code == 202, r.text
        await asyncio.to_thread(wait_state_on, lb, sid, "running", 60)
        await stream_nonblank(c.nginx.port, lb, sid)
    finally:
        for v in (rfb, side):
            with contextlib.suppress(Exception):
                await v.close()
        seen = poller.stop()

    assert "failed" not in seen[sid], seen
    cmds = c.commands(sid)
    assert [cmd[1] for cmd in cmds] == ["start", "hibernate", "wake"], cmds
    assert all(cmd[2] == "succeeded" for cmd in cmds), cmds
    started = started_command_ids(c.agent_log())
    for cmd_id, action, _, _ in cmds:
        assert started.count(cmd_id) == 1, f"{action} {cmd_id} started {started.count(cmd_id)}x"


# ---- 3. Redis restart ---------------------------------------------------------------------------


@pytest.mark.xvnc
@dump_logs_on_failure()
async def test_redis_restart(cluster: Cluster) -> None:
    """Redis down: the API that needs only PostgreSQL keeps working and connect answers at once
    (a ticket or a clear problem). Redis back on the same port: both replicas re-subscribe by
    themselves and cross-replica placement + streaming work again within ~10 s."""
    require(XVNC_MISSING)
    c = cluster
    await asyncio.to_thread(c.ensure_agent, c.a.url, c.a.id)
    b = c.client(c.b.url, timeout=30)
    sid = await asyncio.to_thread(c.create_running, b)
    subscribed = {r.id: count_lines(r.log(), "router_subscribed") for r in c.replicas}

    unclear = ""
    c.redis.stop()
    try:
        started = time.monotonic()
        r = b.get("/api/v1/sessions")
        assert r.status_code == 200, r.text
        assert sid in [s["id"] for s in r.json()["items"]]
        assert time.monotonic() - started < 5
        assert b.get(f"/api/v1/sessions/{sid}").status_code == 200

        started = time.monotonic()
        r = b.post(f"/api/v1/sessions/{sid}/connect")
        took = time.monotonic() - started
        assert took < 10, f"connect hung for {took:.1f} s with Redis down"
        if r.status_code != 200:
            body = assert_problem(r)
            assert 400 <= r.status_code < 600
            if r.status_code == 500:  # checked last, so the recovery below still runs
                unclear = (
                    f"connect with Redis down answered a generic 500 ({body['detail']!r}, "
                    f"type {body['type']}) instead of a clear 503 naming the ticket store"
                )
    finally:
        c.redis.start()
    restarted = time.monotonic()

    def resubscribed() -> bool:
        return all(count_lines(r.log(), "router_subscribed") > subscribed[r.id] for r in c.replicas)

    await asyncio.to_thread(wait_for, resubscribed, 10, 0.1, "both replicas to re-subscribe")
    # A re-subscribed to the channel of the agent it still holds (the new Redis knew nothing).
    assert c.agent_holder() == c.a.id
    assert c.agent_listeners() == 1
    # Cross-replica again: created via B, started by the agent held by A, streamed via B.
    sid2 = await asyncio.to_thread(c.create_running, b, 30)
    await stream_nonblank(c.b.port, b, sid2)
    await stream_nonblank(c.b.port, b, sid)
    # A command asked of B reaches the agent through A's renewed subscription.
    r = b.delete(f"/api/v1/sessions/{sid}")
    assert r.status_code == 202, r.text
    await asyncio.to_thread(wait_state_on, b, sid, "stopped", 30)
    assert time.monotonic() - restarted < 40
    assert not unclear, unclear


# ---- 4. PostgreSQL outage -----------------------------------------------------------------------


@dump_logs_on_failure()
def test_postgres_outage_answers_503_and_recovers(cluster: Cluster) -> None:
    """Cut PostgreSQL off for 10 s (refuse + reset connections): requests needing it answer a
    503 problem naming the database within seconds, /healthz stays 200, /readyz is 503; once it
    is back the replicas recover by themselves and every acknowledged create survived."""
    c = cluster
    users = {r.id: c.client(r.url, timeout=15) for r in c.replicas}
    acked: list[str] = []
    for i in range(4):
        r = pending_session(users[c.replicas[i % 2].id])
        assert r.status_code == 201, r.text
        acked.append(r.json()["id"])

    # Keep creating through the start of the outage: every 201 must be durable.
    stop = threading.Event()
    statuses: list[int] = []

    def creator() -> None:
        with httpx.Client(
            base_url=c.a.url,
            headers={"Authorization": f"Bearer {c.user_token}"},
            timeout=15,
        ) as cl:
            while not stop.is_set():
                try:
                    r = pending_session(cl)
                except httpx.HTTPError:
                    statuses.append(-1)
                    continue
                statuses.append(r.status_code)
                if r.status_code == 201:
                    acked.append(r.json()["id"])
                stop.wait(0.05)

    worker = threading.Thread(target=creator, daemon=True)
    worker.start()
    time.sleep(0.5)
    unclear: list[str] = []
    c.proxy.down()
    down_at = time.monotonic()
    try:
        checked = 0
        while time.monotonic() - down_at < 10 or checked < 2:
            for rep in c.replicas:
                started = time.monotonic()
                r = users[rep.id].get("/api/v1/sessions")
                took = time.monotonic() - started
                assert took < 10, f"{rep.id}: GET /api/v1/sessions hung {took:.1f} s"
                body = assert_problem(r, 503)
                if "database" not in body["detail"].lower():  # checked last: recovery still runs
                    unclear.append(f"{rep.id}: {body['type']}: {body['detail']!r}")
                assert took < 5, f"{rep.id}: the 503 took {took:.1f} s"
                assert httpx.get(rep.url + "/healthz", timeout=5).status_code == 200
                ready = httpx.get(rep.url + "/readyz", timeout=10)
                assert ready.status_code == 503, ready.text
            checked += 1
            time.sleep(0.5)
    finally:
        c.proxy.up()
        restored_at = time.monotonic()
    stop.set()
    worker.join(20)

    def recovered() -> bool:
        return all(u.get("/api/v1/sessions").status_code == 200 for u in users.values()) and all(
            httpx.get(r.url + "/readyz", timeout=5).status_code == 200 for r in c.replicas
        )

    wait_for(recovered, 10, 0.2, "the API to recover without restarts")
    print(f"recovered {time.monotonic() - restored_at:.1f} s after the database came back")
    assert all(r.alive for r in c.replicas)
    assert 503 in statuses, statuses  # the creator did run into the outage
    for sid in acked:
        r = users[c.b.id].get(f"/api/v1/sessions/{sid}")
        assert r.status_code == 200, f"acknowledged session {sid} is gone: {r.text}"
    found = {row[0] for row in c.sql("SELECT id FROM sessions WHERE id = ANY(%s)", (acked,))}
    assert found == set(acked)
    # The replicas can write again too.
    r = pending_session(users[c.a.id])
    assert r.status_code == 201, r.text
    admin = c.admin(c.a.url)
    for sid in [*acked, r.json()["id"]]:
        assert admin.delete(f"/api/v1/sessions/{sid}").status_code == 202
    assert not unclear, (
        "the 503s during the database outage do not say the database is unreachable: "
        + "; ".join(sorted(set(unclear)))
    )


# ---- 5. whole control plane restart -------------------------------------------------------------


@pytest.mark.xvnc
@dump_logs_on_failure()
async def test_full_control_plane_restart_keeps_sessions(cluster: Cluster) -> None:
    """SIGTERM every replica, start them again on the same database and Redis: the agent
    reconnects by itself and every running session is still running and streamable."""
    require(XVNC_MISSING)
    require(NGINX_MISSING)
    c = cluster
    assert c.nginx is not None
    await asyncio.to_thread(c.ensure_agent, c.nginx.url)
    lb = c.client(c.nginx.url)
    sids = [await asyncio.to_thread(c.create_running, lb) for _ in range(2)]
    poller = DbStatePoller(c.pg_dsn, sids)
    poller.start()
    connects_before = count_lines(c.agent_log(), "event=connected ")
    try:
        with concurrent.futures.ThreadPoolExecutor(len(c.replicas)) as pool:
            took = list(pool.map(lambda r: r.terminate(20), c.replicas))
        print(f"SIGTERM -> exit: {took}")
        for r in c.replicas:
            r.spawn()
        for r in c.replicas:
            await asyncio.to_thread(r.wait_ready)

        def back() -> bool:
            return (
                count_lines(c.agent_log(), "event=connected ") > connects_before
                and c.replica(c.agent_holder()).alive
            )

        await asyncio.to_thread(wait_for, back, 30, 0.2, "the agent to reconnect by itself")
        for sid in sids:
            body = await asyncio.to_thread(wait_state_on, lb, sid, "running", 5)
            assert body["state"] == "running"
            await stream_nonblank(c.nginx.port, lb, sid)
    finally:
        seen = poller.stop()
    for sid in sids:
        assert seen[sid] == ["running"], f"{sid} went through {seen[sid]}"


# ---- 6. loop leadership -------------------------------------------------------------------------


@dump_logs_on_failure()
def test_exactly_one_loop_leader_and_failover(cluster: Cluster) -> None:
    """streamspace_loop_leader is 1 on exactly one replica; SIGKILL it and the other takes the
    lease within ~25 s (and runs the loops); the killed one comes back as a follower."""
    c = cluster

    def one_leader() -> dict[str, float | None] | None:
        values = c.leaders()
        return values if sorted(v or 0 for v in values.values()) == [0, 1] else None

    values = wait_for(one_leader, 20, 0.2, "exactly one leader")
    leader = c.replica(next(k for k, v in values.items() if v == 1))
    follower = c.other(leader)
    taken_before = count_lines(
        follower.log(), "loop_leadership", f"replica={follower.id}", "leader=true"
    )
    expire = 'streamspace_loop_runs_total{loop="expire"}'
    idle = follower.metric(expire)
    time.sleep(1.5)  # three loop intervals
    assert follower.metric(expire) == idle, "a follower runs the cluster-wide expire loop"

    leader.kill()
    killed_at = time.monotonic()
    wait_for(lambda: follower.metric("streamspace_loop_leader") == 1, 25, 0.2, "a new leader")
    print(f"{follower.id} took over {time.monotonic() - killed_at:.1f} s after the kill")
    assert (
        count_lines(follower.log(), "loop_leadership", f"replica={follower.id}", "leader=true")
        > taken_before
    )
    runs = follower.metric(expire) or 0
    wait_for(lambda: (follower.metric(expire) or 0) > runs, 5, 0.2, "the new leader's loops")

    leader.start()
    time.sleep(1.5)
    for _ in range(3):
        assert c.leaders() == {leader.id: 0, follower.id: 1}
        time.sleep(0.5)


# ---- 7. idempotent creation across replicas -----------------------------------------------------


@dump_logs_on_failure()
def test_idempotency_key_across_replicas(cluster: Cluster) -> None:
    """One Idempotency-Key, many replicas: sequential retries return the first session;
    concurrent ones never create a second (a loser may answer 409, and its retry then returns
    the winner)."""
    c = cluster
    a, b = c.client(c.a.url), c.client(c.b.url)
    created: list[str] = []
    try:
        key = "idem-" + uuid.uuid4().hex
        first = pending_session(a, **{"Idempotency-Key": key})
        assert first.status_code == 201, first.text
        sid = first.json()["id"]
        created.append(sid)
        again = pending_session(b, **{"Idempotency-Key": key})
        assert again.status_code == 200, again.text
        assert again.json()["id"] == sid
        assert pending_session(a, **{"Idempotency-Key": key}).json()["id"] == sid

        for _ in range(5):
            key = "idem-" + uuid.uuid4().hex
            barrier = threading.Barrier(4)

            def send(client: httpx.Client, key: str = key, barrier: Any = barrier) -> Any:
                barrier.wait(5)
                return pending_session(client, **{"Idempotency-Key": key})

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(send, [a, b, a, b]))
            print("concurrent creates with one key answered", [r.status_code for r in answers])
            ids = set()
            for r in answers:
                if r.status_code == 409:
                    assert_problem(r, 409)
                    retry = pending_session(a, **{"Idempotency-Key": key})
                    assert retry.status_code == 200, retry.text
                    ids.add(retry.json()["id"])
                else:
                    assert r.status_code in (200, 201), r.text
                    ids.add(r.json()["id"])
            assert len(ids) == 1, f"one Idempotency-Key created {ids}"
            assert sum(r.status_code == 201 for r in answers) <= 1
            created += list(ids)
            rows = c.sql("SELECT id FROM sessions WHERE idempotency_key = %s", (key,))
            assert [row[0] for row in rows] == list(ids)
    finally:
        admin = c.admin(c.a.url)
        for sid in created:
            admin.delete(f"/api/v1/sessions/{sid}")


# ---- 8. replicas started together on a fresh database (what deploy/replicas/run.sh does) --------


@dump_logs_on_failure()
def test_simultaneous_cold_start_on_a_fresh_database(cluster: Cluster) -> None:
    """run.sh starts every replica at once; on an empty database they all migrate and bootstrap
    concurrently. Every replica must come up, with one admin and one row per template.

    The replicas reach PostgreSQL through a proxy that holds their first connections until all
    of them connected, so their startups overlap for real instead of by luck."""
    name, dsn = make_pg_database()
    pg = urlsplit(PG_ADMIN_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432).start()
    proxy.gate(2)
    env = Cluster.replica_env("cold-secret-" + uuid.uuid4().hex)
    db_url = f"postgresql://127.0.0.1:{proxy.port}/{name}"
    cold = [
        Replica(
            cluster.root,
            f"cold-{i}",
            env,
            ["--database-url", db_url, "--redis-url", cluster.redis.url],
        )
        for i in (1, 2)
    ]
    try:
        for r in cold:
            r.spawn()
        failed = []
        for r in cold:
            try:
                r.wait_ready(60)
            except AssertionError:
                why = [ln for ln in r.log().splitlines() if "duplicate key" in ln or "Error:" in ln]
                failed.append(f"{r.id} crashed at startup: {why[-1][:240] if why else '?'}")
        assert not failed, failed
        with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM users WHERE username = 'admin'")
            assert cur.fetchone() == (1,)
            cur.execute("SELECT name, count(*) FROM templates GROUP BY name HAVING count(*) > 1")
            assert cur.fetchall() == []
    finally:
        for r in cold:
            r.kill()
        proxy.close()
        drop_pg_database(name)


# ---- 9. an admin action for an agent held by the other replica ----------------------------------


@pytest.mark.xvnc
@dump_logs_on_failure()
def test_revoke_through_the_other_replica_disconnects_the_agent(cluster: Cluster) -> None:
    """The admin revokes the agent through B while A holds its socket: the disconnect crosses
    on the agent's Redis channel, A closes the socket with `revoked` (the agent stops for
    good instead of reconnecting), and nobody listens on the agent's channel any more."""
    require(XVNC_MISSING)
    c = cluster
    c.ensure_agent(c.a.url, c.a.id)
    assert c.agent_listeners() == 1
    try:
        r = c.admin(c.b.url).post(f"/api/v1/agents/{c.agent_id}/revoke")
        assert r.status_code == 200, r.text
        # Without the crossing the socket on A stays open and the agent never notices.
        wait_for(lambda: not c.agent_alive, 15, 0.1, "the revoked agent to stop")
        assert "revoked" in c.agent_log(), tail(c.agent_log_path)
        wait_for(lambda: c.agent_listeners() == 0, 10, 0.1, "A to stop listening for it")
    finally:
        if c.agent is not None:
            c.agent.terminate()
        # A later test enrols a fresh agent.
        (c.root / "agent" / "agent.json").unlink(missing_ok=True)


# ---- 10. graceful stop with a browser's event stream open ---------------------------------------


@dump_logs_on_failure()
def test_sigterm_with_an_open_event_stream_exits_promptly(cluster: Cluster) -> None:
    """Every open UI holds GET /api/v1/events; a replica asked to stop (SIGTERM, as systemd,
    Kubernetes or a rolling restart do) must still exit within seconds and end that stream."""
    c = cluster
    sse = SSEReader(c.b.url + "/api/v1/events", c.user_token)
    sse.start()
    try:
        assert sse.ready.wait(10) and sse.status == 200, (sse.status, sse.error)
        took = c.b.terminate(10)
        print(f"{c.b.id} exited {took:.1f} s after SIGTERM")
    finally:
        sse.close()
