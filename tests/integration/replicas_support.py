"""Infrastructure for test_replicas.py (this module holds no tests).

A `Cluster` is a real multi-replica deployment on this machine, every piece its own process so
the tests can kill, stop and restart each one:

* PostgreSQL (the shared service, a fresh database) reached by the replicas only through
  `TcpProxy`, an asyncio TCP proxy in a background thread that can refuse new connections and
  reset the existing ones to simulate a database outage;
* a private `redis-server` subprocess on a free port (restartable on the same port);
* N `python -m streamspace.cli server` replicas sharing the secret, database and Redis;
* nginx in front of them, rendered from deploy/replicas/nginx.conf.template;
* one `streamspace agent` subprocess (conftest.AgentProcess, local Xvnc backend) whose --server
  is either one replica or nginx.

Every log lives under the cluster's temporary directory; `Cluster.log_tails()` prints them.
Teardown stops sessions first, then kills every process by pid and scans /proc for leftovers
(Xvnc's `-auth` path and the app's HOME are under the temporary directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg2

from conftest import ADMIN_PASSWORD, PG_ADMIN_URL, ROOT, AgentProcess, free_port, wait_for
from streamspace_testing.rfb import RFBClient, RFBError, WebSocketTransport

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
REDIS_SERVER = shutil.which("redis-server")
NGINX_MISSING = None if NGINX else "nginx is not installed (apt-get install nginx)"
REDIS_MISSING = None if REDIS_SERVER else "redis-server is not installed (apt-get install redis)"

STREAM_PATH = "/api/v1/streams/ws"
PROBLEM_JSON = "application/problem+json"
USER = "alice"
USER_PASSWORD = "alice-pass-123"
NOWHERE = "no-such-cluster"
"""A cluster id no agent has: sessions asking for it stay `pending` (no Xvnc is started)."""

# The real Xvnc + xterm, but a full Raw update is 320x240x4 = 300 KiB instead of 4 MiB.
SMALL_TEMPLATE: dict[str, Any] = {
    "name": "xterm-small",
    "display_name": "Small xterm (replica tests)",
    "category": "Development",
    "resources": {"cpu_millis": 100, "memory_mb": 64},
    "display": {"width": 320, "height": 240, "depth": 24},
    "launch": {"local": {"command": ["xterm", "-geometry", "40x12+0+0"]}},
}


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# ---- PostgreSQL proxy ------------------------------------------------------------------------


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) so the peer sees a reset, not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(Exception):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()


class TcpProxy:
    """127.0.0.1:port -> target. `down()` stops listening and resets every open connection;
    `up()` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="pgproxy")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self._gate: asyncio.Event | None = None
        self._gate_size = 0
        self._gate_waiting = 0

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    def start(self) -> TcpProxy:
        self._thread.start()
        self.up()
        return self

    def up(self) -> None:
        self._call(self._up())

    def gate(self, connections: int) -> None:
        """Hold new connections until `connections` of them wait (or 3 s passed), then let them
        all through at once: processes that connect at about the same time then really race."""

        async def arm() -> None:
            self._gate = asyncio.Event()
            self._gate_size = connections
            self._gate_waiting = 0

        self._call(arm())

    def down(self) -> None:
        self._call(self._down())

    @property
    def is_up(self) -> bool:
        return self._server is not None

    async def _up(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            _reset(w)
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            _reset(writer)
            return
        self.accepted += 1
        gate = self._gate
        if gate is not None:
            self._gate_waiting += 1
            if self._gate_waiting >= self._gate_size:
                self._gate = None
                gate.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.wait(), 3)
            self._gate = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        pair = {writer, up_writer}
        self._writers |= pair

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers -= pair

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.down()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


