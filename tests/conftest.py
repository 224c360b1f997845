"""Shared fixtures: real control planes (uvicorn on a free port), real databases, API clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("STREAMSPACE_TEST_PG", "postgresql://127.0.0.1:5432/test")
ADMIN_PASSWORD = "admin-pass-123"
_skip_notes: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_reachable() -> str | None:
    try:
        import psycopg2

        conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=3)
        conn.close()
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {str(exc).strip()[:120]}"


PG_UNAVAILABLE = _pg_reachable()


def require(reason: str | None) -> None:
    """Skip loudly: the reason is printed in the summary (-ra) and at session end."""
    if reason:
        _skip_notes.append(reason)
        pytest.skip(reason)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _skip_notes:
        terminalreporter.section("skipped because the machine lacks something")
        for note in sorted(set(_skip_notes)):
            terminalreporter.write_line(note)


def make_pg_database() -> tuple[str, str]:
    import psycopg2

    name = f"ss_test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    require(PG_UNAVAILABLE)
    name, url = make_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ss.db'}"
        return
    require(PG_UNAVAILABLE)
    name, url = make_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(name)


class ControlPlane:
    """A real control plane in a background thread (uvicorn + the app, own event loop)."""

    def __init__(self, data_dir: Path, database_url: str = "", **settings: Any) -> None:
        from streamspace.config import Settings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(
            data_dir=data_dir,
            database_url=database_url,
            port=self.port,
            admin_password=ADMIN_PASSWORD,
            secret_key="test-secret-" + uuid.uuid4().hex,
            **settings,
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.app: Any = None
        self._thread: threading.Thread | None = None
        self._agents: list[tuple[Any, Any]] = []

    def start(self) -> ControlPlane:
        import uvicorn

        from streamspace.controlplane.app import create_app

        self.app = create_app(self.settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
            ws="websockets-sansio",
            access_log=False,
            proxy_headers=False,  # as `streamspace up`: only STREAMSPACE_TRUSTED_PROXIES count
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None

        def target() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.serve())
            self.loop.close()

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("control plane did not start")
            time.sleep(0.02)
        return self

    @property
    def state(self) -> Any:
        return self.app.state.ss

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the control plane's loop (for direct DB checks)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        for agent, backend in self._agents:
            if self._thread is not None and self._thread.is_alive():
                self.run(agent.stop(), timeout=20)
                self.run(backend.close(), timeout=20)
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(20)

    def start_full_agent(self, cluster_id: str = "full") -> dict[str, Any]:
        """A real local agent in this process (as `streamspace up` embeds one) that reports the
        templates its host can run but offers no capacity (max_sessions 0): those templates are
        available and a session for one stays `pending`, waiting for capacity, never started.
        Tests of the API use it where no agent at all used to leave sessions pending (creating
        a session no agent can run is now a 409). Returns the agent's row once it is online."""
        from streamspace.agent.runtime import Agent, AgentConfig
        from streamspace.cli.backends import build_backend
        from streamspace.protocol import Capacity

        name = f"full-{len(self._agents)}"
        state_dir = self.settings.data_dir.parent / f"{self.settings.data_dir.name}-{name}"
        state_dir.mkdir(parents=True, exist_ok=True)
        backend = build_backend("local", self.settings, state_dir)
        agent = Agent(
            AgentConfig(
                server=self.url,
                state_dir=state_dir,
                name=name,
                cluster_id=cluster_id,
                cluster_name=f"Cluster {cluster_id}",
                capacity=Capacity(max_sessions=0, cpu_millis=0, memory_mb=0),
                join_token=self.join_token(),
            ),
            backend,
        )

        async def start() -> None:
            asyncio.get_running_loop().create_task(agent.run())

        self.run(start())
        self._agents.append((agent, backend))

        def online() -> dict[str, Any] | None:
            with self.login() as admin:
                rows = admin.get("/api/v1/agents").json()
            row = next((a for a in rows if a["name"] == name), None)
            return row if row and row["status"] == "online" and row["templates"] else None

        return wait_for(online, 30, what=f"agent {name} online with templates (Xvnc, xterm?)")  # type: ignore[no-any-return]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def login(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> httpx.Client:
        with self.client() as c:
            r = c.post("/api/v1/auth/login", json={"username": username, "password": password})
            assert r.status_code == 200, r.text
            return self.client(r.json()["access_token"])

    def create_user(
        self,
        username: str,
        role: str = "user",
        password: str = "user-pass-123",
        quota: dict[str, int] | None = None,
    ) -> httpx.Client:
        with self.login() as admin:
            r = admin.post(
                "/api/v1/users", json={"username": username, "password": password, "role": role}
            )
            assert r.status_code == 201, r.text
            if quota:
                r = admin.put(f"/api/v1/users/{username}/quota", json=quota)
                assert r.status_code == 200, r.text
        return self.login(username, password)

    def join_token(self) -> str:
        with self.login() as admin:
            r = admin.post("/api/v1/agents/join-tokens", json={})
            assert r.status_code == 201, r.text
            return str(r.json()["token"])


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path / "cp").start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def make_control_plane(tmp_path: Path) -> Iterator[Any]:
    started: list[ControlPlane] = []

    def make(database_url: str = "", **settings: Any) -> ControlPlane:
        cp = ControlPlane(tmp_path / f"cp{len(started)}", database_url, **settings).start()
        started.append(cp)
        return cp

    yield make
    for cp in started:
        cp.stop()


