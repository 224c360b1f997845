"""One contract, every backend: what `agent/backends/base.py` promises, run against each real
backend (local: Xvnc + xterm in the sandbox; docker: podman's Docker API with the xterm image;
kubernetes: the real kube-apiserver with the podman test node running the xterm image's pods).

Each test gets `harness`, parametrized over `HARNESSES`; a backend whose machinery this host
lacks is skipped, saying why. To join, a backend provides a `Harness` subclass and one entry in
`HARNESSES`; the subclass says:

* `open(request, tmp_path)`: check the host can run it (else `pytest.skip`), take the fixtures
  it needs (`request.getfixturevalue`, e.g. `podman_service` or `kube_apiserver`);
* `new_backend()`: a backend object over the harness's state, polling for exits quickly; a
  second call is the same agent restarted (same state dir / agent label / namespace);
* `spec(command)`: a session of the xterm template running `command` as its app (None: xterm);
* `read_home(backend, spec, name)`: a file of the session's persistent home, read from outside;
* `cleanup(backend)`: remove everything the test left (sessions, homes, volumes, objects).

The session's app writes into its own home through `$HOME` (see `COUNTER`), so "the home
survives hibernate" is checked the way a user would notice it, for every backend alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from conftest import PODMAN_MISSING, XVNC_MISSING
from streamspace.agent.backends.base import Backend
from streamspace.protocol import ImageLaunch, LocalLaunch, SessionSpec

XTERM_ARGS = ["xterm", "-geometry", "80x24+0+0"]
COUNTER = [
    "sh",
    "-c",
    'n=$(cat "$HOME/starts" 2>/dev/null || echo 0); echo $((n + 1)) > "$HOME/starts"; exec xterm',
]
"""An app that counts its starts in the home: 2 after a wake means the first write survived."""


class Harness:
    kind: ClassVar[str]

    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "state"
        self.user_id = uuid.uuid4().hex
        self.user = f"u{self.user_id[:8]}"

    @classmethod
    async def open(cls, request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
        raise NotImplementedError

    def new_backend(self) -> Backend:
        raise NotImplementedError

    def spec(self, command: list[str] | None = None) -> SessionSpec:
        raise NotImplementedError

    async def read_home(self, backend: Backend, spec: SessionSpec, name: str) -> str:
        raise NotImplementedError

    async def cleanup(self, backend: Backend) -> None:
        await backend.remove_unknown(set())

    def session_id(self) -> str:
        return f"t-{uuid.uuid4().hex[:10]}"


class LocalHarness(Harness):
    kind = "local"

    @classmethod
    async def open(cls, request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
        if XVNC_MISSING:
            pytest.skip(XVNC_MISSING)
        return cls(tmp_path)

    def new_backend(self) -> Backend:
        from streamspace.agent.backends.local import LocalBackend

        backend = LocalBackend(self.state_dir, display_base=260, poll_interval=0.2)
        if backend.plan.problem:
            pytest.skip(f"local sessions cannot run here: {backend.plan.problem}")
        return backend

    def spec(self, command: list[str] | None = None) -> SessionSpec:
        return SessionSpec(
            session_id=self.session_id(),
            user_id=self.user_id,
            user=self.user,
            template="xterm",
            local=LocalLaunch(command=command or XTERM_ARGS),
        )

    async def read_home(self, backend: Backend, spec: SessionSpec, name: str) -> str:
        from streamspace.agent.backends.local import LocalBackend

        assert isinstance(backend, LocalBackend)
        return await asyncio.to_thread((backend.home_for(spec) / name).read_text)


class DockerHarness(Harness):
    kind = "docker"

    def __init__(self, tmp_path: Path, podman: Any) -> None:
        super().__init__(tmp_path)
        import docker

        from docker_support import Leftovers

        self.podman = podman
        self.engine = docker.DockerClient(base_url=podman.docker_host)
        self.agent_id = f"contract-{uuid.uuid4().hex[:8]}"
        self.leftovers = Leftovers(agent_ids={self.agent_id}, user_ids={self.user_id})

    @classmethod
    async def open(cls, request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
        if PODMAN_MISSING:
            pytest.skip(PODMAN_MISSING)
        return cls(tmp_path, request.getfixturevalue("podman_service"))

    def new_backend(self) -> Backend:
        from streamspace.agent.backends.docker import DockerBackend

        return DockerBackend(
            self.podman.docker_host, self.agent_id, self.state_dir, poll_interval=0.3
        )

    def spec(self, command: list[str] | None = None) -> SessionSpec:
        from docker_support import XTERM, new_spec

        return new_spec(
            self.user,
            self.user_id,
            session_id=self.session_id(),
            image=ImageLaunch(image=XTERM, command=command),
        )

    async def read_home(self, backend: Backend, spec: SessionSpec, name: str) -> str:
        from docker_support import HOME, exec_in

        code, out = await asyncio.to_thread(
            exec_in, self.engine, spec.session_id, ["cat", f"{HOME}/{name}"]
        )
        assert code == 0, out
        return out

    async def cleanup(self, backend: Backend) -> None:
        try:
            await super().cleanup(backend)
        finally:
            await asyncio.to_thread(self.leftovers.sweep, self.engine)
            self.engine.close()


class KubernetesHarness(Harness):
    """A namespace of its own on the shared API server; the test node runs the pods, and the
    home is read from the node's directory of the session's claim."""

    kind = "kubernetes"

    def __init__(self, tmp_path: Path, server: Any, node: Any, admin: Any, namespace: str) -> None:
        super().__init__(tmp_path)
        self.node = node
        self.admin = admin
        self.namespace = namespace
        self.agent_id = f"contract-{uuid.uuid4().hex[:8]}"
        self.kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", None, namespace)

    @classmethod
    async def open(cls, request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
        if PODMAN_MISSING:
            pytest.skip(PODMAN_MISSING)
        from kube_support import new_namespace
        from kubernetes_asyncio import client as k8s
        from kubernetes_asyncio.config import new_client_from_config

        server = request.getfixturevalue("kube_apiserver")
        node = request.getfixturevalue("k8s_node")
        admin = await new_client_from_config(
            config_file=str(server.write_kubeconfig(tmp_path / "admin-kubeconfig"))
        )
        namespace = await new_namespace(k8s.CoreV1Api(admin))
        return cls(tmp_path, server, node, admin, namespace)

    def new_backend(self) -> Backend:
        from streamspace.agent.backends.kubernetes import KubeConfig, KubernetesBackend

        config = KubeConfig(kubeconfig=str(self.kubeconfig), start_timeout=60.0)
        return KubernetesBackend(self.agent_id, self.state_dir, config=config)

    def spec(self, command: list[str] | None = None) -> SessionSpec:
        from docker_support import XTERM, new_spec

        return new_spec(
            self.user,
            self.user_id,
            session_id=self.session_id(),
            image=ImageLaunch(image=XTERM, command=command),
        )

    async def read_home(self, backend: Backend, spec: SessionSpec, name: str) -> str:
        from kubernetes_asyncio import client as k8s

        from streamspace.agent.backends.kubernetes.objects import home_claim_name

        claim = await k8s.CoreV1Api(self.admin).read_namespaced_persistent_volume_claim(
            home_claim_name(spec.user_id, spec.template), self.namespace
        )
        path = self.node.node.state_dir / "claims" / claim.metadata.uid / name
        return await asyncio.to_thread(path.read_text)

    async def cleanup(self, backend: Backend) -> None:
        from kubernetes_asyncio import client as k8s

        core = k8s.CoreV1Api(self.admin)
        try:
            await super().cleanup(backend)
        finally:
            await core.delete_collection_namespaced_pod(self.namespace, grace_period_seconds=0)
            await core.delete_collection_namespaced_secret(self.namespace)
            await core.delete_collection_namespaced_persistent_volume_claim(self.namespace)
            await self.admin.close()


HARNESSES: dict[str, type[Harness]] = {
    "local": LocalHarness,
    "docker": DockerHarness,
    "kubernetes": KubernetesHarness,
}


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    return await HARNESSES[request.param].open(request, tmp_path)


class Backends:
    """The harness's backend objects; a restart closes the current one and opens the next."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.current = harness.new_backend()

    async def restart(self) -> Backend:
        await self.current.close()
        self.current = self.harness.new_backend()
        return self.current