# ---- Redis --------------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server (not daemonized) so the tests can restart it on the same port."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = root / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self.ping, 15, 0.05, what=f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def subscribers(self, channel: str) -> int:
        """PUBSUB NUMSUB: how many connections (replicas) listen on `channel`."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        try:
            return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
        finally:
            client.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# ---- replicas -----------------------------------------------------------------------------------


class Replica:
    """One `python -m streamspace.cli server` process."""

    def __init__(self, root: Path, replica_id: str, env: dict[str, str], args: list[str]) -> None:
        self.id = replica_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / replica_id
        self.log_path = root / f"{replica_id}.log"
        self.env = env
        self.args = [
            sys.executable,
            "-m",
            "streamspace.cli",
            "server",
            "--port",
            str(self.port),
            "--replica-id",
            replica_id,
            "--data-dir",
            str(self.data_dir),
            "--advertise-url",
            self.url,
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"---- start #{self.starts + 1} at {time.strftime('%X')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
            )
        self.starts += 1

    def wait_ready(self, timeout: float = 40) -> None:
        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(
                    f"replica {self.id} exited with {self.proc and self.proc.returncode}:\n"
                    + tail(self.log_path)
                )
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout, 0.1, what=f"replica {self.id} to answer /readyz")

    def start(self) -> Replica:
        self.spawn()
        self.wait_ready()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> float:
        """SIGTERM; returns how long the process took to exit (SIGKILL + error if too long)."""
        if not self.alive:
            return 0.0
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"replica {self.id} ignored SIGTERM for {timeout} s (killed); last log lines:\n"
                + tail(self.log_path, 6)
            ) from None
        return time.monotonic() - started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metric(self, name: str) -> float | None:
        r = httpx.get(self.url + "/metrics", timeout=5)
        r.raise_for_status()
        for line in r.text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        return None


# ---- nginx --------------------------------------------------------------------------------------


class Nginx:
    TEMPLATE = ROOT / "deploy" / "replicas" / "nginx.conf.template"

    def __init__(self, root: Path, replicas: list[Replica]) -> None:
        self.dir = root / "nginx"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = self.dir / "nginx.conf"
        self.replicas = replicas
        self.proc: subprocess.Popen[bytes] | None = None

    def render(self) -> str:
        upstreams = "".join(
            f"    server 127.0.0.1:{r.port} max_fails=1 fail_timeout=3s;\n" for r in self.replicas
        )
        out = []
        for line in self.TEMPLATE.read_text().splitlines(keepends=True):
            if line.strip() == "@UPSTREAMS@":
                out.append(upstreams)
            else:
                out.append(line.replace("@DIR@", str(self.dir)).replace("@PORT@", str(self.port)))
        return "".join(out)

    def start(self) -> Nginx:
        assert NGINX is not None
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render())
        with (self.dir / "nginx-stdout.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [NGINX, "-c", str(self.conf), "-p", str(self.dir), "-e", str(self.error_log)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"nginx exited:\n{tail(self.error_log)}")
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 15, 0.05, what="nginx to proxy /healthz")
        return self

    @property
    def error_log(self) -> Path:
        return self.dir / "nginx-error.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # The master was started in its own session: its process group is it + workers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind, if any


# ---- /proc scans --------------------------------------------------------------------------------


def _live(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return not stat[stat.rfind(")") + 2 :].startswith("Z")


def processes_under(root: Path, xvnc_only: bool = False) -> list[tuple[int, str]]:
    """Live processes whose command line (or, unless xvnc_only, environment) mentions root."""
    needle = str(root).encode()
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            environ = b"" if xvnc_only else Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        argv0 = cmdline.split(b"\0", 1)[0]
        if xvnc_only and not argv0.endswith(b"Xvnc"):
            continue
        if (needle in cmdline or needle in environ) and _live(name):
            found.append((int(name), cmdline.replace(b"\0", b" ").decode(errors="replace")[:160]))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# ---- pollers and readers ------------------------------------------------------------------------


class DbStatePoller(threading.Thread):
    """Reads the sessions' state straight from PostgreSQL (not through the proxy) every 100 ms,
    so every committed state is seen even while the API is down."""

    def __init__(self, dsn: str, session_ids: list[str]) -> None:
        super().__init__(daemon=True, name="state-poller")
        self.dsn = dsn
        self.ids = list(session_ids)
        self.seen: dict[str, list[str]] = {sid: [] for sid in session_ids}
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn)
            conn.autocommit = True
            with conn, conn.cursor() as cur:
                while not self._halt.is_set():
                    cur.execute("SELECT id, state FROM sessions WHERE id = ANY(%s)", (self.ids,))
                    for sid, st in cur.fetchall():
                        if not self.seen[sid] or self.seen[sid][-1] != st:
                            self.seen[sid].append(st)
                    self._halt.wait(0.1)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> dict[str, list[str]]:
        self._halt.set()
        self.join(10)
        assert self.error is None, f"state poller crashed: {self.error!r}"
        return self.seen


class SSEReader(threading.Thread):
    """GET /api/v1/events with httpx streaming; parsed events land in `events`."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True, name="sse-reader")
        self.url = url
        self.token = token
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.ready = threading.Event()
        self.status: int | None = None
        self.error: BaseException | None = None
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=60))

    def run(self) -> None:
        try:
            with self._client.stream(
                "GET", self.url, headers={"Authorization": f"Bearer {self.token}"}
            ) as r:
                self.status = r.status_code
                if r.status_code != 200:
                    self.ready.set()
                    return
                name = "message"
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        self.events.append((name, json.loads(line[5:].strip() or "{}")))
                        if name == "hello":
                            self.ready.set()
                        name = "message"
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    def session_states(self, session_id: str) -> list[str]:
        return [
            e["session"]["state"]
            for name, e in list(self.events)
            if name == "session" and e.get("session", {}).get("id") == session_id
        ]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
        self.join(5)


