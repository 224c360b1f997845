"""The podman test node makes the real API server's pods real: they get bound, run from the
locally built images, answer on a non-loopback pod IP, and report what a kubelet reports.

Everything goes through the API server as a client would (create, read status, delete); only
`containers()` looks behind it at podman, to prove a deleted pod's container is gone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.config import new_client_from_config

from streamspace.agent import vnc
from streamspace.images import image_ref
from streamspace_testing.k8s_node import RunningNode
from streamspace_testing.k8s_node.api import Kube, ns_path
from streamspace_testing.k8s_node.node import CNI_CONFIG_DIR
from streamspace_testing.kube import KubeAPIServer

pytestmark = pytest.mark.podman

XTERM = image_ref("xterm")
ROOTFS = image_ref("rootfs")
PASSWORD = b"k8s-node"
VNC_PASSWD = "".join(f"\\{b:03o}" for b in vnc.obfuscated_password(PASSWORD))
Obj = dict[str, Any]


@pytest.fixture
async def kube(kube_apiserver: KubeAPIServer, tmp_path: Path) -> AsyncIterator[Kube]:
    client = await new_client_from_config(
        config_file=str(kube_apiserver.write_kubeconfig(tmp_path / "kubeconfig"))
    )
    try:
        yield Kube(client)
    finally:
        await client.close()


@pytest.fixture
async def namespace(kube: Kube) -> AsyncIterator[str]:
    """A namespace of the test's own; its pods are deleted afterwards (no namespace controller
    runs, so deleting the namespace would not stop them), so none keeps crash-looping."""
    name = f"node-{uuid.uuid4().hex[:10]}"
    await kube.create("/api/v1/namespaces", {"metadata": {"name": name}})
    await kube.create(ns_path(name, "serviceaccounts"), {"metadata": {"name": "default"}})
    yield name
    await kube.delete(ns_path(name, "pods"), {"gracePeriodSeconds": 0})


def pod(name: str, image: str = ROOTFS, command: list[str] | None = None, **spec: Any) -> Obj:
    container: Obj = {"name": "main", "image": image}
    if command:
        container["command"] = command
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [container],
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 2,
            **spec,
        },
    }


async def wait_pod(
    kube: Kube,
    namespace: str,
    name: str,
    check: Callable[[Obj], Any],
    timeout: float = 30.0,
    what: str = "",
) -> Obj:
    deadline = time.monotonic() + timeout
    last: Obj | None = None
    while time.monotonic() < deadline:
        last = await kube.get(ns_path(namespace, "pods", name))
        if last is not None and check(last):
            return last
        await asyncio.sleep(0.2)
    status = (last or {}).get("status")
    raise AssertionError(f"pod {name} never got {what or check} in {timeout} s: {status}")


def condition(pod: Obj, kind: str) -> Obj:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return {}


def ready(pod: Obj) -> bool:
    return condition(pod, "Ready").get("status") == "True"


def state(pod: Obj) -> Obj:
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    return dict(statuses[0].get("state") or {})


def waiting_reason(pod: Obj) -> str:
    return str((state(pod).get("waiting") or {}).get("reason") or "")


async def delete_and_wait(kube: Kube, namespace: str, name: str, timeout: float = 30.0) -> None:
    await kube.delete(ns_path(namespace, "pods", name))
    deadline = time.monotonic() + timeout
    while await kube.get(ns_path(namespace, "pods", name)) is not None:
        assert time.monotonic() < deadline, f"pod {name} was never deleted"
        await asyncio.sleep(0.2)


async def test_node_is_registered_ready_with_capacity_and_a_lease(
    k8s_node: RunningNode, kube: Kube
) -> None:
    info = k8s_node.info
    node = await kube.get(f"/api/v1/nodes/{info.name}")
    assert node is not None
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == info.name
    assert node["status"]["capacity"]["pods"] == "110"
    assert {"cpu", "memory"} <= set(node["status"]["allocatable"])
    assert condition(node, "Ready")["status"] == "True"
    address = ipaddress.ip_address(node["status"]["addresses"][0]["address"])
    assert not address.is_loopback and address in ipaddress.ip_network(info.subnet)
    lease = await kube.get(
        f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{info.name}"
    )
    assert lease is not None and lease["spec"]["holderIdentity"] == info.name
    # The pods' network is kubenet's: a bridge and its addresses, no per-start iptables work.
    conflist = json.loads((CNI_CONFIG_DIR / f"{info.network}.conflist").read_text())
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["bridge"]


async def test_session_image_pod_runs_serves_rfb_on_its_ip_and_deletion_removes_it(
    k8s_node: RunningNode, kube: Kube, namespace: str
) -> None:
    await kube.create(
        ns_path(namespace, "secrets"),
        {"metadata": {"name": "vnc"}, "stringData": {"passwd": VNC_PASSWD}},
    )
    env = [
        {
            "name": "STREAMSPACE_VNC_PASSWD",
            "valueFrom": {"secretKeyRef": {"name": "vnc", "key": "passwd"}},
        }
    ]
    await kube.create(
        ns_path(namespace, "persistentvolumeclaims"),
        {
            "metadata": {"name": "desk-home"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    # Shaped like the kubernetes backend's session pods: non-root, hardened, limits, a memory
    # /dev/shm, the home on a claim (group-writable through fsGroup), a fixed hostname.
    limits = {"cpu": "500m", "memory": "384Mi"}
    desk = pod(
        "desk",
        XTERM,
        container={
            "env": env,
            "imagePullPolicy": "IfNotPresent",
            "ports": [{"name": "vnc", "containerPort": 5901}],
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "allowPrivilegeEscalation": False,
                "privileged": False,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "resources": {"requests": limits, "limits": limits},
            "volumeMounts": [
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "home", "mountPath": "/home/streamspace"},
            ],
        },
        restartPolicy="Never",
        enableServiceLinks=False,
        hostname="streamspace",
        securityContext={"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        volumes=[
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "96Mi"}},
            {"name": "home", "persistentVolumeClaim": {"claimName": "desk-home"}},
        ],
    )
    started = time.monotonic()
    created = await kube.request("POST", ns_path(namespace, "pods"), desk)
    uid = created["metadata"]["uid"]

    running = await wait_pod(kube, namespace, "desk", ready, what="Ready")
    print(f"desk pod Ready {time.monotonic() - started:.2f} s after create")
    assert running["spec"]["nodeName"] == k8s_node.info.name
    status = running["status"]
    assert status["phase"] == "Running"
    assert condition(running, "PodScheduled")["status"] == "True"
    assert condition(running, "ContainersReady")["status"] == "True"
    assert "startedAt" in status["containerStatuses"][0]["state"]["running"]
    pod_ip = ipaddress.ip_address(status["podIP"])
    assert not pod_ip.is_loopback
    assert pod_ip in ipaddress.ip_network(k8s_node.info.subnet)
    assert status["podIPs"] == [{"ip": status["podIP"]}]
    assert status["hostIP"] == k8s_node.info.host_ip

    # Xvnc in the pod, on its IP, with VNC Authentication by the password from the Secret.
    reader, writer = await asyncio.wait_for(
        _connect_when_listening(status["podIP"], 5901), timeout=20
    )
    try:
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"RFB 003.008\n"
        writer.write(b"RFB 003.008\n")
        count = (await asyncio.wait_for(reader.readexactly(1), 5))[0]
        assert list(await reader.readexactly(count)) == [2]
        writer.write(b"\x02")
        challenge = await asyncio.wait_for(reader.readexactly(16), 5)
        writer.write(vnc.des_response(PASSWORD, challenge))
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\0\0\0\0"
    finally:
        writer.close()

    [container] = k8s_node.containers(uid)
    assert container["State"] == "running"
    # The securityContext and limits as the kernel applies them to the container's PID 1.
    proc = dict(
        line.split(":\t", 1)
        for line in k8s_node.exec(container["Id"], "cat", "/proc/1/status").splitlines()
        if ":\t" in line
    )
    assert proc["Uid"].split()[:2] == ["1000", "1000"]
    assert proc["Gid"].split()[0] == "1000" and "1000" in proc["Groups"].split()
    assert proc["NoNewPrivs"] == "1"
    assert int(proc["CapEff"], 16) == 0 and int(proc["CapBnd"], 16) == 0
    assert proc["Seccomp"] == "2"  # RuntimeDefault: a filter
    memory = k8s_node.exec(
        container["Id"],
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory.max 2>/dev/null"
        " || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v2, else v1
    ).strip()
    assert memory == str(384 * 2**20)
    await delete_and_wait(kube, namespace, "desk")
    assert k8s_node.containers(uid, include_sandbox=True) == []


async def _connect_when_listening(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    while True:
        try:
            return await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.2)


async def test_missing_image_reports_err_image_pull_within_seconds(
    k8s_node: RunningNode, kube: Kube, namespace: str
) -> None:
    started = time.monotonic()
    missing = "localhost/streamspace/no-such-image:latest"
    await kube.request("POST", ns_path(namespace, "pods"), pod("nope", missing))
    failing = await wait_pod(
        kube,
        namespace,
        "nope",
        lambda p: waiting_reason(p) in ("ErrImagePull", "ImagePullBackOff"),
        timeout=10,
    )
    assert time.monotonic() - started < 10
    assert missing in state(failing)["waiting"]["message"]
    assert failing["status"]["phase"] == "Pending"
    backoff = await wait_pod(
        kube, namespace, "nope", lambda p: waiting_reason(p) == "ImagePullBackOff", timeout=10
    )
    assert state(backoff)["waiting"]["message"] == f'Back-off pulling image "{missing}"'


async def test_claim_data_survives_pod_delete_and_recreate(
    k8s_node: RunningNode, kube: Kube, namespace: str
) -> None:
    claim = {
        "metadata": {"name": "home"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    created = await kube.request("POST", ns_path(namespace, "persistentvolumeclaims"), claim)
    # No class named: the DefaultStorageClass admission plugin gave it the node's default one.
    assert created["spec"]["storageClassName"] == k8s_node.info.storage_class
    volumes = [{"name": "home", "persistentVolumeClaim": {"claimName": "home"}}]
    user = {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
    mounts = {"volumeMounts": [{"name": "home", "mountPath": "/data"}]}
    writer = pod(
        "writer",
        command=["/bin/sh", "-c", "echo kept > /data/note && sleep infinity"],
        volumes=volumes,
        securityContext=user,
        container=mounts,
    )
    await kube.request("POST", ns_path(namespace, "pods"), writer)
    await wait_pod(kube, namespace, "writer", ready, what="Ready")
    bound = await kube.get(ns_path(namespace, "persistentvolumeclaims", "home"))
    assert bound is not None and bound["status"]["phase"] == "Bound"
    await delete_and_wait(kube, namespace, "writer")

    reader = pod(
        "reader",
        command=["/bin/sh", "-c", 'test "$(cat /data/note)" = kept'],
        volumes=volumes,
        securityContext=user,
        restartPolicy="Never",
        container=mounts,
    )
    await kube.request("POST", ns_path(namespace, "pods"), reader)
    done = await wait_pod(
        kube, namespace, "reader", lambda p: p["status"]["phase"] in ("Succeeded", "Failed")
    )
    assert state(done)["terminated"]["exitCode"] == 0, done["status"]
    assert done["status"]["phase"] == "Succeeded"

    # Deleting the claim completes once no live pod uses it (the PVC-protection finalizer is
    # removed for the controller-manager that does not run here).
    holder = pod("holder", command=["sleep", "infinity"], volumes=volumes, container=mounts)
    await kube.request("POST", ns_path(namespace, "pods"), holder)
    await wait_pod(kube, namespace, "holder", ready, what="Ready")
    claim_path = ns_path(namespace, "persistentvolumeclaims", "home")
    await kube.delete(claim_path)
    await asyncio.sleep(1.5)
    held = await kube.get(claim_path)
    assert held is not None and "kubernetes.io/pvc-protection" in held["metadata"]["finalizers"]
    await delete_and_wait(kube, namespace, "holder")
    deadline = time.monotonic() + 10
    while await kube.get(claim_path) is not None:
        assert time.monotonic() < deadline, "the claim was never released"
        await asyncio.sleep(0.2)


async def test_unschedulable_pods_get_the_schedulers_reason(
    k8s_node: RunningNode, kube: Kube, namespace: str
) -> None:
    claim = {
        "metadata": {"name": "fast"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "no-such-class",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    await kube.request("POST", ns_path(namespace, "persistentvolumeclaims"), claim)
    cases = {
        "picky": (
            pod("picky", nodeSelector={"disktype": "ssd"}),
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.",
        ),
        "greedy": (
            pod("greedy", container={"resources": {"requests": {"cpu": "64"}}}),
            "0/1 nodes are available: 1 Insufficient cpu.",
        ),
        "orphan": (
            pod("orphan", volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "gone"}}]),
            '0/1 nodes are available: persistentvolumeclaim "gone" not found.',
        ),
        "classless": (
            pod(
                "classless", volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "fast"}}]
            ),
            "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims.",
        ),
    }
    for body, _ in cases.values():
        await kube.request("POST", ns_path(namespace, "pods"), body)
    for name, (_, message) in cases.items():
        stuck = await wait_pod(
            kube,
            namespace,
            name,
            lambda p: condition(p, "PodScheduled").get("reason") == "Unschedulable",
            timeout=10,
        )
        scheduled = condition(stuck, "PodScheduled")
        assert scheduled["status"] == "False"
        assert scheduled["message"].startswith(message), scheduled["message"]
        assert "nodeName" not in stuck["spec"]
        assert stuck["status"]["phase"] == "Pending"

    # What it waited for appears: the pod is scheduled on the next round.
    await kube.request(
        "POST",
        ns_path(namespace, "persistentvolumeclaims"),
        {
            **claim,
            "metadata": {"name": "gone"},
            "spec": {**claim["spec"], "storageClassName": k8s_node.info.storage_class},
        },
    )
    await wait_pod(kube, namespace, "orphan", lambda p: p["spec"].get("nodeName"), timeout=10)


async def test_restart_policies_and_crash_loop_back_off(
    k8s_node: RunningNode, kube: Kube, namespace: str
) -> None:
    failing = ["/bin/sh", "-c", "echo cannot go on >&2; exit 3"]
    logs_on_error = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    once = pod("once", command=failing, restartPolicy="Never", container=logs_on_error)
    await kube.request("POST", ns_path(namespace, "pods"), once)
    await kube.request(
        "POST", ns_path(namespace, "pods"), pod("fine", command=["true"], restartPolicy="OnFailure")
    )
    await kube.request("POST", ns_path(namespace, "pods"), pod("loop", command=failing))

    once = await wait_pod(kube, namespace, "once", lambda p: p["status"]["phase"] == "Failed")
    terminated = state(once)["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert terminated["message"] == "cannot go on"
    fine = await wait_pod(kube, namespace, "fine", lambda p: p["status"]["phase"] == "Succeeded")
    assert state(fine)["terminated"]["reason"] == "Completed"
    loop = await wait_pod(
        kube, namespace, "loop", lambda p: waiting_reason(p) == "CrashLoopBackOff", timeout=30
    )
    status = loop["status"]["containerStatuses"][0]
    assert status["restartCount"] >= 2
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert loop["status"]["phase"] == "Running"
    assert not ready(loop)


async def test_container_config_errors_are_reported_as_the_kubelet_does(
    k8s_node: RunningNode, kube: Kube, namespace: str
) -> None:
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    await kube.request("POST", ns_path(namespace, "pods"), pod("nosecret", container={"env": env}))
    await kube.request(
        "POST",
        ns_path(namespace, "pods"),
        pod("rooty", command=["sleep", "60"], securityContext={"runAsNonRoot": True}),
    )
    missing = await wait_pod(
        kube, namespace, "nosecret", lambda p: waiting_reason(p) == "CreateContainerConfigError"
    )
    assert state(missing)["waiting"]["message"] == 'secret "absent" not found'
    root = await wait_pod(
        kube, namespace, "rooty", lambda p: waiting_reason(p) == "CreateContainerConfigError"
    )
    assert (
        "container has runAsNonRoot and image will run as root" in state(root)["waiting"]["message"]
    )


async def test_init_containers_run_first_and_a_failed_one_fails_the_pod(
    k8s_node: RunningNode, kube: Kube, namespace: str
) -> None:
    shared = {"volumeMounts": [{"name": "work", "mountPath": "/work"}]}
    volumes = [{"name": "work", "emptyDir": {}}]

    def init(command: str) -> dict[str, Any]:
        return {"name": "prepare", "image": ROOTFS, "command": ["/bin/sh", "-c", command], **shared}

    ordered = pod(
        "ordered",
        command=["/bin/sh", "-c", "test -f /work/ready"],
        initContainers=[init("sleep 1; touch /work/ready")],
        volumes=volumes,
        restartPolicy="Never",
        container=shared,
    )
    broken = pod(
        "broken",
        command=["true"],
        initContainers=[init("exit 7")],
        volumes=volumes,
        restartPolicy="Never",
        container=shared,
    )
    for body in (ordered, broken):
        await kube.request("POST", ns_path(namespace, "pods"), body)

    initializing = await wait_pod(
        kube, namespace, "ordered", lambda p: "initContainerStatuses" in p["status"]
    )
    assert waiting_reason(initializing) == "PodInitializing"
    assert condition(initializing, "Initialized")["status"] == "False"
    done = await wait_pod(
        kube, namespace, "ordered", lambda p: p["status"]["phase"] in ("Succeeded", "Failed")
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert condition(done, "Initialized")["status"] == "True"
    first = done["status"]["initContainerStatuses"][0]
    assert first["state"]["terminated"]["exitCode"] == 0 and first["ready"]

    failed = await wait_pod(kube, namespace, "broken", lambda p: p["status"]["phase"] == "Failed")
    assert failed["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert waiting_reason(failed) == "PodInitializing"