@pytest.fixture
async def backends(harness: Harness) -> AsyncIterator[Backends]:
    held = Backends(harness)
    try:
        yield held
    finally:
        try:
            await harness.cleanup(held.current)
        finally:
            await held.current.close()


@pytest.fixture
def backend(backends: Backends) -> Backend:
    return backends.current


async def rfb_banner(backend: Backend, session_id: str) -> bytes:
    """The first 12 bytes a viewer gets through the backend's connection (the contract's
    stream offers only `read`)."""
    reader, writer = await backend.open_vnc(session_id)
    banner = b""
    try:
        async with asyncio.timeout(10):
            while len(banner) < 12 and (chunk := await reader.read(12 - len(banner))):
                banner += chunk
    finally:
        writer.close()
    return banner


# ---- the contract -------------------------------------------------------------------------


async def test_start_is_idempotent(backend: Backend, harness: Harness) -> None:
    spec = harness.spec()
    endpoint = await backend.start(spec)
    assert await backend.start(spec) == endpoint
    items = await backend.inventory()
    assert [(i.session_id, i.state, i.endpoint) for i in items] == [
        (spec.session_id, "running", endpoint)
    ]
    status = await backend.status(spec.session_id)
    assert (status.state, status.endpoint, status.template) == ("running", endpoint, "xterm")


async def test_open_vnc_answers_rfb(backend: Backend, harness: Harness) -> None:
    spec = harness.spec()
    await backend.start(spec)
    assert (await rfb_banner(backend, spec.session_id)).startswith(b"RFB 003.")


