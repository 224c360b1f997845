"""Mixed load on two control-plane replicas: simulated agents and users over the real API.

Usage: python -m benchmarks.load [--agents 500] [--clusters 5] [--users 200] [--duration 120]
                                 [--think 5] [--ramp 10] [--poll 0.5]
                                 [--pg postgresql://127.0.0.1:5432/test]
                                 [--redis redis://127.0.0.1:6379/0]
                                 [--agent-procs 1] [--user-procs 2]

Two `streamspace server` replicas share a fresh PostgreSQL database (dropped at the end) and
Redis. `--agents` simulated agents in `--clusters` clusters enrol with join tokens and speak the
real protocol over real WebSockets, half of them connected to each replica: every command is
acked and completed at once, and for `open_stream` the agent dials the stream WebSocket back to
the replica that asked and answers it as a tiny fake RFB server (version banner, then echo).

`--users` simulated users (asyncio + httpx, HTTP/1.1 keep-alive) arrive at random moments within
`--ramp` seconds and loop for `--duration` seconds: create an xterm session (sometimes pinned to a
cluster), list their sessions, poll it every `--poll` s until it runs (up to 60 s), connect
(ticket from one replica; the browser WebSocket on the other replica half of the time; banner +
echo through the tunnel), sometimes hibernate it, then stop it, pausing `--think` seconds on
average (uniform 0.5x-1.5x) between those actions like a person clicking; `--think 0` makes it a
capacity test (no pauses: the latency figures are then queueing). Every request goes to a random
replica.

Prints API latency by route, requests/s, errors by kind, placements/s and the cross-replica
command latency: from the moment replica X writes a command row (a start by placement, a
hibernate/stop by the user's request) to the moment the simulated agent connected to replica
Y != X receives the Command (one machine, one clock); also the same measured from the start of
the user's HTTP request, and the replica-to-replica hop alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import ADMIN_PASSWORD, ROOT, describe_machine, free_port, percentile
from streamspace import protocol

TARGET_ERRORS = 0
TARGET_API_P99_MS = 50.0
TARGET_CMD_P99_MS = 10.0
BANNER = b"RFB 003.008\n"
ECHO_BYTES = 256
FAKE_RFB_PORT = 5901
PIN_CLUSTER_RATIO = 0.3
HIBERNATE_RATIO = 0.25
CROSS_STREAM_RATIO = 0.5
USER_PASSWORD = "load-user-pass"
ROUTES = {
    "create": "POST /api/v1/sessions",
    "list": "GET /api/v1/sessions?limit=20",
    "get": "GET /api/v1/sessions/{id}",
    "connect": "POST /api/v1/sessions/{id}/connect",
    "hibernate": "POST /api/v1/sessions/{id}/hibernate",
    "stop": "DELETE /api/v1/sessions/{id}",
}


# ---- process plumbing ---------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_setup() -> None:
    """In the load-generator processes: the parent alone handles Ctrl-C and shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServiceCPU:
    """CPU of the PostgreSQL and Redis server processes (all of them, shared with anything else
    on the machine) and of the whole machine, sampled in a thread: PostgreSQL backends come and
    go (pool overflow connections), so a start/end reading would miss them."""

    NAMES = {"postgres": "postgres (all)", "redis-server": "redis-server"}

    def __init__(self) -> None:
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self.new_pids: Counter[str] = Counter()
        self.exited: Counter[str] = Counter()
        self._stop = threading.Event()
        self._first = True
        self.machine0 = self._machine()
        self._scan()
        self._first = False
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")
        self._thread.start()

    @staticmethod
    def _machine() -> tuple[float, float]:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    def _scan(self) -> None:
        for pid_s in os.listdir("/proc"):
            if not pid_s.isdigit():
                continue
            pid = int(pid_s)
            try:
                kind = self.kind.get(pid) or self.NAMES.get(
                    Path(f"/proc/{pid}/comm").read_text().strip(), ""
                )
                if not kind:
                    continue
                cpu = _cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                continue
            if pid not in self.base:
                self.base[pid] = cpu if self._first else 0.0
                self.kind[pid] = kind
                if not self._first:
                    self.new_pids[kind] += 1
            self.last[pid] = cpu

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._scan()

    def stop(self, wall: float) -> tuple[dict[str, float], float]:
        self._stop.set()
        self._thread.join(5)
        self._scan()
        total, idle = self._machine()
        busy = 1 - (idle - self.machine0[1]) / max(total - self.machine0[0], 1e-9)
        used: defaultdict[str, float] = defaultdict(float)
        for pid, base in self.base.items():
            used[self.kind[pid]] += self.last[pid] - base
            if not Path(f"/proc/{pid}").exists():
                self.exited[self.kind[pid]] += 1
        return {k: v / wall for k, v in used.items()}, busy


def _own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _ws(url: str) -> str:
    return "ws" + url[4:]


# ---- simulated agents ---------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSpec:
    agent_id: str
    credential: str
    cluster: str
    replica: int