# ---- RFB through the tunnel ---------------------------------------------------------------------


async def open_viewer(base_port: int, ws_path: str, ticket: str, timeout: float = 20) -> RFBClient:
    """Browser side of a stream: WebSocket -> RFB handshake -> a full non-blank frame."""
    async with asyncio.timeout(timeout):
        transport = await WebSocketTransport.connect(
            f"ws://127.0.0.1:{base_port}{ws_path}?ticket={ticket}"
        )
        rfb = RFBClient(transport)
        await rfb.handshake()
    await rfb.request_update(False, timeout=timeout)
    ok = await rfb.wait_for(RFBClient.framebuffer_nonblank, timeout=timeout)
    assert ok, "the stream delivered only blank frames"
    return rfb


async def wait_dropped(rfb: RFBClient, timeout: float) -> float:
    """Seconds until the viewer's stream ends (an RFBError or a closed socket)."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            await rfb.request_update(True, timeout=0.5)
        except TimeoutError:
            continue
        except (RFBError, ConnectionError, OSError, EOFError):
            return time.monotonic() - started
        except Exception as exc:  # websockets' ConnectionClosed and friends
            if "closed" in str(exc).lower() or type(exc).__name__.startswith("Connection"):
                return time.monotonic() - started
            raise
    raise AssertionError(f"the viewer's stream was still open after {timeout} s")


# ---- the cluster --------------------------------------------------------------------------------


@dataclass
class Cluster:
    root: Path
    pg_name: str
    pg_dsn: str
    proxy: TcpProxy
    redis: RedisServer
    replicas: list[Replica]
    secret: str
    nginx: Nginx | None = None
    agent: AgentProcess | None = None
    holder: AgentProcess | None = None
    """A real agent in cluster NOWHERE with no capacity: its templates are available there, so
    a session asked for in NOWHERE is accepted and stays `pending`, starting nothing."""
    agent_server: str = ""
    agent_id: str = ""
    admin_token: str = ""
    user_token: str = ""
    clients: list[httpx.Client] = field(default_factory=list)

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def replica_env(cls, secret: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSPACE_")}
        env.update(
            STREAMSPACE_SECRET_KEY=secret,
            STREAMSPACE_ADMIN_PASSWORD=ADMIN_PASSWORD,
            STREAMSPACE_AGENT_HEARTBEAT_SECONDS="1",
            STREAMSPACE_LOOP_INTERVAL_SECONDS="0.5",
            STREAMSPACE_LOGIN_FAILURES_BEFORE_DELAY="1000",
            STREAMSPACE_LOGIN_IP_FAILURES_PER_MINUTE="1000",
            STREAMSPACE_TRUSTED_PROXIES="127.0.0.1",  # as deploy/replicas/run.sh: the nginx
            STREAMSPACE_LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    @property
    def a(self) -> Replica:
        return self.replicas[0]

    @property
    def b(self) -> Replica:
        return self.replicas[1]

    def replica(self, replica_id: str) -> Replica:
        return next(r for r in self.replicas if r.id == replica_id)

    def other(self, replica: Replica) -> Replica:
        return next(r for r in self.replicas if r is not replica)

    def live_url(self) -> str:
        for r in self.replicas:
            if r.alive:
                return r.url
        raise AssertionError("no replica is running")

    # ---- HTTP clients ---------------------------------------------------------------------

    def client(self, url: str, token: str | None = None, timeout: float = 20) -> httpx.Client:
        tok = token if token is not None else self.user_token
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tok}"}, timeout=timeout)
        self.clients.append(c)
        return c

    def admin(self, url: str | None = None) -> httpx.Client:
        return self.client(url or self.live_url(), self.admin_token)

    def login(self, url: str, username: str, password: str) -> str:
        r = httpx.post(
            url + "/api/v1/auth/login",
            json={"username": username, "password": password},
            timeout=20,
        )
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    def bootstrap(self) -> None:
        """Admin + a user with a roomy quota + the small template (tokens work on every
        replica: they are signed with the shared secret)."""
        self.admin_token = self.login(self.a.url, "admin", ADMIN_PASSWORD)
        admin = self.admin(self.a.url)
        r = admin.post(
            "/api/v1/users", json={"username": USER, "password": USER_PASSWORD, "role": "user"}
        )
        assert r.status_code == 201, r.text
        r = admin.put(
            f"/api/v1/users/{USER}/quota",
            json={"max_sessions": 500, "max_cpu_millis": 1_000_000, "max_memory_mb": 10_000_000},
        )
        assert r.status_code == 200, r.text
        r = admin.post("/api/v1/templates", json=SMALL_TEMPLATE)
        assert r.status_code == 201, r.text
        self.user_token = self.login(self.b.url, USER, USER_PASSWORD)
        self.ensure_holder()

    def ensure_holder(self) -> None:
        """Start the holder if it is not running (on replica A, reconnecting when A restarts)
        and wait until sessions may be queued in NOWHERE."""
        if self.holder is None or self.holder.proc is None or self.holder.proc.poll() is not None:
            state_dir = self.root / "holder"
            token = None
            if not (state_dir / "agent.json").exists():
                r = self.admin(self.a.url).post("/api/v1/agents/join-tokens", json={})
                assert r.status_code == 201, r.text
                token = str(r.json()["token"])
            self.holder = AgentProcess(
                self.a.url, state_dir, token, NOWHERE, max_sessions=0, name="holder"
            ).start()

        def available() -> bool:
            r = self.admin(self.live_url()).get(
                f"/api/v1/templates/{SMALL_TEMPLATE['name']}", params={"cluster_id": NOWHERE}
            )
            return r.status_code == 200 and bool(r.json()["available"])

        wait_for(available, 40, what="the holder agent to make NOWHERE available")

    # ---- database (direct, not through the proxy) -----------------------------------------

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(self.pg_dsn, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(query, params)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def agent_listeners(self) -> int:
        """Replicas subscribed to the agent's routing channel (exactly its holder, if any)."""
        return self.redis.subscribers(f"ss:agent:{self.agent_id}")

    def agent_holder(self) -> str:
        rows = self.sql("SELECT connected_replica FROM agents WHERE id = %s", (self.agent_id,))
        return str(rows[0][0]) if rows else ""

    def commands(self, session_id: str) -> list[tuple[str, str, str, int]]:
        return [
            (str(r[0]), str(r[1]), str(r[2]), int(r[3]))
            for r in self.sql(
                "SELECT id, action, status, attempts FROM agent_commands "
                "WHERE session_id = %s ORDER BY created_at",
                (session_id,),
            )
        ]

    # ---- the agent ------------------------------------------------------------------------

    def ensure_agent(self, server: str, holder: str | None = None) -> None:
        """Run the agent against `server` (restarting it if it talks to another URL) and wait
        until it is online with the small template (and held by `holder`, if given)."""
        if self.agent is None or self.agent_server != server or not self.agent_alive:
            if self.agent is not None:
                self.agent.terminate()
            state_dir = self.root / "agent"
            token = None
            if not (state_dir / "agent.json").exists():
                r = self.admin().post("/api/v1/agents/join-tokens", json={})
                assert r.status_code == 201, r.text
                token = str(r.json()["token"])
            self.agent = AgentProcess(server, state_dir, token, "replicas", name="replicas")
            self.agent.start()
            self.agent_server = server

            def enrolled() -> str:
                path = state_dir / "agent.json"
                if not path.exists():
                    return ""
                with contextlib.suppress(ValueError):
                    return str(json.loads(path.read_text()).get("agent_id") or "")
                return ""

            self.agent_id = wait_for(enrolled, 30, what="the agent to enrol")

        def ready() -> bool:
            if not self.agent_alive:
                raise AssertionError(f"the agent exited:\n{tail(self.agent_log_path)}")
            r = self.admin().get(f"/api/v1/agents/{self.agent_id}")
            if r.status_code != 200:
                return False
            body = r.json()
            held_by = self.agent_holder()
            return (
                body["status"] == "online"
                and SMALL_TEMPLATE["name"] in body["templates"]
                and bool(held_by)
                and (holder is None or held_by == holder)
                and self.replica(held_by).alive
            )

        wait_for(ready, 40, what=f"the agent online via {server} (holder {holder or 'any'})")

    @property
    def agent_alive(self) -> bool:
        return (
            self.agent is not None
            and self.agent.proc is not None
            and (self.agent.proc.poll() is None)
        )

    @property
    def agent_log_path(self) -> Path:
        return self.root / "agent.log"

    def agent_log(self) -> str:
        return self.agent.log() if self.agent is not None else ""

    # ---- sessions -------------------------------------------------------------------------

    def create_running(self, c: httpx.Client, timeout: float = 60) -> str:
        r = c.post("/api/v1/sessions", json={"template": SMALL_TEMPLATE["name"]})
        assert r.status_code == 201, r.text
        sid = str(r.json()["id"])
        wait_state_on(c, sid, "running", timeout)
        return sid

    def connect_ticket(self, c: httpx.Client, session_id: str) -> tuple[str, str]:
        r = c.post(f"/api/v1/sessions/{session_id}/connect")
        assert r.status_code == 200, r.text
        body = r.json()
        return str(body["ticket"]), str(body["ws_path"])

    def stop_all_sessions(self, timeout: float = 40) -> list[str]:
        """Stop every active session through the API; returns problems (not raised)."""
        problems: list[str] = []
        try:
            admin = self.admin()
            r = admin.get(
                "/api/v1/sessions", params={"all": "true", "active": "true", "limit": 200}
            )
            if r.status_code != 200:
                return [f"cannot list sessions: {r.status_code} {r.text[:200]}"]
            ids = [s["id"] for s in r.json()["items"]]
            for sid in ids:
                with contextlib.suppress(httpx.HTTPError):
                    admin.delete(f"/api/v1/sessions/{sid}")
            for sid in ids:
                try:
                    wait_state_on(admin, sid, {"stopped", "failed"}, timeout)
                except AssertionError as exc:
                    problems.append(str(exc))
        except Exception as exc:
            problems.append(f"stopping sessions failed: {exc!r}")
        return problems

    # ---- health ---------------------------------------------------------------------------

    def heal(self) -> None:
        """Bring every piece back (a previous test may have killed or stopped some)."""
        if not self.proxy.is_up:
            self.proxy.up()
        if not self.redis.alive:
            self.redis.start()
        dead = [r for r in self.replicas if not r.alive]
        for r in dead:
            r.spawn()
        for r in dead:
            r.wait_ready()
        if self.nginx is not None and not self.nginx.alive:
            self.nginx.start()
        if self.admin_token:
            self.ensure_holder()

    def leaders(self) -> dict[str, float | None]:
        return {r.id: r.metric("streamspace_loop_leader") for r in self.replicas if r.alive}

    def log_tails(self, lines: int = 80) -> str:
        parts = []
        for r in self.replicas:
            parts.append(f"===== {r.id} ({r.log_path}) =====\n{tail(r.log_path, lines)}")
        parts.append(
            f"===== agent ({self.agent_log_path}) =====\n{tail(self.agent_log_path, lines)}"
        )
        parts.append(f"===== redis ({self.redis.log_path}) =====\n{tail(self.redis.log_path, 15)}")
        if self.nginx is not None:
            parts.append(f"===== nginx =====\n{tail(self.nginx.error_log, 20)}")
        return "\n".join(parts)

    # ---- teardown -------------------------------------------------------------------------

    def shutdown(self) -> list[str]:
        errors: list[str] = []
        try:
            self.heal()
        except Exception as exc:
            errors.append(f"could not bring the cluster back for cleanup: {exc!r}")
        if self.agent_alive:
            errors += self.stop_all_sessions()
        if self.agent is not None:
            self.agent.terminate()
        if self.holder is not None:
            self.holder.terminate()
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        for r in self.replicas:
            r.kill()
        if self.nginx is not None:
            self.nginx.stop()
        self.redis.stop()
        self.proxy.close()
        xvnc = processes_under(self.root, xvnc_only=True)
        others = [p for p in processes_under(self.root) if p not in xvnc]
        kill_pids([pid for pid, _ in xvnc + others])
        if xvnc:
            errors.append(f"Xvnc processes left running under {self.root}: {xvnc}")
        if others:
            errors.append(f"processes left running under {self.root}: {others}")
        return errors


