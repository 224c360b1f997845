"""1,000 simulated agents over real WebSockets, then 10,000 placements.

Usage: python benchmarks/scheduler.py [--agents 1000] [--sessions 10000] [--procs 2]
                                      [--pg postgresql://127.0.0.1:5432/test] [--idle 30]

The agents speak the real protocol (streamspace.protocol) from `--procs` client processes: hello,
heartbeats every 10 s, ack + result for every command. Prints the control plane's CPU use while
holding the idle agents, then placements/s for sessions inserted as pending in one go (placement,
command dispatch, agent results, state updates: everything up to `running`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import time
import uuid
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as EventType
from typing import Any

import httpx

from benchmarks.common import describe_machine, login, product
from streamspace import protocol


async def _agent_once(
    url: str,
    credential: str,
    agent_id: str,
    cluster: str,
    ready: list[int],
    stop: asyncio.Event,
    heartbeat: float,
    slots: int,
) -> None:
    from websockets.asyncio.client import connect

    ws_url = url.replace("http://", "ws://") + protocol.AGENT_CONNECT_PATH
    async with connect(
        ws_url,
        additional_headers={"Authorization": f"Bearer {credential}"},
        max_size=None,
        compression=None,
        open_timeout=60,
    ) as ws:
        await ws.send(
            protocol.encode(
                protocol.Hello(
                    protocol_version=protocol.PROTOCOL_VERSION,
                    agent_id=agent_id,
                    cluster_id=cluster,
                    cluster_name=cluster,
                    backend="local",
                    capacity=protocol.Capacity(
                        max_sessions=slots, cpu_millis=640000, memory_mb=2621440
                    ),
                    templates=["xterm"],
                    isolation=protocol.Isolation(mode="uid-sandbox", detail="simulated"),
                )
            )
        )
        welcome = protocol.parse_server_message(await ws.recv())
        assert isinstance(welcome, protocol.Welcome), welcome
        ready[0] += 1
        running = 0
        port = 20000

        async def beat() -> None:
            await asyncio.sleep(heartbeat * (hash(agent_id) % 1000) / 1000)
            while True:
                await ws.send(
                    protocol.encode(
                        protocol.Heartbeat(
                            load=protocol.Load(sessions=running, cpu_millis=0, memory_mb=0)
                        )
                    )
                )
                await asyncio.sleep(heartbeat)

        beater = asyncio.create_task(beat())
        try:
            async for raw in ws:
                msg = protocol.parse_server_message(raw)
                if isinstance(msg, protocol.Command):
                    await ws.send(protocol.encode(protocol.Ack(command_id=msg.command_id)))
                    running += 1 if msg.action == "start" else 0
                    port += 1
                    endpoint = (
                        protocol.Endpoint(port=port) if msg.action in ("start", "wake") else None
                    )
                    await ws.send(
                        protocol.encode(
                            protocol.Result(command_id=msg.command_id, ok=True, endpoint=endpoint)
                        )
                    )
                if stop.is_set():
                    break
        finally:
            beater.cancel()


async def _agent(*args: Any) -> None:
    """Like a real agent: retry the connection with backoff when the server is busy."""
    from websockets.exceptions import InvalidStatus

    delay = 0.5
    for _ in range(20):
        try:
            await _agent_once(*args)
            return
        except (InvalidStatus, OSError):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)


def _client_process(
    url: str,
    creds: list[tuple[str, str, str]],
    heartbeat: float,
    slots: int,
    ready_q: mp.Queue[int],
    stop_ev: EventType,
) -> None:
    async def main() -> None:
        ready = [0]
        stop = asyncio.Event()
        tasks = []
        for i, (agent_id, credential, cluster) in enumerate(creds):
            tasks.append(
                asyncio.create_task(
                    _agent(url, credential, agent_id, cluster, ready, stop, heartbeat, slots)
                )
            )
            if i % 50 == 49:
                await asyncio.sleep(0.2)
        while ready[0] < len(creds):
            failed = [t for t in tasks if t.done()]
            if failed:
                errors = {repr(t.exception())[:200] for t in failed if t.exception()}
                print(f"{len(failed)} simulated agents ended early: {sorted(errors)[:3]}")
                break
            await asyncio.sleep(0.2)
        ready_q.put(ready[0])
        while not stop_ev.is_set():
            await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(port: int) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"streamspace.cli" in cmd and str(port).encode() in cmd:
            return int(pid)
    raise RuntimeError("server process not found")


async def insert_pending(db_url: str, owner_id: str, count: int) -> None:
    from sqlalchemy import insert

    from streamspace.db.engine import create_engine
    from streamspace.db.models import Session as SessionRow

    engine = create_engine(db_url)
    now = datetime.now(UTC)
    rows = [
        {
            "id": uuid.uuid4().hex,
            "owner_id": owner_id,
            "template_name": "xterm",
            "state": "pending",
            "tags": [],
            "cpu_millis": 100,
            "memory_mb": 64,
            "persistent_home": True,
            "idle_timeout_seconds": 86400,
            "max_duration_seconds": 86400,
            "failure_reason": "",
            "status_message": "",
            "created_at": now,
            "updated_at": now,
            "state_changed_at": now,
            "last_activity": now,
        }
        for _ in range(count)
    ]
    async with engine.begin() as conn:
        for i in range(0, count, 1000):
            await conn.execute(insert(SessionRow), rows[i : i + 1000])
    await engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--pg", default="postgresql://127.0.0.1:5432/test")
    ap.add_argument("--idle", type=int, default=30, help="seconds to measure idle CPU")
    ap.add_argument("--heartbeat", type=float, default=10.0)
    args = ap.parse_args()
    import resource

    import psycopg2

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    name = f"ss_sched_{uuid.uuid4().hex[:8]}"
    admin_conn = psycopg2.connect(args.pg)
    admin_conn.autocommit = True
    admin_conn.cursor().execute(f'CREATE DATABASE "{name}"')
    db_url = args.pg.rsplit("/", 1)[0] + "/" + name
    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    env = {
        "STREAMSPACE_DATABASE_URL": db_url,
        "STREAMSPACE_LOCAL_AGENT": "false",
        "STREAMSPACE_AGENT_HEARTBEAT_SECONDS": str(args.heartbeat),
        "STREAMSPACE_LOOP_INTERVAL_SECONDS": "0.5",
    }
    stop_ev = mp.Event()
    procs: list[mp.Process] = []
    try:
        with product("server", env=env) as url:
            token = login(url)
            h = {"Authorization": f"Bearer {token}"}
            creds: list[tuple[str, str, str]] = []
            t0 = time.perf_counter()
            with httpx.Client(base_url=url, headers=h, timeout=60) as c:
                for i in range(args.agents):
                    jt = c.post("/api/v1/agents/join-tokens", json={}).json()["token"]
                    cluster = f"c{i % 10}"
                    r = c.post(
                        protocol.AGENT_ENROLL_PATH,
                        json={
                            "join_token": jt,
                            "name": f"sim-{i}",
                            "cluster_id": cluster,
                            "cluster_name": cluster,
                            "backend": "local",
                        },
                    )
                    body = r.json()
                    creds.append((body["agent_id"], body["credential"], cluster))
                owner_id = c.get("/api/v1/auth/me").json()["id"]
            print(f"enrolled {args.agents} agents in {time.perf_counter() - t0:.1f} s")
            slots = max(20, 2 * args.sessions // max(args.agents, 1))
            ready_q: mp.Queue[int] = mp.Queue()
            per = (len(creds) + args.procs - 1) // args.procs
            t0 = time.perf_counter()
            for p in range(args.procs):
                proc = mp.Process(
                    target=_client_process,
                    args=(
                        url,
                        creds[p * per : (p + 1) * per],
                        args.heartbeat,
                        slots,
                        ready_q,
                        stop_ev,
                    ),
                )
                proc.start()
                procs.append(proc)
            connected = sum(ready_q.get(timeout=300) for _ in procs)
            print(f"connected {connected} agents in {time.perf_counter() - t0:.1f} s")
            pid = server_pid(int(url.rsplit(":", 1)[1]))
            time.sleep(3)
            c0, w0 = cpu_seconds(pid), time.perf_counter()
            time.sleep(args.idle)
            cpu = (cpu_seconds(pid) - c0) / (time.perf_counter() - w0)
            print(
                f"control plane CPU holding {connected} agents "
                f"(heartbeat {args.heartbeat:g} s): {cpu * 100:.1f}% of one core"
            )
            asyncio.run(insert_pending(db_url, owner_id, args.sessions))
            t0 = time.perf_counter()
            c0 = cpu_seconds(pid)
            with httpx.Client(base_url=url, headers=h, timeout=60) as c:
                while True:
                    running = c.get(
                        "/api/v1/sessions", params={"state": "running", "limit": 1}
                    ).json()["total"]
                    if running >= args.sessions:
                        break
                    if time.perf_counter() - t0 > 600:
                        print(f"gave up: {running} running")
                        break
                    time.sleep(0.5)
            elapsed = time.perf_counter() - t0
            print(
                f"placed and started {args.sessions} sessions in {elapsed:.1f} s: "
                f"{args.sessions / elapsed:.0f} placements/s "
                f"(control plane CPU {(cpu_seconds(pid) - c0) / elapsed * 100:.0f}% of one core)"
            )
    finally:
        stop_ev.set()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        admin_conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin_conn.close()


if __name__ == "__main__":
    main()