@dataclass
class AgentSim:
    urls: list[str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ready: int = 0
    commands: list[tuple[str, str, str, float, int]] = field(default_factory=list)
    """(command_id, session_id, action, received at (time.time()), replica index)"""
    seen: set[str] = field(default_factory=set)
    duplicates: Counter[str] = field(default_factory=Counter)
    streams: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    reconnects: int = 0
    sockets: set[Any] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    load: Counter[str] = field(default_factory=Counter)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, detail[:300])

    async def run_agent(self, spec: AgentSpec) -> None:
        """Connect, serve, and (like a real agent) reconnect with backoff until told to stop."""
        from websockets.exceptions import InvalidHandshake, WebSocketException

        delay = 0.5
        was_ready = False
        while not self.stop.is_set():
            try:
                was_ready = await self._serve(spec, was_ready) or was_ready
                delay = 0.5
            except (InvalidHandshake, WebSocketException, OSError, TimeoutError) as exc:
                if self.stop.is_set():
                    return
                if was_ready:
                    self.error(f"agent connection lost: {type(exc).__name__}", repr(exc))
                else:
                    self.reconnects += 1
            if self.stop.is_set():
                return
            if was_ready:
                self.error("agent connection closed by the server", spec.agent_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)

    async def _serve(self, spec: AgentSpec, was_ready: bool) -> bool:
        from websockets.asyncio.client import connect

        async with connect(
            _ws(self.urls[spec.replica]) + protocol.AGENT_CONNECT_PATH,
            additional_headers={"Authorization": f"Bearer {spec.credential}"},
            max_size=None,
            compression=None,
            open_timeout=60,
        ) as ws:
            self.sockets.add(ws)
            try:
                await ws.send(
                    protocol.encode(
                        protocol.Hello(
                            protocol_version=protocol.PROTOCOL_VERSION,
                            agent_id=spec.agent_id,
                            cluster_id=spec.cluster,
                            cluster_name=spec.cluster,
                            backend="local",
                            capacity=protocol.Capacity(
                                max_sessions=50, cpu_millis=640000, memory_mb=2621440
                            ),
                            templates=["xterm"],
                            isolation=protocol.Isolation(mode="uid-sandbox", detail="simulated"),
                        )
                    )
                )
                welcome = protocol.parse_server_message(await asyncio.wait_for(ws.recv(), 60))
                if not isinstance(welcome, protocol.Welcome):
                    raise OSError(f"expected welcome, got {welcome!r}"[:200])
                if not was_ready:
                    self.ready += 1
                beater = asyncio.create_task(self._beat(ws, spec, welcome.heartbeat_seconds))
                try:
                    await self._read_loop(ws, spec)
                finally:
                    beater.cancel()
            finally:
                self.sockets.discard(ws)
        return True

    async def _beat(self, ws: Any, spec: AgentSpec, interval: float) -> None:
        await asyncio.sleep(interval * random.random())
        while True:
            load = protocol.Load(sessions=self.load[spec.agent_id], cpu_millis=0, memory_mb=0)
            await ws.send(protocol.encode(protocol.Heartbeat(load=load)))
            await asyncio.sleep(interval)

    async def _read_loop(self, ws: Any, spec: AgentSpec) -> None:
        async for raw in ws:
            at = time.time()
            msg = protocol.parse_server_message(raw)
            if isinstance(msg, protocol.Command):
                self.commands.append((msg.command_id, msg.session_id, msg.action, at, spec.replica))
                if msg.command_id in self.seen:
                    self.duplicates[msg.action] += 1
                self.seen.add(msg.command_id)
                await ws.send(protocol.encode(protocol.Ack(command_id=msg.command_id)))
                running = msg.action in ("start", "wake")
                self.load[spec.agent_id] = max(0, self.load[spec.agent_id] + (1 if running else -1))
                endpoint = protocol.Endpoint(port=FAKE_RFB_PORT) if running else None
                await ws.send(
                    protocol.encode(
                        protocol.Result(command_id=msg.command_id, ok=True, endpoint=endpoint)
                    )
                )
            elif isinstance(msg, protocol.OpenStream):
                task = asyncio.create_task(self._stream(spec, msg))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(msg, protocol.ErrorMessage):
                self.error(f"agent got error message: {msg.code}", msg.message)

    async def _stream(self, spec: AgentSpec, msg: protocol.OpenStream) -> None:
        """Dial back and act as the session's RFB server: banner, then echo every frame."""
        from websockets.asyncio.client import connect

        base = msg.base_url.rstrip("/") or _ws(self.urls[spec.replica])
        try:
            async with connect(
                base + msg.path,
                additional_headers={"Authorization": f"Bearer {spec.credential}"},
                max_size=None,
                compression=None,
                open_timeout=10,
            ) as ws:
                await ws.send(BANNER)
                async for data in ws:
                    await ws.send(data)
            self.streams += 1
        except Exception as exc:
            if not self.stop.is_set():
                self.error(f"agent stream dial-back: {type(exc).__name__}", repr(exc))

    async def shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        self.stop.set()
        socks = list(self.sockets)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.close() for s in socks), return_exceptions=True), 15
            )
        for t in [*tasks, *self.tasks]:
            t.cancel()
        await asyncio.gather(*tasks, *self.tasks, return_exceptions=True)


def _agent_process(
    urls: list[str],
    specs: list[AgentSpec],
    ready_q: Any,
    out_q: Any,
    stop_ev: Any,
) -> None:
    _child_setup()
    parent = os.getppid()

    async def main() -> None:
        sim = AgentSim(urls)
        tasks = []
        for i, spec in enumerate(specs):
            tasks.append(asyncio.create_task(sim.run_agent(spec)))
            if i % 50 == 49:
                await asyncio.sleep(0.1)
        deadline = time.monotonic() + 300
        while sim.ready < len(specs) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        ready_q.put(("agents", sim.ready, dict(sim.examples)))
        cpu0, wall0 = _own_cpu(), time.monotonic()
        lag: list[float] = []
        lagger = asyncio.create_task(_measure_lag(lag))
        while not stop_ev.is_set() and os.getppid() == parent:
            await asyncio.sleep(0.2)
        cpu = (_own_cpu() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        lagger.cancel()
        await sim.shutdown(tasks)
        out_q.put(
            {
                "kind": "agents",
                "commands": sim.commands,
                "duplicates": dict(sim.duplicates),
                "streams": sim.streams,
                "errors": dict(sim.errors),
                "examples": sim.examples,
                "reconnects": sim.reconnects,
                "cpu": cpu,
                "lag": lag,
            }
        )

    _run(main)


# ---- simulated users ----------------------------------------------------------------------


@dataclass
class UserStats:
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    expected: list[tuple[str, str, float, int]] = field(default_factory=list)
    """(session_id, action, request started at (time.time()), replica index)"""
    created: int = 0
    running: int = 0
    cycles: int = 0
    to_running: list[tuple[float, int]] = field(default_factory=list)
    """(ms from the create response until the poll saw running, replica the create went to)"""
    lag: list[float] = field(default_factory=list)
    """event-loop lag of this load-generator process, ms (client-side queueing)"""
    streams: list[tuple[float, float, bool]] = field(default_factory=list)
    """(ms to the banner, ms echo round trip, browser on the other replica than the ticket)"""
    first: float = float("inf")
    last: float = 0.0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, detail[:300])


