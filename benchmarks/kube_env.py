"""A control plane with one kubernetes-backend agent, for the pod benchmarks.

The cluster is what the tests run against: a real kube-apiserver + etcd on loopback
(scripts/kube-test-binaries.sh) and the podman test node from tests/streamspace_testing/k8s_node
playing kubelet and scheduler (it binds each pod and runs its container with podman). No real
kubelet, container runtime interface or CNI is involved: say so next to any figure."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import agent_process, login, product


async def new_namespace(kubeconfig: Path) -> str:
    """A namespace with its `default` ServiceAccount (no controller-manager makes one here)."""
    import uuid

    from kubernetes_asyncio import client as k8s
    from kubernetes_asyncio.config import new_client_from_config

    name = f"ss-bench-{uuid.uuid4().hex[:8]}"
    api = await new_client_from_config(config_file=str(kubeconfig))
    try:
        core = k8s.CoreV1Api(api)
        await core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        await core.create_namespaced_service_account(
            name, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default"))
        )
    finally:
        await api.close()
    return name


@dataclass(frozen=True)
class KubeProduct:
    url: str
    kubeconfig: Path
    namespace: str

    async def settled(self, timeout: float = 60.0) -> None:
        """Until the namespace has no pods: a stopped session's pod is deleted from the API
        at once, but the node (like a kubelet) removes its containers after that, and a run
        that starts meanwhile would be timed against that teardown. The docker backend
        removes its container before stop returns, so its runs need no such wait."""
        from kubernetes_asyncio import client as k8s
        from kubernetes_asyncio.config import new_client_from_config

        api = await new_client_from_config(config_file=str(self.kubeconfig))
        try:
            core = k8s.CoreV1Api(api)
            deadline = time.monotonic() + timeout
            while (await core.list_namespaced_pod(self.namespace)).items:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pods in {self.namespace} still there after {timeout}s")
                await asyncio.sleep(0.05)
        finally:
            await api.close()


@contextmanager
def kube_product(templates: list[str]) -> Iterator[KubeProduct]:
    from streamspace.images import build_images
    from streamspace.podman import start_podman_service
    from streamspace_testing.k8s_node import RunningNode
    from streamspace_testing.kube import running_kube_apiserver

    run_dir = Path(tempfile.mkdtemp(prefix="ss-bench-kube-"))
    service = start_podman_service(run_dir, export=False)
    try:
        build_images(templates, containers_conf=service.conf_path, progress=None)
        with running_kube_apiserver() as server:
            node = RunningNode(server, service.conf_path)
            node.start()
            try:
                admin = server.write_kubeconfig(run_dir / "admin-kubeconfig")
                namespace = asyncio.run(new_namespace(admin))
                agent = server.write_kubeconfig(run_dir / "agent-kubeconfig", None, namespace)
                with (
                    product("server") as url,
                    agent_process(
                        url,
                        login(url),
                        "pods",
                        run_dir / "agent",
                        ["--backend", "kubernetes", "--namespace", namespace],
                        env={"STREAMSPACE_KUBE_KUBECONFIG": str(agent)},
                    ),
                ):
                    yield KubeProduct(url, admin, namespace)
            finally:
                node.stop()
    finally:
        service.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
