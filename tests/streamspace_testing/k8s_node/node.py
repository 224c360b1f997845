"""The test node itself: registers a Node, keeps it Ready, and runs the scheduler and the kubelet
halves off one watch of all pods.

Its pods get addresses on a podman network it creates (10.244.N.0/24, the first free N), so pod
IPs are routable from this host and are not loopback; the network's gateway is the node's
InternalIP and every pod's hostIP. `stop()` removes every container and the network it made,
the Node and its Lease, the StorageClass if it created it, and its state directory (claims'
data included).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.config import new_client_from_config

from streamspace.images import image_ref
from streamspace.logs import get_logger

from .api import Kube
from .engine import CONTAINER_LABEL, INFRA, NODE_LABEL, EngineError, Podman
from .fit import Capacity, quantity
from .kubelet import NodeContext, PodWorker
from .scheduler import Scheduler, needs_scheduling
from .status import micro_now, now

Obj = dict[str, Any]
LEASE_NAMESPACE = "kube-node-lease"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
CNI_CONFIG_DIR = Path("/etc/cni/net.d")
"""Where podman's CNI backend keeps its networks (the project's containers.conf keeps the
default); podman re-reads the directory when it changes."""
log = get_logger(__name__)


class ApiServer(Protocol):
    def write_kubeconfig(
        self, path: Path, token: str | None = None, namespace: str = ""
    ) -> Path: ...


@dataclass
class NodeConfig:
    name: str = "ss-test-node"
    labels: Mapping[str, str] = field(default_factory=dict)
    cpu: str = "4"
    memory: str = "8Gi"
    max_pods: int = 110
    storage_class: str = "streamspace-test"
    """Created as the cluster's default class (WaitForFirstConsumer) unless it exists."""
    infra_image: str = image_ref("rootfs")
    """What runs each pod's sandbox (`sleep infinity`); the session images' base rootfs."""
    heartbeat_seconds: float = 10.0
    subnet_prefix: str = "10.244"