class AgentProcess:
    """A real `streamspace agent` process."""

    def __init__(
        self,
        server: str,
        state_dir: Path,
        join_token: str | None,
        cluster_id: str,
        backend: str = "local",
        max_sessions: int = 10,
        name: str | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [
            sys.executable,
            "-m",
            "streamspace.cli",
            "agent",
            "--server",
            server,
            "--state-dir",
            str(state_dir),
            "--cluster-id",
            cluster_id,
            "--cluster-name",
            f"Cluster {cluster_id}",
            "--backend",
            backend,
            "--max-sessions",
            str(max_sessions),
            "--name",
            name or f"agent-{cluster_id}",
            *(extra or []),
        ]
        if join_token:
            self.args += ["--join-token", join_token]
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        self.env = {**os.environ, "STREAMSPACE_AGENT_HEARTBEAT_SECONDS": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
        )
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_for(predicate: Any, timeout: float = 30, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")


def wait_state(
    client: httpx.Client, session_id: str, states: set[str] | str, timeout: float = 60
) -> dict[str, Any]:
    wanted = {states} if isinstance(states, str) else states

    def check() -> dict[str, Any] | None:
        r = client.get(f"/api/v1/sessions/{session_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body if body["state"] in wanted else None

    try:
        return wait_for(check, timeout, what=f"session {session_id} in {wanted}")  # type: ignore[no-any-return]
    except AssertionError:
        body = client.get(f"/api/v1/sessions/{session_id}").json()
        raise AssertionError(f"session never reached {wanted}: {body}") from None


XVNC_MISSING = (
    None
    if shutil.which("Xvnc") and shutil.which("xterm")
    else (
        "TigerVNC Xvnc or xterm is not installed (apt-get install tigervnc-standalone-server xterm)"
    )
)


@pytest.fixture(scope="session")
def podman_service() -> Iterator[Any]:
    """A private `podman system service` (runc, lowered ulimits) with the xterm image built.

    The build is cached by its inputs hash, so only the first run on a machine pays for
    debootstrap. Modules using it skip themselves when podman or root is missing.
    """
    import tempfile

    from streamspace.images import build_images
    from streamspace.podman import start_podman_service

    run_dir = Path(tempfile.mkdtemp(prefix="ss-podman-"))
    service = start_podman_service(run_dir, export=False)
    try:
        started = time.monotonic()
        results = build_images(["xterm"], containers_conf=service.conf_path, progress=print)
        built = [r.name for r in results if r.built]
        print(f"xterm image ready in {time.monotonic() - started:.1f} s (built: {built or 'none'})")
        yield service
    finally:
        service.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


PODMAN_MISSING = (
    "container tests need podman and root (apt-get install -y podman runc debootstrap)"
    if shutil.which("podman") is None or os.geteuid() != 0
    else None
)


KUBE_MISSING = (
    "Kubernetes tests need the Go toolchain to build kube-apiserver and etcd"
    if shutil.which("go") is None
    else None
)


@pytest.fixture(scope="session")
def kube_apiserver() -> Iterator[Any]:
    """A real kube-apiserver + etcd on loopback (RBAC on), shared by the whole run.

    The first run on a machine builds the binaries (scripts/kube-test-binaries.sh); later runs
    reuse them from the cache. Tests share the server, so each works in a namespace of its own.
    """
    require(KUBE_MISSING)
    from streamspace_testing.kube import running_kube_apiserver

    with running_kube_apiserver() as server:
        yield server


@pytest.fixture(scope="session")
def nodeless_kube_apiserver() -> Iterator[Any]:
    """A second API server that no test node ever joins, for tests that play the kubelet
    themselves (they write `pods/status`): on the shared server the session's `k8s_node`,
    once some test has started it, binds and runs every pending pod."""
    require(KUBE_MISSING)
    from streamspace_testing.kube import running_kube_apiserver

    with running_kube_apiserver() as server:
        yield server


@pytest.fixture(scope="session")
def k8s_node(request: pytest.FixtureRequest, kube_apiserver: Any) -> Iterator[Any]:
    """A podman-backed test node (streamspace_testing.k8s_node) registered with the shared
    kube-apiserver: it schedules pending pods onto itself and runs them with podman from the
    locally built images, on a podman network of its own (pod IPs in 10.244.N.0/24).

    Yields the `RunningNode` (`.info`: node name, labels, network, subnet, host IP, default
    StorageClass; `.containers(pod_uid)`). Skips without podman/root or Go.
    """
    require(PODMAN_MISSING)
    from streamspace_testing.k8s_node import RunningNode

    podman_service = request.getfixturevalue("podman_service")
    node = RunningNode(kube_apiserver, podman_service.conf_path)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def slapd() -> Iterator[Any]:
    """A real OpenLDAP slapd with a seeded directory (tests/streamspace_testing/ldap.py), one
    per test: tests change and stop it."""
    from streamspace_testing.ldap import SLAPD_MISSING, running_slapd

    require(SLAPD_MISSING)
    with running_slapd() as server:
        yield server