class User:
    def __init__(
        self,
        token: str,
        urls: list[str],
        clusters: int,
        deadline: float,
        poll: float,
        think: float,
        ramp: float,
        stats: UserStats,
        rng: random.Random,
    ) -> None:
        self.think = think
        self.ramp = ramp
        self.token = token
        self.urls = urls
        self.clusters = clusters
        self.deadline = deadline
        self.poll = poll
        self.stats = stats
        self.rng = rng
        self.client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            # uvicorn closes idle keep-alive connections after 5 s and httpx (unlike a browser)
            # does not retry a request that meets such a close: stop reusing them well before.
            limits=httpx.Limits(
                max_connections=4, max_keepalive_connections=4, keepalive_expiry=3.0
            ),
        )

    async def call(
        self,
        method: str,
        group: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        replica: int | None = None,
    ) -> tuple[httpx.Response | None, int, float]:
        idx = self.rng.randrange(len(self.urls)) if replica is None else replica
        started = time.time()
        t0 = time.perf_counter()
        self.stats.first = min(self.stats.first, started)
        try:
            r = await self.client.request(method, self.urls[idx] + path, json=json, params=params)
        except httpx.HTTPError as exc:
            self.stats.last = max(self.stats.last, time.time())
            self.stats.latency[group].append((time.perf_counter() - t0) * 1000)
            self.stats.error(f"{ROUTES[group]}: {type(exc).__name__}", repr(exc))
            return None, idx, started
        self.stats.latency[group].append((time.perf_counter() - t0) * 1000)
        self.stats.last = max(self.stats.last, time.time())
        if r.is_success:
            return r, idx, started
        self.stats.error(f"{ROUTES[group]}: HTTP {r.status_code}", r.text)
        return None, idx, started

    async def run(self) -> None:
        async with self.client:
            await asyncio.sleep(self.rng.uniform(0, self.ramp))  # people arrive, not at once
            while time.time() < self.deadline:
                try:
                    await self.cycle()
                except Exception as exc:  # a load-generator bug must not end the run
                    self.stats.error(f"user loop: {type(exc).__name__}", repr(exc))
                    await asyncio.sleep(1)

    async def pause(self) -> None:
        """A person between two clicks: `think` seconds on average (uniform 0.5x-1.5x)."""
        if self.think > 0:
            await asyncio.sleep(self.think * self.rng.uniform(0.5, 1.5))

    async def cycle(self) -> None:
        body: dict[str, Any] = {"template": "xterm"}
        if self.rng.random() < PIN_CLUSTER_RATIO:
            body["cluster_id"] = f"c{self.rng.randrange(self.clusters)}"
        r, created_on, _ = await self.call("POST", "create", "/api/v1/sessions", json=body)
        if r is None:
            await asyncio.sleep(0.5)
            return
        self.stats.created += 1
        sid = r.json()["id"]
        t0 = time.perf_counter()
        await self.call("GET", "list", "/api/v1/sessions", params={"limit": 20})
        state = await self.wait_state(sid, "running", 60)
        if state == "running":
            self.stats.running += 1
            self.stats.to_running.append(((time.perf_counter() - t0) * 1000, created_on))
            await self.pause()
            await self.stream(sid)
            if self.rng.random() < HIBERNATE_RATIO:
                await self.pause()
                await self.command(sid, "hibernate", "POST", f"/api/v1/sessions/{sid}/hibernate")
                await self.wait_state(sid, "hibernated", 60)
        await self.pause()
        await self.command(sid, "stop", "DELETE", f"/api/v1/sessions/{sid}")
        self.stats.cycles += 1
        await self.pause()

    async def command(self, sid: str, action: str, method: str, path: str) -> None:
        """A request that must reach the session's agent; remembered for the latency match."""
        r, idx, started = await self.call(method, action, path)
        want = "hibernating" if action == "hibernate" else "stopping"
        if r is not None and r.json().get("state") == want and r.json().get("agent_id"):
            self.stats.expected.append((sid, action, started, idx))

    async def wait_state(self, sid: str, want: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            await asyncio.sleep(self.poll)
            r, _, _ = await self.call("GET", "get", f"/api/v1/sessions/{sid}")
            if r is None:
                continue
            view = r.json()
            state = view["state"]
            if state == want:
                return state
            if state in ("failed", "stopped"):
                self.stats.error(
                    f"session {state} while waiting for {want}",
                    view.get("failure_reason") or view.get("status_message") or "",
                )
                return state
        self.stats.error(f"timeout waiting for {want}", f"{sid} still {state} after {timeout} s")
        return state

    async def stream(self, sid: str) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, WebSocketException
        from websockets.typing import Subprotocol

        r, a, _ = await self.call("POST", "connect", f"/api/v1/sessions/{sid}/connect")
        if r is None:
            return
        ticket = r.json()
        b = 1 - a if self.rng.random() < CROSS_STREAM_RATIO else a
        url = f"{_ws(self.urls[b])}{ticket['ws_path']}?ticket={ticket['ticket']}"
        t0 = time.perf_counter()
        try:
            async with (
                asyncio.timeout(20),
                connect(
                    url,
                    subprotocols=[Subprotocol("binary")],
                    compression=None,
                    max_size=None,
                    open_timeout=10,
                ) as ws,
            ):
                got = b""
                while len(got) < len(BANNER):
                    got += _as_bytes(await ws.recv())
                opened = (time.perf_counter() - t0) * 1000
                payload = self.rng.randbytes(ECHO_BYTES)
                t1 = time.perf_counter()
                await ws.send(payload)
                echoed = b""
                while len(echoed) < ECHO_BYTES:
                    echoed += _as_bytes(await ws.recv())
                rtt = (time.perf_counter() - t1) * 1000
            if got != BANNER or echoed != payload:
                self.stats.error("stream: wrong bytes", f"banner {got[:20]!r}")
            else:
                self.stats.streams.append((opened, rtt, a != b))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            reason = exc.rcvd.reason if exc.rcvd else ""
            self.stats.error(f"stream: closed with {code}", reason)
        except (WebSocketException, OSError, TimeoutError) as exc:
            self.stats.error(f"stream: {type(exc).__name__}", repr(exc))


async def _measure_lag(out: list[float], every: float = 0.05) -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(every)
        out.append((time.perf_counter() - t - every) * 1000)


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def _user_process(
    urls: list[str],
    tokens: list[str],
    clusters: int,
    duration: float,
    poll: float,
    think: float,
    ramp: float,
    seed: int,
    ready_q: Any,
    go_ev: Any,
    stop_ev: Any,
    out_q: Any,
) -> None:
    _child_setup()
    parent = os.getppid()

    async def main() -> None:
        ready_q.put(("users", len(tokens), {}))
        while not go_ev.is_set():
            await asyncio.sleep(0.01)
        if stop_ev.is_set():
            return
        stats = UserStats()
        deadline = time.time() + duration
        rng = random.Random(seed)
        users = [
            User(t, urls, clusters, deadline, poll, think, ramp, stats, random.Random(rng.random()))
            for t in tokens
        ]
        cpu0, wall0 = _own_cpu(), time.monotonic()
        run = asyncio.gather(*(u.run() for u in users))
        lag = asyncio.create_task(_measure_lag(stats.lag))
        while not run.done():
            if stop_ev.is_set() or os.getppid() != parent:  # aborted: no report
                run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run
                return
            await asyncio.wait({run}, timeout=0.5)
        lag.cancel()
        cpu = (_own_cpu() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        out_q.put(
            {
                "kind": "users",
                "latency": dict(stats.latency),
                "errors": dict(stats.errors),
                "examples": stats.examples,
                "expected": stats.expected,
                "created": stats.created,
                "running": stats.running,
                "cycles": stats.cycles,
                "to_running": stats.to_running,
                "lag": stats.lag,
                "streams": stats.streams,
                "first": stats.first,
                "last": stats.last,
                "cpu": cpu,
            }
        )

    _run(main)


# ---- the control plane --------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    replica_id: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_replica(
    index: int, tag: str, work: Path, db_url: str, redis_url: str, env: dict[str, str]
) -> Replica:
    port = free_port()
    replica_id = f"r{index + 1}-{tag}"
    data_dir = work / replica_id
    data_dir.mkdir()
    log = work / f"{replica_id}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamspace.cli",
                "server",
                "--port",
                str(port),
                "--replica-id",
                replica_id,
                "--data-dir",
                str(data_dir),
                "--database-url",
                db_url,
                "--redis-url",
                redis_url,
                "--advertise-url",
                f"http://127.0.0.1:{port}",
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the replicas in order
            preexec_fn=_die_with_parent,
        )
    return Replica(index, replica_id, port, proc, log)