async def test_stop_is_idempotent_and_stopping_the_unknown_succeeds(
    backend: Backend, harness: Harness
) -> None:
    spec = harness.spec()
    await backend.start(spec)
    await backend.stop(spec.session_id)
    await backend.stop(spec.session_id)
    assert (await backend.status(spec.session_id)).state == "stopped"
    assert await backend.inventory() == []
    await backend.stop(harness.session_id())  # never seen here


async def test_status_of_a_session_never_seen_is_unknown(
    backend: Backend, harness: Harness
) -> None:
    item = await backend.status(harness.session_id())
    assert (item.state, item.endpoint) == ("unknown", None)


async def test_hibernate_twice_then_wake_runs_again(backend: Backend, harness: Harness) -> None:
    spec = harness.spec()
    await backend.start(spec)
    await backend.hibernate(spec.session_id)
    await backend.hibernate(spec.session_id)
    item = await backend.status(spec.session_id)
    assert (item.state, item.endpoint) == ("hibernated", None)
    assert [(i.session_id, i.state) for i in await backend.inventory()] == [
        (spec.session_id, "hibernated")
    ]
    endpoint = await backend.wake(spec)
    item = await backend.status(spec.session_id)
    assert (item.state, item.endpoint) == ("running", endpoint)
    assert (await rfb_banner(backend, spec.session_id)).startswith(b"RFB 003.")


async def test_home_survives_hibernate(backend: Backend, harness: Harness) -> None:
    spec = harness.spec(COUNTER)
    await backend.start(spec)
    assert (await eventually_read(harness, backend, spec, "starts")).strip() == "1"
    await backend.hibernate(spec.session_id)
    await backend.wake(spec)
    assert (await eventually_read(harness, backend, spec, "starts", "2")).strip() == "2"


async def test_a_restarted_backend_sees_the_running_session(
    backends: Backends, harness: Harness
) -> None:
    spec = harness.spec()
    endpoint = await backends.current.start(spec)
    restarted = await backends.restart()
    items = await restarted.inventory()
    assert [(i.session_id, i.state, i.endpoint, i.user) for i in items] == [
        (spec.session_id, "running", endpoint, harness.user)
    ]
    assert await restarted.start(spec) == endpoint  # adopted, not started again
    assert (await rfb_banner(restarted, spec.session_id)).startswith(b"RFB 003.")


async def test_exit_watch_reports_an_app_that_exits(backend: Backend, harness: Harness) -> None:
    reports: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def on_exit(session_id: str, reason: str) -> None:
        await reports.put((session_id, reason))

    await backend.watch_exits(on_exit)
    spec = harness.spec(["sh", "-c", "sleep 3; exit 3"])
    await backend.start(spec)
    session_id, reason = await asyncio.wait_for(reports.get(), 30)
    assert session_id == spec.session_id
    assert "exited with code 3" in reason
    assert (await backend.status(spec.session_id)).state != "running"
    await asyncio.sleep(1.0)
    assert reports.empty()  # once


async def test_exit_watch_is_silent_for_what_the_agent_asked(
    backend: Backend, harness: Harness
) -> None:
    reports: list[tuple[str, str]] = []

    async def on_exit(session_id: str, reason: str) -> None:
        reports.append((session_id, reason))

    await backend.watch_exits(on_exit)
    hibernated, stopped = harness.spec(), harness.spec()
    await asyncio.gather(backend.start(hibernated), backend.start(stopped))
    await asyncio.sleep(1.0)  # seen running by the watch
    await backend.hibernate(hibernated.session_id)
    await backend.stop(stopped.session_id)
    await asyncio.sleep(1.5)
    assert reports == []


async def test_remove_unknown_removes_what_is_not_kept(backend: Backend, harness: Harness) -> None:
    kept, unknown = harness.spec(), harness.spec()
    await asyncio.gather(backend.start(kept), backend.start(unknown))
    await backend.hibernate(kept.session_id)
    assert await backend.remove_unknown({kept.session_id}) == [unknown.session_id]
    assert [i.session_id for i in await backend.inventory()] == [kept.session_id]
    assert (await backend.status(unknown.session_id)).state == "stopped"
    assert await backend.remove_unknown(set()) == [kept.session_id]
    assert await backend.inventory() == []


# ---- helpers ------------------------------------------------------------------------------


async def eventually_read(
    harness: Harness,
    backend: Backend,
    spec: SessionSpec,
    name: str,
    expected: str | None = None,
    timeout: float = 10.0,
) -> str:
    """The app writes its file a moment after the display is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        text = ""
        with contextlib.suppress(OSError, AssertionError):
            text = await harness.read_home(backend, spec, name)
        if text.strip() and (expected is None or text.strip() == expected):
            return text
        if loop.time() > deadline:
            return text
        await asyncio.sleep(0.1)
