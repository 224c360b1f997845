"""The kubernetes backend against a real API server (RBAC on), a namespace per test.

No kubelet or scheduler runs, so the tests write pod status through `pods/status` the way those
components do (scheduled, image pull failures, running with a pod IP), and the backend must act
on it: report progress, fail fast with the kubelet's or scheduler's reason, reach the session's
VNC server at the pod IP (a real Xvnc this test starts on this host's non-loopback address),
hibernate, stop, adopt after a restart, and name the verb RBAC refused.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kube_support import api_client, container_status, eventually, new_namespace, write_status
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from streamspace.agent import vnc
from streamspace.agent.backends.base import BackendError, rfb_answers
from streamspace.agent.backends.kubernetes import KubeConfig, KubernetesBackend, PodSettings
from streamspace.agent.backends.kubernetes.objects import (
    AGENT_LABEL,
    OWNER_ANNOTATION,
    SECRET_PASSWORD_KEY,
    home_claim_name,
    make_pod,
    network_policy_name,
    pod_name,
    secret_name,
)
from streamspace.protocol import ImageLaunch, Resources, SessionSpec
from streamspace_testing.kube import KubeAPIServer

IMAGE = "localhost/streamspace/xterm:latest"
USER_ID = "0f3c9a1b2d4e5f60718293a4b5c6d7e8"


def spec(session_id: str, **overrides: Any) -> SessionSpec:
    fields: dict[str, Any] = {
        "session_id": session_id,
        "user": "alice",
        "user_id": USER_ID,
        "template": "xterm",
        "image": ImageLaunch(image=IMAGE),
        "resources": Resources(cpu_millis=500, memory_mb=256),
    }
    fields.update(overrides)
    return SessionSpec(**fields)


@dataclass
class Cluster:
    server: KubeAPIServer
    core: k8s.CoreV1Api
    admin: k8s.ApiClient
    namespace: str
    tmp_path: Path
    progress: list[tuple[str, str]] = field(default_factory=list)
    backends: list[KubernetesBackend] = field(default_factory=list)

    def backend(
        self, token: str | None = None, agent_id: str = "agent-1", **config: Any
    ) -> KubernetesBackend:
        kubeconfig = self.server.write_kubeconfig(
            self.tmp_path / f"kubeconfig-{uuid.uuid4().hex[:6]}", token, self.namespace
        )
        config.setdefault("start_timeout", 20.0)
        backend = KubernetesBackend(
            agent_id,
            self.tmp_path / "state",
            config=KubeConfig(kubeconfig=str(kubeconfig), **config),
            on_progress=self._progress,
        )
        self.backends.append(backend)
        return backend

    async def _progress(self, session_id: str, message: str) -> None:
        self.progress.append((session_id, message))

    async def pod(self, session_id: str) -> k8s.V1Pod | None:
        try:
            return await self.core.read_namespaced_pod(pod_name(session_id), self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def wait_pod(self, session_id: str) -> k8s.V1Pod:
        result: k8s.V1Pod = await eventually(
            lambda: self.pod(session_id), what=f"pod of {session_id}"
        )
        return result

    async def status(self, session_id: str, **status: Any) -> None:
        await write_status(self.core, self.namespace, pod_name(session_id), **status)


@pytest.fixture
async def cluster(nodeless_kube_apiserver: KubeAPIServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with api_client(nodeless_kube_apiserver, tmp_path) as admin:
        core = k8s.CoreV1Api(admin)
        namespace = await new_namespace(core)
        found = Cluster(nodeless_kube_apiserver, core, admin, namespace, tmp_path)
        try:
            yield found
        finally:
            for backend in found.backends:
                await backend.close()


async def test_start_creates_the_objects_then_fails_fast_on_err_image_pull(
    cluster: Cluster,
) -> None:
    backend = cluster.backend()
    starting = asyncio.create_task(backend.start(spec("s-pull")))
    pod = await cluster.wait_pod("s-pull")

    (container,) = pod.spec.containers
    assert container.image == IMAGE
    assert container.security_context.run_as_non_root is True
    assert container.security_context.allow_privilege_escalation is False
    assert container.security_context.capabilities.drop == ["ALL"]
    assert container.security_context.seccomp_profile.type == "RuntimeDefault"
    assert container.resources.limits == {"cpu": "500m", "memory": "256Mi"}
    assert pod.spec.automount_service_account_token is False
    assert pod.metadata.labels[AGENT_LABEL] == "agent-1"
    assert pod.metadata.annotations[OWNER_ANNOTATION] == "alice"
    password_ref = next(e for e in container.env if e.name == "STREAMSPACE_VNC_PASSWD")
    assert password_ref.value_from.secret_key_ref.name == secret_name("s-pull")
    claim = home_claim_name(USER_ID, "xterm")
    assert any(
        v.persistent_volume_claim and v.persistent_volume_claim.claim_name == claim
        for v in pod.spec.volumes
    )
    assert await cluster.core.read_namespaced_secret(secret_name("s-pull"), cluster.namespace)
    pvc = await cluster.core.read_namespaced_persistent_volume_claim(claim, cluster.namespace)
    assert pvc.spec.resources.requests == {"storage": "10Gi"}
    policy = await k8s.NetworkingV1Api(cluster.admin).read_namespaced_network_policy(
        network_policy_name("agent-1"), cluster.namespace
    )
    assert policy.spec.ingress[0].ports[0].port == 5901
    assert policy.spec.ingress[0]._from[0].pod_selector.match_labels == {
        "app.kubernetes.io/name": "streamspace-agent"
    }

    await cluster.status(
        "s-pull",
        phase="Pending",
        conditions=[{"type": "PodScheduled", "status": "True"}],
        containerStatuses=[container_status(IMAGE, {"waiting": {"reason": "ContainerCreating"}})],
    )
    await eventually(
        lambda: ("s-pull", f"pulling image {IMAGE}") in cluster.progress, what="pull progress"
    )
    assert not starting.done()
    written = time.monotonic()
    await cluster.status(
        "s-pull",
        containerStatuses=[
            container_status(
                IMAGE,
                {"waiting": {"reason": "ErrImagePull", "message": "manifest unknown: nope"}},
            )
        ],
    )
    with pytest.raises(BackendError, match="ErrImagePull: manifest unknown: nope"):
        await asyncio.wait_for(starting, 5)
    assert time.monotonic() - written < 3
    assert [m for s, m in cluster.progress if s == "s-pull"][:2] == [
        f"pod {pod_name('s-pull')} created",
        "scheduled",
    ]
    # The fresh pod that never served is gone; its Secret and the home stay for a retry.
    await eventually(lambda: _none(cluster.pod("s-pull")), what="failed pod deleted")
    assert await cluster.core.read_namespaced_persistent_volume_claim(claim, cluster.namespace)


async def _none(awaitable: Any) -> bool:
    return await awaitable is None


async def test_unschedulable_fails_with_the_scheduler_message(cluster: Cluster) -> None:
    backend = cluster.backend()
    starting = asyncio.create_task(backend.start(spec("s-sched", persistent_home=False)))
    await cluster.wait_pod("s-sched")
    message = "0/3 nodes are available: 3 Insufficient memory. preemption: not helpful."
    await cluster.status(
        "s-sched",
        phase="Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            }
        ],
    )
    with pytest.raises(BackendError) as failed:
        await asyncio.wait_for(starting, 5)
    assert str(failed.value) == f"the session pod cannot be scheduled: {message}"


async def test_a_left_over_failed_pod_is_replaced_on_start(cluster: Cluster) -> None:
    """A pod that will never come up (an agent died while starting it) does not block the
    session forever: the next start replaces it."""
    session = spec("s-left", persistent_home=False)
    manifest = make_pod(
        session,
        agent_id="agent-1",
        namespace=cluster.namespace,
        settings=PodSettings(),
        home_claim=None,
    )
    first = await cluster.core.create_namespaced_pod(cluster.namespace, manifest)
    await cluster.status(
        "s-left",
        phase="Pending",
        containerStatuses=[
            container_status(IMAGE, {"waiting": {"reason": "ImagePullBackOff", "message": "x"}})
        ],
    )
    backend = cluster.backend()
    starting = asyncio.create_task(backend.start(session))

    async def replaced() -> bool:
        pod = await cluster.pod("s-left")
        return pod is not None and pod.metadata.uid != first.metadata.uid

    await eventually(replaced, what="a fresh pod")
    assert not starting.done()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting


async def test_missing_storage_class_fails_before_creating_anything(cluster: Cluster) -> None:
    backend = cluster.backend(storage_class=f"nope-{uuid.uuid4().hex[:6]}")
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"storage class 'nope-\w+' does not exist"):
        await backend.start(spec("s-class"))
    assert time.monotonic() - started < 5
    assert await cluster.pod("s-class") is None

    existing = f"fast-{uuid.uuid4().hex[:6]}"
    await k8s.StorageV1Api(cluster.admin).create_storage_class(
        {"metadata": {"name": existing}, "provisioner": "example.com/none"}
    )
    good = cluster.backend(storage_class=existing, start_timeout=1.0)
    with pytest.raises(BackendError, match="did not answer within"):
        await good.start(spec("s-class"))  # gets past the check; nothing runs the pod
    claim = await cluster.core.read_namespaced_persistent_volume_claim(
        home_claim_name(USER_ID, "xterm"), cluster.namespace
    )
    assert claim.spec.storage_class_name == existing


# ---- a session that really serves VNC at its pod IP ------------------------------------------


def host_address() -> str | None:
    """A non-loopback IPv4 address of this host, standing in for a pod IP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def xvnc_at(tmp_path: Path) -> Iterator[Any]:
    if shutil.which("Xvnc") is None:
        pytest.skip("TigerVNC Xvnc is not installed")
    procs: list[subprocess.Popen[bytes]] = []

    def start(address: str, port: int, password: bytes) -> None:
        passwd = tmp_path / f"passwd-{port}"
        passwd.write_bytes(vnc.obfuscated_password(password))
        passwd.chmod(0o600)
        display = next(
            n for n in range(300 + os.getpid() % 300, 1000) if not Path(f"/tmp/.X{n}-lock").exists()
        )
        procs.append(
            subprocess.Popen(
                [
                    "Xvnc",
                    f":{display}",
                    "-geometry",
                    "640x480",
                    "-rfbport",
                    str(port),
                    "-interface",
                    address,
                    "-SecurityTypes",
                    "VncAuth",
                    "-PasswordFile",
                    str(passwd),
                    "-nolisten",
                    "tcp",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


async def running_status(cluster: Cluster, session_id: str, address: str) -> None:
    await cluster.status(
        session_id,
        phase="Running",
        podIP=address,
        podIPs=[{"ip": address}],
        conditions=[{"type": "PodScheduled", "status": "True"}],
        containerStatuses=[
            container_status(IMAGE, {"running": {"startedAt": "2026-01-01T00:00:00Z"}}, True)
        ],
    )


async def start_with_xvnc(
    cluster: Cluster, xvnc_at: Any, session_id: str
) -> tuple[KubernetesBackend, asyncio.Task[Any], str, int]:
    """A start in progress (backend, its task, the address and port) whose pod has a real Xvnc
    at a host address standing in for its IP, serving the password the agent put in the
    Secret (as the image does); no status yet."""
    address = host_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to stand in for a pod IP")
    port = free_port(address)
    backend = cluster.backend(pod=PodSettings(vnc_port=port))
    task = asyncio.create_task(backend.start(spec(session_id)))
    await cluster.wait_pod(session_id)
    secret = await eventually(
        lambda: cluster.core.read_namespaced_secret(secret_name(session_id), cluster.namespace),
        what="the session secret",
    )
    xvnc_at(address, port, base64.b64decode(secret.data[SECRET_PASSWORD_KEY]))
    return backend, task, address, port


async def test_vnc_answering_before_the_status_says_running_is_not_ready_yet(
    cluster: Cluster, xvnc_at: Any
) -> None:
    """The agent probes the port from the moment the pod has an address, but reports ready
    only once the pod's status says the container runs, so what `status` and `open_vnc` read
    from the cache agrees with the endpoint start returned."""
    backend, starting, address, port = await start_with_xvnc(cluster, xvnc_at, "s-early")
    await eventually(lambda: rfb_answers(port, host=address), what="Xvnc listening")
    await cluster.status(
        "s-early",
        phase="Pending",
        podIP=address,
        podIPs=[{"ip": address}],
        conditions=[{"type": "PodScheduled", "status": "True"}],
        containerStatuses=[container_status(IMAGE, {"waiting": {"reason": "ContainerCreating"}})],
    )
    done, _ = await asyncio.wait({starting}, timeout=1.0)
    assert not done, "start returned before the pod's status said its container runs"
    assert (await backend.status("s-early")).endpoint is None

    await running_status(cluster, "s-early", address)
    endpoint = await asyncio.wait_for(starting, 10)
    assert (endpoint.host, endpoint.port) == (address, port)
    assert (await backend.status("s-early")).endpoint == endpoint
    messages = [m for s, m in cluster.progress if s == "s-early"]
    assert messages[-2:] == ["container started", "VNC ready"]
    await backend.stop("s-early")


async def test_running_session_serves_vnc_then_hibernates_wakes_stops_and_is_adopted(
    cluster: Cluster, xvnc_at: Any
) -> None:
    backend, starting, address, port = await start_with_xvnc(cluster, xvnc_at, "s-run")
    await running_status(cluster, "s-run", address)
    endpoint = await asyncio.wait_for(starting, 15)
    assert (endpoint.host, endpoint.port) == (address, port)
    messages = [m for s, m in cluster.progress if s == "s-run"]
    assert messages[-2:] == ["container started", "VNC ready"]

    # The viewer is offered security type None; the agent did the VNC Authentication.
    reader, writer = await backend.open_vnc("s-run")
    banner = await asyncio.wait_for(reader.read(12), 5)
    assert banner == b"RFB 003.008\n"
    writer.write(b"RFB 003.008\n")
    assert await asyncio.wait_for(reader.read(2), 5) == b"\x01\x01"
    writer.close()

    (item,) = await backend.inventory()
    assert (item.session_id, item.state, item.user) == ("s-run", "running", "alice")

    # A restarted agent (new object, same id, fresh state dir) adopts the pod and watches it.
    await backend.close()
    adopted = cluster.backend()
    adopted.config = KubeConfig(
        kubeconfig=adopted.config.kubeconfig, pod=PodSettings(vnc_port=port)
    )
    exits: list[tuple[str, str]] = []

    async def on_exit(session_id: str, reason: str) -> None:
        exits.append((session_id, reason))

    await adopted.watch_exits(on_exit)
    assert [(i.session_id, i.state) for i in await adopted.inventory()] == [("s-run", "running")]
    assert (await adopted.status("s-run")).endpoint == endpoint
    reader, writer = await adopted.open_vnc("s-run")  # its password comes from the Secret
    assert await asyncio.wait_for(reader.read(12), 5) == b"RFB 003.008\n"
    writer.close()

    # The app exits: the kubelet marks the pod Failed and the agent hears of it at once.
    await cluster.status(
        "s-run",
        phase="Failed",
        containerStatuses=[
            container_status(IMAGE, {"terminated": {"exitCode": 3, "reason": "Error"}})
        ],
    )
    await eventually(lambda: exits, within=5, what="exit reported")
    assert exits == [("s-run", "app exited with code 3")]
    assert (await adopted.status("s-run")).state == "exited"

    # Wake replaces the finished pod; hibernate deletes the pod and keeps Secret and home.
    waking = asyncio.create_task(adopted.wake(spec("s-run")))
    await eventually(
        lambda: _phase_is(cluster.pod("s-run"), "Pending"), what="a fresh pod for the wake"
    )
    await running_status(cluster, "s-run", address)
    await asyncio.wait_for(waking, 15)
    await adopted.hibernate("s-run")
    await eventually(lambda: _none(cluster.pod("s-run")), what="pod deleted on hibernate")
    assert (await adopted.status("s-run")).state == "hibernated"
    assert await cluster.core.read_namespaced_secret(secret_name("s-run"), cluster.namespace)
    claim = home_claim_name(USER_ID, "xterm")
    assert await cluster.core.read_namespaced_persistent_volume_claim(claim, cluster.namespace)
    assert exits == [("s-run", "app exited with code 3")]  # deleting it ourselves is no exit

    await adopted.stop("s-run")
    assert (await adopted.status("s-run")).state == "stopped"
    with pytest.raises(ApiException) as gone:
        await cluster.core.read_namespaced_secret(secret_name("s-run"), cluster.namespace)
    assert gone.value.status == 404
    assert await cluster.core.read_namespaced_persistent_volume_claim(claim, cluster.namespace)
    assert await adopted.inventory() == []


async def _phase_is(awaitable: Any, phase: str) -> bool:
    pod = await awaitable
    return pod is not None and pod.status.phase == phase and not pod.status.pod_ip


async def test_remove_unknown_stops_sessions_the_control_plane_does_not_know(
    cluster: Cluster,
) -> None:
    backend = cluster.backend(start_timeout=0.5)
    for session_id in ("s-keep", "s-drop"):
        with pytest.raises(BackendError):
            await backend.start(spec(session_id, persistent_home=False))
    # Both failed starts left their Secrets: the sessions are known (hibernated).
    assert {i.session_id for i in await backend.inventory()} == {"s-keep", "s-drop"}
    assert await backend.remove_unknown({"s-keep"}) == ["s-drop"]
    assert [i.session_id for i in await backend.inventory()] == ["s-keep"]


# ---- RBAC ------------------------------------------------------------------------------------

AGENT_RULES = [
    ("", "pods", ["get", "list", "watch", "delete"]),  # no create
    ("", "secrets", ["get", "list", "watch", "create", "delete"]),
    ("", "persistentvolumeclaims", ["get", "create"]),
    ("networking.k8s.io", "networkpolicies", ["get", "create", "update"]),
]


async def test_rbac_refusal_names_the_verb_and_resource(cluster: Cluster) -> None:
    core, rbac = cluster.core, k8s.RbacAuthorizationV1Api(cluster.admin)
    await core.create_namespaced_service_account(
        cluster.namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="agent"))
    )
    await rbac.create_namespaced_role(
        cluster.namespace,
        k8s.V1Role(
            metadata=k8s.V1ObjectMeta(name="agent"),
            rules=[
                k8s.V1PolicyRule(api_groups=[group], resources=[resource], verbs=verbs)
                for group, resource, verbs in AGENT_RULES
            ],
        ),
    )
    await rbac.create_namespaced_role_binding(
        cluster.namespace,
        k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name="agent"),
            role_ref=k8s.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="agent"
            ),
            subjects=[
                k8s.RbacV1Subject(kind="ServiceAccount", name="agent", namespace=cluster.namespace)
            ],
        ),
    )
    minted = await core.create_namespaced_service_account_token(
        "agent",
        cluster.namespace,
        k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(expiration_seconds=600)),
    )
    backend = cluster.backend(token=minted.status.token)
    failure = ""
    for _ in range(50):  # RBAC authorizes from an informer: the binding applies a moment later
        try:
            await backend.start(spec("s-rbac"))
        except BackendError as exc:
            failure = str(exc)
            if "create pods" in failure:
                break
            await backend.close()
            backend = cluster.backend(token=minted.status.token)
            await asyncio.sleep(0.1)
    assert failure.startswith(
        f"Kubernetes RBAC forbids the agent to create pods in namespace '{cluster.namespace}'"
    ), failure
    assert f"system:serviceaccount:{cluster.namespace}:agent" in failure
    assert await cluster.pod("s-rbac") is None
    # What the Role does allow went through: the Secret exists.
    assert await core.read_namespaced_secret(secret_name("s-rbac"), cluster.namespace)


async def test_a_token_that_cannot_list_pods_is_unhealthy_with_the_reason(
    cluster: Cluster,
) -> None:
    await cluster.core.create_namespaced_service_account(
        cluster.namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="nobody"))
    )
    minted = await cluster.core.create_namespaced_service_account_token(
        "nobody", cluster.namespace, k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec())
    )
    backend = cluster.backend(token=minted.status.token)
    healthy, detail = await backend.healthy()
    assert not healthy
    assert detail.startswith("Kubernetes RBAC forbids the agent to list pods"), detail


def test_vnc_password_bytes_match_the_entrypoint_format() -> None:
    """The Secret's printf form is what entrypoint.sh turns into the vncpasswd file."""
    password = b"Abcdefgh"
    octal = "".join(f"\\{b:03o}" for b in vnc.obfuscated_password(password))
    printed = subprocess.run(["sh", "-c", f"printf '{octal}'"], capture_output=True, check=True)
    assert printed.stdout == vnc.obfuscated_password(password)