def wait_healthy(replicas: list[Replica], timeout: float = 90) -> None:
    deadline = time.time() + timeout
    for rep in replicas:
        while True:
            if rep.proc.poll() is not None:
                raise RuntimeError(f"{rep.replica_id} exited:\n{tail(rep.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(rep.url + "/healthz", timeout=1).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"{rep.replica_id} did not start:\n{tail(rep.log)}")
            time.sleep(0.2)


def stop_replicas(replicas: list[Replica]) -> None:
    for rep in replicas:
        if rep.proc.poll() is None:
            rep.proc.terminate()
    for rep in replicas:
        try:
            rep.proc.wait(20)
        except subprocess.TimeoutExpired:
            rep.proc.kill()
            rep.proc.wait(5)


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def setup(
    urls: list[str], agents: int, clusters: int, users: int
) -> tuple[list[AgentSpec], list[str], float, float]:
    """Enrol the agents (join token + enroll) and create and log in the users, as admin."""
    async with httpx.AsyncClient(timeout=120) as c:
        r = await c.post(
            urls[0] + "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        r.raise_for_status()
        admin = {"Authorization": f"Bearer {r.json()['access_token']}"}
        sem = asyncio.Semaphore(8)

        async def enrol(i: int) -> AgentSpec:
            url, cluster = urls[i % 2], f"c{i % clusters}"
            async with sem:
                r = await c.post(url + "/api/v1/agents/join-tokens", json={}, headers=admin)
                r.raise_for_status()
                r = await c.post(
                    url + protocol.AGENT_ENROLL_PATH,
                    json={
                        "join_token": r.json()["token"],
                        "name": f"sim-{i}",
                        "cluster_id": cluster,
                        "cluster_name": f"Cluster {cluster}",
                        "backend": "local",
                    },
                )
                r.raise_for_status()
            body = r.json()
            return AgentSpec(body["agent_id"], body["credential"], cluster, i % 2)

        async def user(i: int) -> str:
            url, name = urls[i % 2], f"load-{i}"
            async with sem:
                r = await c.post(
                    url + "/api/v1/users",
                    json={"username": name, "password": USER_PASSWORD},
                    headers=admin,
                )
                r.raise_for_status()
                r = await c.post(
                    urls[1 - i % 2] + "/api/v1/auth/login",
                    json={"username": name, "password": USER_PASSWORD},
                )
                r.raise_for_status()
            return str(r.json()["access_token"])

        t0 = time.perf_counter()
        specs = await asyncio.gather(*(enrol(i) for i in range(agents)))
        t1 = time.perf_counter()
        tokens = await asyncio.gather(*(user(i) for i in range(users)))
        t2 = time.perf_counter()
    return list(specs), list(tokens), t1 - t0, t2 - t1


# ---- report -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def fmt_ms(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values)} p50={percentile(values, 50):.1f} ms "
        f"p99={percentile(values, 99):.1f} ms max={max(values):.1f} ms"
    )


def report(
    user_results: list[dict[str, Any]],
    agent_results: list[dict[str, Any]],
    replica_cpu: dict[str, float],
    db: DbState,
    log_lines: list[str],
    leader: int | None,
    forward: dict[float, float],
    replica_lag: dict[str, dict[float, float]],
) -> None:
    timeline = db.timeline
    latency: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    expected: list[tuple[str, str, float, int]] = []
    to_running: list[tuple[float, int]] = []
    lag: list[float] = []
    streams: list[tuple[float, float, bool]] = []
    created = running = cycles = 0
    for res in user_results:
        for group, values in res["latency"].items():
            latency[group].extend(values)
        errors.update(res["errors"])
        for k, v in res["examples"].items():
            examples.setdefault(k, v)
        expected.extend(res["expected"])
        to_running.extend(res["to_running"])
        lag.extend(res["lag"])
        streams.extend(res["streams"])
        created += res["created"]
        running += res["running"]
        cycles += res["cycles"]
    first = min(r["first"] for r in user_results)
    last = max(r["last"] for r in user_results)
    elapsed = max(last - first, 1e-9)

    receipts: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    duplicates: Counter[str] = Counter()
    agent_streams = reconnects = 0
    for res in agent_results:
        for _cid, sid, action, at, replica in res["commands"]:
            receipts[(sid, action)].append((at, replica))
    for times in receipts.values():
        times.sort()
    received = {key: times[0] for key, times in receipts.items()}
    for res in agent_results:
        duplicates.update(res["duplicates"])
        errors.update(res["errors"])
        for k, v in res["examples"].items():
            examples.setdefault(k, v)
        agent_streams += res["streams"]
        reconnects += res["reconnects"]

    cross: dict[str, list[float]] = defaultdict(list)
    same: dict[str, list[float]] = defaultdict(list)
    requested_on: dict[tuple[str, str], int] = {}
    for sid, action, started, user_replica in expected:
        got = next((r for r in receipts.get((sid, action), []) if r[0] >= started), None)
        if got is None:
            errors[f"{action} command never reached the agent"] += 1
            examples.setdefault(f"{action} command never reached the agent", sid)
            continue
        requested_on[(sid, action)] = user_replica
        at, agent_replica = got
        (cross if agent_replica != user_replica else same)[action].append((at - started) * 1000)

    # Command latency proper: from the command row being written on replica X (start commands by
    # placement on the lease holder, hibernate/stop by the user's request) to the simulated agent
    # holding the Command frame; first receipt of each command id.
    first_receipt: dict[str, tuple[float, int, str, str]] = {}
    for res in agent_results:
        for cid, sid, action, at, replica in res["commands"]:
            if cid not in first_receipt or at < first_receipt[cid][0]:
                first_receipt[cid] = (at, replica, sid, action)
    delivered: dict[bool, dict[str, list[float]]] = {
        True: defaultdict(list),
        False: defaultdict(list),
    }
    for cid, (at, agent_replica, sid, action) in first_receipt.items():
        origin = leader if action == "start" else requested_on.get((sid, action))
        if origin is None or cid not in db.stored:
            continue
        delivered[agent_replica != origin][action].append((at - db.stored[cid]) * 1000)

    total = sum(len(v) for v in latency.values())
    everything = [x for v in latency.values() for x in v]
    n_errors = sum(errors.values())
    print(
        f"load: {len(user_results)} user process(es), {len(agent_results)} agent process(es); "
        f"measured {elapsed:.1f} s"
    )
    print(f"API requests: {total} in {elapsed:.1f} s = {total / elapsed:.1f} requests/s")
    print(f"  {'route':<40} {'n':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for group, route in ROUTES.items():
        values = latency.get(group, [])
        if values:
            print(
                f"  {route:<40} {len(values):>7} {percentile(values, 50):>8.1f} "
                f"{percentile(values, 99):>8.1f} {max(values):>8.1f}"
            )
    p99 = percentile(everything, 99)
    print(
        f"  {'overall':<40} {len(everything):>7} {percentile(everything, 50):>8.1f} "
        f"{p99:>8.1f} {max(everything, default=float('nan')):>8.1f}   "
        f"target p99 < {TARGET_API_P99_MS:.0f} ms: {verdict(p99 < TARGET_API_P99_MS)}"
    )
    print(f"errors: {n_errors}   target {TARGET_ERRORS}: {verdict(n_errors <= TARGET_ERRORS)}")
    for kind, count in errors.most_common():
        print(f"  {count:>6} x {kind}   e.g. {examples.get(kind, '')[:160]!r}")
    print(
        f"sessions: {created} created, {running} reached running, {cycles} cycles completed; "
        f"placements/s = {running / elapsed:.1f}"
    )
    print(f"  create -> running (seen by polling): {fmt_ms([t for t, _ in to_running])}")
    if leader is not None:
        on = [t for t, r in to_running if r == leader]
        off = [t for t, r in to_running if r != leader]
        print(f"    created on the loop-lease holder:    {fmt_ms(on)}")
        print(f"    created on the other replica:        {fmt_ms(off)}")
    queued, applied = [], []
    dispatched: dict[bool, list[float]] = {True: [], False: []}
    for sid, t in timeline.items():
        got = received.get((sid, "start"))
        if "created" in t and "placed" in t:
            queued.append((t["placed"] - t["created"]) * 1000)
            if got is not None:
                dispatched[got[1] == leader].append((got[0] - t["placed"]) * 1000)
                if "running" in t:
                    applied.append((t["running"] - got[0]) * 1000)
    print(f"    created -> placed (queue):           {fmt_ms(queued)}")
    print(f"    placed -> agent got start, agent on the lease holder: {fmt_ms(dispatched[True])}")
    print(f"    placed -> agent got start, agent on the other:        {fmt_ms(dispatched[False])}")
    print(f"    agent got start -> running recorded: {fmt_ms(applied)}")
    crossed = [s for s in streams if s[2]]
    print(
        f"streams: {len(streams)} end to end ({len(crossed)} with the browser on the other "
        f"replica); agents bridged {agent_streams}"
    )
    print(f"  browser WebSocket open -> RFB banner: {fmt_ms([s[0] for s in streams])}")
    print(f"    of which cross-replica:             {fmt_ms([s[0] for s in crossed])}")
    print(f"  {ECHO_BYTES}-byte echo round trip:         {fmt_ms([s[1] for s in streams])}")
    all_cross = [x for v in delivered[True].values() for x in v]
    cp99 = percentile(all_cross, 99)
    print(
        "cross-replica command latency (command written on replica X -> the agent connected to "
        f"Y != X has the Command): n={len(all_cross)} p50={percentile(all_cross, 50):.1f} ms "
        f"p99={cp99:.1f} ms   target p99 < {TARGET_CMD_P99_MS:.0f} ms: "
        f"{verdict(cp99 < TARGET_CMD_P99_MS)}"
    )
    for action in ("start", "hibernate", "stop"):
        print(f"  {action:<9}: {fmt_ms(delivered[True].get(action, []))}")
    f50, f99 = bucket_quantile(forward, 0.50), bucket_quantile(forward, 0.99)
    print(
        "  of which the replica-to-replica hop (Redis publish on X -> queued for the agent's "
        f"socket on Y; streamspace_router_forward_seconds of both replicas): "
        f"n={forward.get(float('inf'), 0):.0f} p50 <= {f50 * 1000:g} ms p99 <= {f99 * 1000:g} ms"
    )
    same_all = [x for v in delivered[False].values() for x in v]
    print(f"  same replica, for comparison: {fmt_ms(same_all)}")
    user_cross = [x for v in cross.values() for x in v]
    print(
        "  from the start of the user's hibernate/stop request on X (adds the whole HTTP request "
        f"before the command exists): cross-replica {fmt_ms(user_cross)}; same replica "
        f"{fmt_ms([x for v in same.values() for x in v])}"
    )
    print(
        f"commands received by agents: {sum(len(r['commands']) for r in agent_results)}, "
        f"re-deliveries of an already received command: {dict(duplicates) or 0}; "
        f"agent connect retries during start-up: {reconnects}"
    )
    print(f"load generator event-loop lag (client-side queueing): {fmt_ms(lag)}")
    agent_lag = [x for r in agent_results for x in r["lag"]]
    print(
        "simulated agents' event-loop lag (a command's receipt is stamped when this loop gets "
        f"to it, so this is inside the command figures): {fmt_ms(agent_lag)}"
    )
    for rid, buckets in replica_lag.items():
        n = buckets.get(float("inf"), 0.0)
        over = n - max((c for le, c in buckets.items() if le <= 0.01), default=0.0)
        print(
            f"{rid} event-loop lag (how late a 50 ms timer fired): "
            f"n={n:.0f} p50 <= {bucket_quantile(buckets, 0.5) * 1000:g} ms "
            f"p99 <= {bucket_quantile(buckets, 0.99) * 1000:g} ms, "
            f"> 10 ms late: {over:.0f} ({over / max(n, 1) * 100:.1f} %)"
        )
    print(
        "CPU (share of one core during the load): "
        + ", ".join(f"{k} {v * 100:.0f}%" for k, v in replica_cpu.items())
    )
    for line in [*db.summary, *log_lines]:
        print(line)


FORWARD = "streamspace_router_forward_seconds"
LOOP_LAG = "streamspace_event_loop_lag_seconds"
Histograms = dict[tuple[str, str], dict[float, float]]
"""(replica id, metric name) -> cumulative bucket counts by upper bound"""


def scrape_histograms(replicas: list[Replica]) -> Histograms:
    found: defaultdict[tuple[str, str], defaultdict[float, float]] = defaultdict(
        lambda: defaultdict(float)
    )
    for rep in replicas:
        for line in httpx.get(rep.url + "/metrics", timeout=10).text.splitlines():
            for name in (FORWARD, LOOP_LAG):
                if line.startswith(name + "_bucket{"):
                    le = line.split('le="', 1)[1].split('"', 1)[0]
                    found[(rep.replica_id, name)][float(le)] += float(line.rsplit(" ", 1)[1])
    return {key: dict(counts) for key, counts in found.items()}


def histogram_delta(
    after: Histograms, before: Histograms, name: str, replica_ids: list[str]
) -> dict[float, float]:
    """Bucket counts observed between two scrapes, summed over `replica_ids`."""
    total: defaultdict[float, float] = defaultdict(float)
    for rid in replica_ids:
        old = before.get((rid, name), {})
        for le, n in after.get((rid, name), {}).items():
            total[le] += n - old.get(le, 0.0)
    return dict(total)


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile q (what a histogram can honestly say)."""
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    for le, count in sorted(buckets.items()):
        if count >= q * total:
            return le
    return float("inf")


def log_summary(replicas: list[Replica]) -> list[str]:
    """Warnings and errors the replicas logged (the run is at log level WARNING)."""
    lines = []
    for rep in replicas:
        events: Counter[str] = Counter()
        first: dict[str, str] = {}
        tracebacks = 0
        for line in rep.log.read_text(errors="replace").splitlines():
            if line.startswith("Traceback"):
                tracebacks += 1
            elif " level=" in line and " event=" in line:
                level = line.split(" level=", 1)[1].split(" ", 1)[0]
                event, _, rest = line.split(" event=", 1)[1].partition(" ")
                events[f"{level}:{event}"] += 1
                first.setdefault(f"{level}:{event}", rest[:150])
        lines.append(
            f"{rep.replica_id} log: {tracebacks} tracebacks; {sum(events.values())} events"
        )
        for kind, count in events.most_common(6):
            lines.append(f"  {count:>6} x {kind}   e.g. {first[kind]!r}")
    return lines


@dataclass
class DbState:
    summary: list[str]
    holder: str
    timeline: dict[str, dict[str, float]]
    """session_id -> {event kind: first time (epoch s)}"""
    stored: dict[str, float]
    """command_id -> when the control plane wrote the command row (epoch s, its clock)"""


def db_state(db_url_sync: str) -> DbState:
    import psycopg2

    conn = psycopg2.connect(db_url_sync)
    try:
        cur = conn.cursor()
        cur.execute("SELECT state, count(*) FROM sessions GROUP BY state ORDER BY state")
        sessions = dict(cur.fetchall())
        cur.execute("SELECT status, count(*) FROM agent_commands GROUP BY status ORDER BY status")
        commands = dict(cur.fetchall())
        cur.execute(
            "SELECT c.action, c.completed_at IS NOT NULL, count(*) FROM agent_commands c "
            "JOIN sessions s ON s.id = c.session_id WHERE c.status IN ('pending', 'sent', 'acked')"
            " AND s.state IN ('stopped', 'running', 'hibernated') GROUP BY 1, 2 ORDER BY 1, 2"
        )
        stale = {
            f"{action}{' (has completed_at)' if done else ''}": n
            for action, done, n in cur.fetchall()
        }
        cur.execute("SELECT holder FROM leases")
        holders = [r[0] for r in cur.fetchall()]
        cur.execute(
            "SELECT session_id, kind, min(extract(epoch FROM at)) FROM session_events "
            "WHERE kind IN ('created', 'placed', 'running') GROUP BY 1, 2"
        )
        timeline: dict[str, dict[str, float]] = defaultdict(dict)
        for sid, kind, at in cur.fetchall():
            timeline[sid][kind] = float(at)
        cur.execute("SELECT id, extract(epoch FROM created_at) FROM agent_commands")
        stored = {cid: float(at) for cid, at in cur.fetchall()}
    finally:
        conn.close()
    lines = [
        f"database after the run: sessions {sessions}; commands {commands}",
        f"  commands still open although their session settled: {stale or 0}; "
        f"loop lease held by {holders}",
    ]
    return DbState(lines, holders[0] if holders else "", timeline, stored)


# ---- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--agents", type=int, default=500)
    ap.add_argument("--clusters", type=int, default=5)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--duration", type=float, default=120)
    ap.add_argument("--pg", default="postgresql://127.0.0.1:5432/test")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--agent-procs", type=int, default=1, choices=(1, 2))
    ap.add_argument("--user-procs", type=int, default=2, choices=(1, 2))
    ap.add_argument(
        "--poll",
        type=float,
        default=0.5,
        help="seconds between state polls (0.5 like `streamspace sessions create --wait`)",
    )
    ap.add_argument(
        "--think",
        type=float,
        default=5.0,
        help="mean seconds a user pauses between actions (0: back to back, a capacity test)",
    )
    ap.add_argument(
        "--ramp",
        type=float,
        default=10.0,
        help="users start at random moments within this many seconds (all counted)",
    )
    args = ap.parse_args()

    import psycopg2

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    print(f"machine: {describe_machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print("load average before the run: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)
    tag = uuid.uuid4().hex[:8]
    name = f"ss_load_{tag}"
    db_url = args.pg.rsplit("/", 1)[0] + "/" + name
    ctx = mp.get_context("spawn")
    stop_ev, go_ev = ctx.Event(), ctx.Event()
    ready_q, out_q = ctx.Queue(), ctx.Queue()
    procs: list[Any] = []
    replicas: list[Replica] = []
    admin_conn = psycopg2.connect(args.pg)
    admin_conn.autocommit = True
    created_db = False
    work = Path(tempfile.mkdtemp(prefix="ss-load-"))
    failed = show_logs = False
    try:
        admin_conn.cursor().execute(f'CREATE DATABASE "{name}"')
        created_db = True
        env = {
            **os.environ,
            "STREAMSPACE_SECRET_KEY": uuid.uuid4().hex + uuid.uuid4().hex,
            "STREAMSPACE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "STREAMSPACE_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "STREAMSPACE_DEFAULT_QUOTA_SESSIONS": "1000",
            "STREAMSPACE_DEFAULT_QUOTA_CPU_MILLIS": "10000000",
            "STREAMSPACE_DEFAULT_QUOTA_MEMORY_MB": "100000000",
            "STREAMSPACE_ACCESS_TOKEN_TTL_SECONDS": str(int(args.duration) + 3600),
            # Capacity runs (--think 0) drive one user faster than the per-user fair-use limit.
            "STREAMSPACE_USER_REQUESTS_PER_SECOND": "0",
        }
        replicas = [start_replica(i, tag, work, db_url, args.redis, env) for i in range(2)]
        wait_healthy(replicas)
        urls = [r.url for r in replicas]
        print(
            f"control plane: 2 replicas ({', '.join(r.replica_id for r in replicas)}) on "
            f"database {name}, Redis {args.redis}",
            flush=True,
        )

        specs, tokens, t_enrol, t_users = asyncio.run(
            setup(urls, args.agents, args.clusters, args.users)
        )
        print(
            f"setup: enrolled {len(specs)} agents in {args.clusters} clusters in {t_enrol:.1f} s; "
            f"created and logged in {len(tokens)} users in {t_users:.1f} s",
            flush=True,
        )

        t0 = time.perf_counter()
        for p in range(args.agent_procs):
            procs.append(
                ctx.Process(
                    target=_agent_process,
                    args=(urls, specs[p :: args.agent_procs], ready_q, out_q, stop_ev),
                    name=f"load-agents-{p}",
                )
            )
        for p in range(args.user_procs):
            procs.append(
                ctx.Process(
                    target=_user_process,
                    args=(
                        urls,
                        tokens[p :: args.user_procs],
                        args.clusters,
                        args.duration,
                        args.poll,
                        args.think,
                        args.ramp,
                        p,
                        ready_q,
                        go_ev,
                        stop_ev,
                        out_q,
                    ),
                    name=f"load-users-{p}",
                )
            )
        for proc in procs:
            proc.start()
        connected = 0
        for _ in procs:
            kind, count, problems = ready_q.get(timeout=600)
            if kind == "agents":
                connected += count
                if problems:
                    print(f"agent start-up problems: {problems}")
        if connected < len(specs):
            raise RuntimeError(f"only {connected}/{len(specs)} simulated agents connected")
        per = Counter(s.replica for s in specs)
        print(
            f"connected {connected} agents in {time.perf_counter() - t0:.1f} s "
            f"({per[0]} to {replicas[0].replica_id}, {per[1]} to {replicas[1].replica_id}); "
            f"{args.users} users start within {args.ramp:g} s and run for {args.duration:g} s, "
            "pausing "
            + (f"{args.think:g} s on average between actions" if args.think else "never"),
            flush=True,
        )

        time.sleep(2)  # first heartbeats flushed: every agent counts as online
        cpu0 = {r.replica_id: _cpu_seconds(r.proc.pid) for r in replicas}
        histograms0 = scrape_histograms(replicas)
        services = ServiceCPU()
        wall0 = time.perf_counter()
        go_ev.set()
        user_results: list[dict[str, Any]] = []
        while len(user_results) < args.user_procs:
            try:
                res = out_q.get(timeout=5)
            except Exception:
                dead = [p.name for p in procs if not p.is_alive() and p.exitcode]
                if dead:
                    raise RuntimeError(f"load processes died: {dead}") from None
                for rep in replicas:
                    if rep.proc.poll() is not None:
                        raise RuntimeError(f"{rep.replica_id} died:\n{tail(rep.log)}") from None
                continue
            user_results.append(res)
        wall = time.perf_counter() - wall0
        cpu = {
            r.replica_id: (_cpu_seconds(r.proc.pid) - cpu0[r.replica_id]) / wall for r in replicas
        }
        service_cpu, busy = services.stop(wall)
        cpu.update(service_cpu)
        ids = [r.replica_id for r in replicas]
        histograms1 = scrape_histograms(replicas)
        lag = {rid: histogram_delta(histograms1, histograms0, LOOP_LAG, [rid]) for rid in ids}
        time.sleep(3)  # let the last stop results land
        forward = histogram_delta(scrape_histograms(replicas), histograms0, FORWARD, ids)
        stop_ev.set()
        agent_results = [out_q.get(timeout=120) for _ in range(args.agent_procs)]
        cpu.update({f"agents{i}": r["cpu"] for i, r in enumerate(agent_results)})
        cpu.update({f"users{i}": r["cpu"] for i, r in enumerate(user_results)})
        state = db_state(db_url)
        state.summary.insert(
            0,
            f"machine CPU busy during the load: {busy * 100:.0f}% of {os.cpu_count()} cores; "
            f"PostgreSQL backends started during the load: "
            f"{services.new_pids.get('postgres (all)', 0)}, ended: "
            f"{services.exited.get('postgres (all)', 0)}",
        )
        leader = next((r.index for r in replicas if r.replica_id == state.holder), None)
        report(
            user_results,
            agent_results,
            cpu,
            state,
            log_summary(replicas),
            leader,
            forward,
            lag,
        )
        print("load average after the run: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    except KeyboardInterrupt:
        failed = True
        print("\ninterrupted; cleaning up", file=sys.stderr)
    except Exception:
        failed = show_logs = True
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_ev.set()
        go_ev.set()
        deadline = time.monotonic() + 20
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # a child blocked on a full pipe must finish
                while True:
                    out_q.get_nowait()
            time.sleep(0.1)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        if show_logs:
            for rep in replicas:
                print(f"--- {rep.replica_id} log tail ---\n{tail(rep.log)}", file=sys.stderr)
        stop_replicas(replicas)
        if created_db:
            admin_conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin_conn.close()
        shutil.rmtree(work, ignore_errors=True)
        ready_q.close()
        out_q.close()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
