"""The kubernetes backend runs a session with nothing but the chart's Role.

The chart's default manifests are applied to the shared real kube-apiserver (the podman test
node runs its pods), a token is minted through the TokenRequest API for the chart's agent
ServiceAccount, and the backend, authenticated only by that token, starts a session (pod,
Secret, home claim, NetworkPolicies), reaches its VNC server at the pod IP, hibernates, wakes
and stops it. Then one verb goes from the applied Role and the API server refuses the agent:
the session fails with an error naming that verb and resource.

The namespace gets its `default` ServiceAccount from the test (a controller-manager would make
it): session pods run under it, with no token mounted.
"""

from __future__ import annotations

import asyncio
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from kube_support import api_client
from kubernetes_asyncio import client as k8s
from test_helm_apply import agent_token, helm, install  # noqa: F401 (helm is a fixture)
from test_kube_backend import spec

from conftest import PODMAN_MISSING, require
from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.kubernetes import KubeConfig, KubernetesBackend
from streamspace.agent.backends.kubernetes.objects import home_claim_name, pod_name
from streamspace_testing.helm import find, server_side_apply
from streamspace_testing.kube import KubeAPIServer

pytestmark = pytest.mark.podman


async def _role_applies(backend_call: Any, wanted: str, attempts: int = 100) -> str:
    """RBAC authorizes from an informer cache: a changed Role applies a moment later."""
    for _ in range(attempts):
        try:
            await backend_call()
        except BackendError as exc:
            if wanted in str(exc):
                return str(exc)
        await asyncio.sleep(0.1)
    raise AssertionError(f"the agent was never refused: {wanted}")


async def test_the_agent_runs_a_session_with_only_the_charts_role(
    kube_apiserver: KubeAPIServer, k8s_node: Any, helm: Path, tmp_path: Path
) -> None:
    require(PODMAN_MISSING)
    async with api_client(kube_apiserver, tmp_path) as admin:
        namespace, objects, _ = await install(admin, helm)
        core = k8s.CoreV1Api(admin)
        await core.create_namespaced_service_account(
            namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default"))
        )
        token = await agent_token(admin, namespace)
        kubeconfig = kube_apiserver.write_kubeconfig(tmp_path / "agent", token, namespace)
        progress: list[str] = []

        async def on_progress(session_id: str, message: str) -> None:
            progress.append(message)

        backend = KubernetesBackend(
            "chart-agent",
            tmp_path / "state",
            config=KubeConfig(
                kubeconfig=str(kubeconfig),
                storage_class=k8s_node.info.storage_class,  # checked: the ClusterRole's get
                start_timeout=60.0,
            ),
            on_progress=on_progress,
        )
        try:
            endpoint = await backend.start(spec("s-chart"))
            assert ip_address(endpoint.host) in ip_network(k8s_node.info.subnet)
            pod = await core.read_namespaced_pod(pod_name("s-chart"), namespace)
            assert pod.spec.node_name == k8s_node.info.name
            assert progress[0] == f"pod {pod_name('s-chart')} created"
            assert f"scheduled on node {k8s_node.info.name}" in progress
            assert progress[-1] == "VNC ready"
            reader, writer = await backend.open_vnc("s-chart")
            assert await asyncio.wait_for(reader.read(12), 5) == b"RFB 003.008\n"
            writer.write(b"RFB 003.008\n")  # the session's password was accepted behind it
            assert await asyncio.wait_for(reader.read(2), 5) == b"\x01\x01"
            writer.close()

            await backend.hibernate("s-chart")
            assert (await backend.status("s-chart")).state == "hibernated"
            await backend.wake(spec("s-chart"))
            assert (await backend.status("s-chart")).state == "running"
            await backend.stop("s-chart")
            assert (await backend.status("s-chart")).state == "stopped"
            claim = home_claim_name(spec("s-chart").user_id, "xterm")
            assert await core.read_namespaced_persistent_volume_claim(claim, namespace)

            role = find(objects, "Role")
            for rule in role["rules"]:
                if rule["resources"] == ["secrets"]:
                    rule["verbs"].remove("create")
            await server_side_apply(admin, role)
            failure = await _role_applies(
                lambda: backend.start(spec("s-refused")), "create secrets"
            )
            assert failure.startswith(
                f"Kubernetes RBAC forbids the agent to create secrets in namespace '{namespace}'"
            ), failure
            assert f"system:serviceaccount:{namespace}:ss-streamspace-agent" in failure
            assert "grant the agent's Role `create` on `secrets`" in failure
            # Nothing of the refused session was made; the agent still reads its pods.
            assert (await backend.status("s-refused")).state == "unknown"
            assert await backend.healthy() == (True, "")
        finally:
            await backend.close()
