"""Two Kubernetes clusters behind one control plane (issue 13 part 6).

Each "cluster" is a real kube-apiserver + etcd of its own with a podman test node of its own
(its own podman network, so the two clusters' pod IPs differ). One `streamspace agent
--backend kubernetes` runs against each, enrolled with a distinct cluster id. Sessions created
with a `cluster_id` are placed by the scheduler on that cluster's agent, their pods exist in
that cluster only, and both stream the app's pixels through the one control plane's tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from kube_support import new_namespace
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import new_client_from_config
from test_docker_e2e import _stream_nonblank

from conftest import PODMAN_MISSING, AgentProcess, require, wait_for, wait_state
from streamspace.agent.backends.kubernetes.objects import pod_name

pytestmark = pytest.mark.podman


@dataclass
class Cluster:
    cluster_id: str
    admin_config: Path
    namespace: str
    node: Any
    agent: AgentProcess | None = None


@pytest.fixture(scope="module")
def second_cluster(podman_service: Any) -> Iterator[tuple[Any, Any]]:
    """Another API server with a test node of its own: a second cluster."""
    require(PODMAN_MISSING)
    from streamspace_testing.k8s_node import NodeConfig, RunningNode
    from streamspace_testing.kube import running_kube_apiserver

    with running_kube_apiserver() as server:
        node = RunningNode(server, podman_service.conf_path, NodeConfig(name="ss-west-node"))
        node.start()
        try:
            yield server, node
        finally:
            node.stop()


async def _admin(kubeconfig: Path, call: str, *args: Any) -> Any:
    api = await new_client_from_config(config_file=str(kubeconfig))
    try:
        core = k8s.CoreV1Api(api)
        if call == "new_namespace":
            return await new_namespace(core)
        return await getattr(core, call)(*args)
    finally:
        await api.close()


def _pod(cluster: Cluster, session_id: str) -> Any:
    try:
        return asyncio.run(
            _admin(
                cluster.admin_config, "read_namespaced_pod", pod_name(session_id), cluster.namespace
            )
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_sessions_go_to_the_requested_cluster_and_both_stream(
    make_control_plane: Any,
    kube_apiserver: Any,
    k8s_node: Any,
    second_cluster: tuple[Any, Any],
    tmp_path: Path,
) -> None:
    west_server, west_node = second_cluster
    assert west_node.info.subnet != k8s_node.info.subnet
    cp = make_control_plane(agent_heartbeat_seconds=1.0, loop_interval_seconds=0.5)
    admin = cp.login()
    clusters: list[Cluster] = []
    for cluster_id, server, node in (
        ("east", kube_apiserver, k8s_node),
        ("west", west_server, west_node),
    ):
        admin_config = server.write_kubeconfig(tmp_path / f"{cluster_id}-admin")
        namespace = asyncio.run(_admin(admin_config, "new_namespace"))
        cluster = Cluster(cluster_id, admin_config, namespace, node)
        cluster.agent = AgentProcess(
            cp.url,
            tmp_path / f"agent-{cluster_id}",
            cp.join_token(),
            cluster_id,
            backend="kubernetes",
            extra=["--namespace", namespace],
            env={
                "STREAMSPACE_KUBE_KUBECONFIG": str(
                    server.write_kubeconfig(tmp_path / f"{cluster_id}-agent", None, namespace)
                ),
                "STREAMSPACE_KUBE_START_TIMEOUT_SECONDS": "60",
            },
        ).start()
        clusters.append(cluster)
    try:
        wait_for(
            lambda: (
                {
                    a["cluster_id"]
                    for a in admin.get("/api/v1/agents").json()
                    if a["status"] == "online" and "xterm" in a["templates"]
                }
                >= {"east", "west"}
            ),
            60,
            what="both kubernetes agents online",
        )
        sessions: dict[str, str] = {}
        for cluster in reversed(clusters):
            r = admin.post(
                "/api/v1/sessions", json={"template": "xterm", "cluster_id": cluster.cluster_id}
            )
            assert r.status_code == 201, r.text
            sessions[cluster.cluster_id] = r.json()["id"]
        for east, west in (clusters, clusters[::-1]):
            sid = sessions[east.cluster_id]
            s = wait_state(admin, sid, {"running", "failed"}, 120)
            assert (s["state"], s["cluster_id"]) == ("running", east.cluster_id), s
            pod = _pod(east, sid)
            assert pod is not None and pod.spec.node_name == east.node.info.name
            assert ip_address(pod.status.pod_ip) in ip_network(east.node.info.subnet)
            assert _pod(west, sid) is None
        for cluster_id, sid in sessions.items():
            assert _stream_nonblank(cp, admin, sid), f"no pixels from the {cluster_id} session"
        for sid in sessions.values():
            assert admin.delete(f"/api/v1/sessions/{sid}").status_code == 202
        for cluster in clusters:
            sid = sessions[cluster.cluster_id]
            wait_state(admin, sid, "stopped", 60)
            wait_for(lambda c=cluster, s=sid: _pod(c, s) is None, 30, what="pod deleted on stop")
    finally:
        for cluster in clusters:
            if cluster.agent is not None:
                cluster.agent.terminate()
            for call in ("delete_collection_namespaced_pod", "delete_collection_namespaced_secret"):
                with contextlib.suppress(Exception):
                    asyncio.run(_admin(cluster.admin_config, call, cluster.namespace))