class TestNode:
    """Use as `async with TestNode(server, containers_conf) as node:`."""

    def __init__(
        self, server: ApiServer, containers_conf: Path, config: NodeConfig | None = None
    ) -> None:
        self.server = server
        self.config = config or NodeConfig()
        self.podman = Podman(containers_conf)
        self.node_id = uuid.uuid4().hex[:10]
        self.network = f"ss-k8s-{self.node_id}"
        self.subnet = ""
        self.host_ip = ""
        self.state_dir = Path(tempfile.mkdtemp(prefix="ss-k8s-node-"))
        self.pods: dict[str, Obj] = {}
        self.workers: dict[str, PodWorker] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._exits: dict[str, asyncio.Future[None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._client: ApiClient | None = None
        self._created_class = False
        self.kube: Kube | None = None

    @property
    def labels(self) -> dict[str, str]:
        return {
            "kubernetes.io/hostname": self.config.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.config.labels,
        }

    async def __aenter__(self) -> TestNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        try:
            kubeconfig = self.server.write_kubeconfig(self.state_dir / "kubeconfig")
            self._client = await new_client_from_config(config_file=str(kubeconfig))
            self.kube = Kube(self._client)
            await self.podman.start(self.state_dir / "podman")
            await self._create_network()
            await self._register()
            ctx = NodeContext(
                kube=self.kube,
                podman=self.podman,
                node_id=self.node_id,
                host_ip=self.host_ip,
                network=self.network,
                state_dir=self.state_dir,
                infra_image=self.config.infra_image,
                expect_exit=self._expect_exit,
            )
            self._ctx = ctx
            self.scheduler = Scheduler(
                self.kube,
                node_name=self.config.name,
                labels=self.labels,
                capacity=Capacity(
                    quantity(self.config.cpu), quantity(self.config.memory), self.config.max_pods
                ),
                pods=lambda: list(self.pods.values()),
                claims_dir=self.state_dir / "claims",
            )
            for coro in (
                self._watch_exits(),
                self._poll_exits(),
                self._heartbeat(),
                self.scheduler.run(),
                self.kube.watch("/api/v1/pods", self._on_pod),
            ):
                self._tasks.append(asyncio.create_task(coro))
            log.event(
                "k8s_node.started", node=self.config.name, network=self.network, subnet=self.subnet
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await asyncio.gather(
            *(w.stop(0, finish_deletion=False) for w in self.workers.values()),
            *self._stopping.values(),
            return_exceptions=True,
        )
        self.workers.clear()
        if self.podman.serving:
            ids = await self.podman.container_ids(f"{NODE_LABEL}={self.node_id}")
            infra = await self.podman.container_ids(
                f"{NODE_LABEL}={self.node_id}", f"{CONTAINER_LABEL}={INFRA}"
            )
            await self.podman.remove([i for i in ids if i not in infra])
            await self.podman.remove(infra)
        if self.subnet:
            await self.podman.run("network", "rm", "-f", self.network)
        if self.kube is not None:
            with contextlib.suppress(Exception):
                await self.kube.delete(f"/api/v1/nodes/{self.config.name}")
                await self.kube.delete(self._lease_path)
                if self._created_class:
                    await self.kube.delete(
                        f"/apis/storage.k8s.io/v1/storageclasses/{self.config.storage_class}"
                    )
        if self._client is not None:
            await self._client.close()
            self._client = None
        await self.podman.close()
        await asyncio.to_thread(shutil.rmtree, self.state_dir, True)

    # ---- setup ------------------------------------------------------------------------------

    async def _create_network(self) -> None:
        """The first /24 of the prefix no podman network uses; another test node creating one
        at the same moment makes podman refuse the overlap, and the next one is tried."""
        used = [ipaddress.ip_network(s, strict=False) for s in await self.podman.network_subnets()]
        for third in range(256):
            candidate = ipaddress.ip_network(f"{self.config.subnet_prefix}.{third}.0/24")
            if any(candidate.overlaps(u) for u in used):
                continue
            created = await self.podman.run(
                "network", "create", "--subnet", str(candidate),
                "--label", f"{NODE_LABEL}={self.node_id}", self.network,
            )  # fmt: skip
            if created.returncode == 0:
                self.subnet = str(candidate)
                self.host_ip = str(next(candidate.hosts()))
                await asyncio.to_thread(
                    kubenet_plugins, CNI_CONFIG_DIR / f"{self.network}.conflist"
                )
                return
            log.event("k8s_node.subnet_taken", subnet=str(candidate), error=created.stderr[-200:])
        raise RuntimeError(f"no free /24 left in {self.config.subnet_prefix}.0.0/16")

    @property
    def _lease_path(self) -> str:
        return (
            f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.config.name}"
        )

    def _node_status(self) -> Obj:
        resources = {
            "cpu": self.config.cpu,
            "memory": self.config.memory,
            "pods": str(self.config.max_pods),
        }
        stamp = now()

        def condition(kind: str, status: str, reason: str, message: str) -> Obj:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": self._started_at,
            }

        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                condition(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                condition(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "kubelet has no disk pressure",
                ),
                condition(
                    "PIDPressure",
                    "False",
                    "KubeletHasSufficientPID",
                    "kubelet has sufficient PID available",
                ),
                condition(
                    "Ready",
                    "True",
                    "KubeletReady",
                    "kubelet is posting ready status (streamspace podman test node)",
                ),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.config.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": self.node_id,
                "systemUUID": self.node_id,
                "bootID": self.node_id,
                "kernelVersion": "",
                "osImage": "streamspace podman test node",
                "containerRuntimeVersion": "podman://",
                "kubeletVersion": "v0.0.0-test",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    async def _register(self) -> None:
        assert self.kube is not None
        self._started_at = now()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.config.name, "labels": self.labels},
            "spec": {"podCIDR": self.subnet, "podCIDRs": [self.subnet]},
        }
        created = await self.kube.create("/api/v1/nodes", node)
        if created is None:
            raise RuntimeError(f"a Node named {self.config.name} exists already on this server")
        await self.kube.patch(
            f"/api/v1/nodes/{self.config.name}/status", {"status": self._node_status()}
        )
        await self.kube.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": LEASE_NAMESPACE}},
        )
        await self.kube.create(
            f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases",
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.config.name,
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Node",
                            "name": self.config.name,
                            "uid": created["metadata"]["uid"],
                        }
                    ],
                },
                "spec": {
                    "holderIdentity": self.config.name,
                    "leaseDurationSeconds": 40,
                    "renewTime": micro_now(),
                },
            },
        )
        storage_class = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": self.config.storage_class,
                "annotations": {DEFAULT_CLASS_ANNOTATION: "true"},
            },
            "provisioner": "streamspace.org/podman-test-node",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
        }
        path = "/apis/storage.k8s.io/v1/storageclasses"
        self._created_class = await self.kube.create(path, storage_class) is not None

    async def _heartbeat(self) -> None:
        assert self.kube is not None
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                await self.kube.patch(
                    f"/api/v1/nodes/{self.config.name}/status", {"status": self._node_status()}
                )
                await self.kube.patch(self._lease_path, {"spec": {"renewTime": micro_now()}})
            except Exception as exc:
                log.event("k8s_node.heartbeat_failed", error=str(exc)[:200])

    # ---- container exits --------------------------------------------------------------------

    def _expect_exit(self, container_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._exits[container_id] = future
        return future

    def _exited(self, container_id: str) -> None:
        future = self._exits.pop(container_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def _watch_exits(self) -> None:
        while True:
            async for event in self.podman.events(f"{NODE_LABEL}={self.node_id}"):
                if event.get("Status") in ("died", "remove"):
                    self._exited(str(event.get("ID", "")))
            await asyncio.sleep(0.5)

    async def _poll_exits(self) -> None:
        """A safety net for events podman did not deliver (e.g. while its stream restarted)."""
        while True:
            await asyncio.sleep(5)
            if not self._exits:
                continue
            try:
                states = await self.podman.container_states(f"{NODE_LABEL}={self.node_id}")
            except EngineError as exc:
                log.event("k8s_node.exit_poll_failed", error=str(exc)[:200])
                continue
            for container_id in list(self._exits):
                if states.get(container_id, "exited") != "running":
                    self._exited(container_id)

    # ---- pods -------------------------------------------------------------------------------

    async def _on_pod(self, kind: str, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid = meta["uid"]
        if kind == "DELETED":
            self.pods.pop(uid, None)
            self._retire(uid, 0, finish_deletion=False)
            return
        self.pods[uid] = pod
        if needs_scheduling(pod):
            self.scheduler.wake.set()
            return
        if spec.get("nodeName") != self.config.name:
            return
        if meta.get("deletionTimestamp"):
            grace = int(meta.get("deletionGracePeriodSeconds") or 0)
            if uid in self.workers or uid not in self._stopping:
                self._retire(uid, grace, finish_deletion=True, pod=pod)
            return
        worker = self.workers.get(uid)
        if worker is not None:
            worker.pod = pod
        elif uid not in self._stopping and (pod.get("status") or {}).get("phase") not in (
            "Succeeded",
            "Failed",
        ):
            worker = PodWorker(self._ctx, pod)
            self.workers[uid] = worker
            worker.start()

    def _retire(
        self, uid: str, grace: int, *, finish_deletion: bool, pod: Obj | None = None
    ) -> None:
        worker = self.workers.pop(uid, None)
        if worker is None and pod is not None and finish_deletion:
            worker = PodWorker(self._ctx, pod)
        if worker is None or uid in self._stopping:
            return

        async def retire() -> None:
            try:
                await worker.stop(grace, finish_deletion)
            except Exception:
                log.exception("k8s_node.pod_stop_failed", pod=f"{worker.namespace}/{worker.name}")
            finally:
                self._stopping.pop(uid, None)

        self._stopping[uid] = asyncio.create_task(retire())


def kubenet_plugins(conflist: Path) -> bool:
    """Cut the network podman made down to what kubenet, Kubernetes' basic network plugin,
    configured: a bridge that is the pods' gateway, with host-local addresses. podman adds
    portmap, firewall and tuning plugins and masquerading, each an iptables or sysctl pass on
    every sandbox start and stop (about 0.15 s of each here); these pods need none of them (no
    hostPorts, nothing beyond the host, which is their gateway). False when the network is not
    a CNI file there (another network backend), which is then left as podman made it."""
    try:
        config = json.loads(conflist.read_text())
    except (OSError, ValueError):
        return False
    bridge = next((p for p in config.get("plugins") or [] if p.get("type") == "bridge"), None)
    if bridge is None:
        return False
    config["plugins"] = [{**bridge, "ipMasq": False}]
    staged = conflist.with_name(f".{conflist.name}.new")
    staged.write_text(json.dumps(config, indent=1))
    staged.replace(conflist)
    return True