def wait_state_on(
    c: httpx.Client, session_id: str, states: set[str] | str, timeout: float = 60
) -> dict[str, Any]:
    """conftest.wait_state, but tolerant of transient 5xx (a replica may be restarting)."""
    wanted = {states} if isinstance(states, str) else states
    last: Any = None

    def check() -> dict[str, Any] | None:
        nonlocal last
        try:
            r = c.get(f"/api/v1/sessions/{session_id}")
        except httpx.HTTPError as exc:
            last = repr(exc)
            return None
        if r.status_code >= 500:
            last = f"{r.status_code} {r.text[:200]}"
            return None
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        last = {k: body.get(k) for k in ("state", "status_message", "failure_reason")}
        if body["state"] == "failed" and "failed" not in wanted:
            raise AssertionError(f"session {session_id} failed: {body.get('failure_reason')}")
        return body if body["state"] in wanted else None

    try:
        return wait_for(check, timeout, 0.2, what=f"session {session_id} in {wanted}")  # type: ignore[no-any-return]
    except AssertionError as exc:
        raise AssertionError(f"{exc} (last seen: {last})") from None


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", int(parts.port or 80)


def count_lines(text: str, *needles: str) -> int:
    return sum(1 for line in text.splitlines() if all(n in line for n in needles))


def started_command_ids(agent_log: str) -> list[str]:
    return re.findall(r"event=command_started .*?command_id=(\S+)", agent_log)


def dump_logs_on_failure(cluster_arg: str = "cluster") -> Callable[[Any], Any]:
    """Decorator: print every log tail (replicas, agent, redis, nginx) when the test fails,
    inside the call phase so pytest shows it under the failing test."""

    def deco(fn: Any) -> Any:
        def dump(kwargs: dict[str, Any]) -> None:
            cl = kwargs.get(cluster_arg)
            if isinstance(cl, Cluster):
                print(cl.log_tails())

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except BaseException:
                    dump(kwargs)
                    raise

            return awrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except BaseException:
                dump(kwargs)
                raise

        return wrapper

    return deco


@contextlib.contextmanager
def timed(limit: float, what: str) -> Iterator[list[float]]:
    """Measure a block; fail if it took longer than `limit` seconds."""
    box: list[float] = []
    started = time.monotonic()
    yield box
    box.append(time.monotonic() - started)
    assert box[0] <= limit, f"{what} took {box[0]:.1f} s (limit {limit} s)"


def pg_dsn_for(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
