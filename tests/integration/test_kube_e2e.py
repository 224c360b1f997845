"""Pod sessions end to end: control plane + `streamspace agent --backend kubernetes` + the real
kube-apiserver with the podman test node running the pods.

Create through the API, stream through the control plane tunnel (the agent dials the pod IP and
authenticates to the session's password-protected VNC server), hibernate/wake keeping the home on
its PVC, stop; and a template whose image does not exist fails fast with the kubelet's reason
instead of waiting for the start timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kube_support import new_namespace
from test_docker_e2e import _stream_nonblank

from conftest import PODMAN_MISSING, AgentProcess, ControlPlane, require, wait_for, wait_state

pytestmark = pytest.mark.podman

START_TIMEOUT = 60.0
MISSING_IMAGE = "localhost/streamspace/does-not-exist:1"
BROKEN_TEMPLATE: dict[str, Any] = {
    "name": "broken-image",
    "display_name": "An image no registry has",
    "category": "Development",
    "resources": {"cpu_millis": 250, "memory_mb": 256},
    "launch": {"kubernetes": {"image": MISSING_IMAGE}},
}


@dataclass
class Setup:
    cp: ControlPlane
    agent: AgentProcess
    admin: Any
    node: Any
    kubeconfig: Path
    namespace: str


async def _admin_call(kubeconfig: Path, call: str, *args: Any, **kwargs: Any) -> Any:
    from kubernetes_asyncio import client as k8s
    from kubernetes_asyncio.config import new_client_from_config

    api = await new_client_from_config(config_file=str(kubeconfig))
    try:
        core = k8s.CoreV1Api(api)
        if call == "new_namespace":
            return await new_namespace(core)
        return await getattr(core, call)(*args, **kwargs)
    finally:
        await api.close()


@pytest.fixture
def setup(make_control_plane: Any, kube_apiserver: Any, k8s_node: Any, tmp_path: Path) -> Any:
    require(PODMAN_MISSING)
    admin_config = kube_apiserver.write_kubeconfig(tmp_path / "admin-kubeconfig")
    namespace = asyncio.run(_admin_call(admin_config, "new_namespace"))
    kubeconfig = kube_apiserver.write_kubeconfig(tmp_path / "agent-kubeconfig", None, namespace)
    cp: ControlPlane = make_control_plane(agent_heartbeat_seconds=1.0, loop_interval_seconds=0.5)
    admin = cp.login()
    r = admin.post("/api/v1/templates", json=BROKEN_TEMPLATE)
    assert r.status_code == 201, r.text
    agent = AgentProcess(
        cp.url,
        tmp_path / "kube-agent",
        cp.join_token(),
        "pods",
        backend="kubernetes",
        extra=["--namespace", namespace],
        env={
            "STREAMSPACE_KUBE_KUBECONFIG": str(kubeconfig),
            "STREAMSPACE_KUBE_START_TIMEOUT_SECONDS": str(START_TIMEOUT),
        },
    ).start()
    wait_for(
        lambda: any(
            a["status"] == "online" and {"xterm", "broken-image"} <= set(a["templates"])
            for a in admin.get("/api/v1/agents").json()
        ),
        60,
        what="kubernetes agent online with the image templates",
    )
    yield Setup(cp, agent, admin, k8s_node, admin_config, namespace)
    active = {"active": "true", "all": "true"}
    for s in admin.get("/api/v1/sessions", params=active).json()["items"]:
        admin.delete(f"/api/v1/sessions/{s['id']}")
    with contextlib.suppress(AssertionError):
        wait_for(lambda: admin.get("/api/v1/sessions", params=active).json()["total"] == 0, 30)
    agent.terminate()
    for call in (
        "delete_collection_namespaced_pod",
        "delete_collection_namespaced_secret",
        "delete_collection_namespaced_persistent_volume_claim",
    ):
        asyncio.run(_admin_call(admin_config, call, namespace))


def _pod(setup: Setup, session_id: str) -> Any:
    from kubernetes_asyncio.client.exceptions import ApiException

    from streamspace.agent.backends.kubernetes.objects import pod_name

    try:
        return asyncio.run(
            _admin_call(
                setup.kubeconfig, "read_namespaced_pod", pod_name(session_id), setup.namespace
            )
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _progress(session: dict[str, Any]) -> list[str]:
    """The start milestones the agent reported, as recorded in the session's events."""
    return [e["message"] for e in session["events"] if e["kind"] == "progress"]


def _exec(setup: Setup, session_id: str, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command in the session's container, found behind the API server on the node."""
    pod = _pod(setup, session_id)
    assert pod is not None
    rows = setup.node.containers(pod.metadata.uid)
    assert rows, f"no container for pod {pod.metadata.name}"
    return subprocess.run(
        ["podman", "exec", rows[0]["Id"], *command],
        env={**os.environ, "CONTAINERS_CONF": str(setup.node.containers_conf)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_pod_session_lifecycle_through_the_control_plane(setup: Setup) -> None:
    from streamspace.agent.backends.kubernetes.objects import home_claim_name

    admin = setup.admin
    admin_id = admin.get("/api/v1/auth/me").json()["id"]
    r = admin.post(
        "/api/v1/sessions",
        json={
            "template": "xterm",
            "cluster_id": "pods",
            "resources": {"cpu_millis": 700, "memory_mb": 600},
        },
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    s = wait_state(admin, sid, {"running", "failed"}, 120)
    assert s["state"] == "running", s
    assert s["cluster_id"] == "pods"
    progress = _progress(s)
    node = setup.node.info.name
    assert progress[0].startswith("pod ss-") and progress[0].endswith(" created"), progress
    assert [p.split(" ", 2)[:2] == ["pulling", "image"] or p for p in progress[1:]] == [
        f"scheduled on node {node}",
        True,
        "container started",
        "VNC ready",
    ], progress
    assert "xterm" in progress[2]
    assert _stream_nonblank(setup.cp, admin, sid)

    pod = _pod(setup, sid)
    assert pod.spec.node_name == setup.node.info.name
    container = pod.spec.containers[0]
    assert container.resources.limits["cpu"] in ("700m", "0.7")
    assert pod.spec.security_context.run_as_non_root is True
    claim = home_claim_name(admin_id, "xterm")
    assert [
        v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim
    ] == [claim]
    done = _exec(setup, sid, ["sh", "-c", "echo kept > /home/streamspace/note.txt"])
    assert done.returncode == 0, done.stderr

    assert admin.post(f"/api/v1/sessions/{sid}/hibernate").status_code == 202
    wait_state(admin, sid, "hibernated", 60)
    wait_for(lambda: _pod(setup, sid) is None, 30, what="pod deleted on hibernate")
    assert asyncio.run(
        _admin_call(
            setup.kubeconfig, "read_namespaced_persistent_volume_claim", claim, setup.namespace
        )
    )

    assert admin.post(f"/api/v1/sessions/{sid}/wake").status_code == 202
    woken = wait_state(admin, sid, "running", 120)
    assert _progress(woken)[len(progress) :][-1] == "VNC ready"  # the wake's own milestones
    assert _pod(setup, sid).metadata.uid != pod.metadata.uid
    done = _exec(setup, sid, ["cat", "/home/streamspace/note.txt"])
    assert (done.returncode, done.stdout.strip()) == (0, "kept"), done.stderr
    assert _stream_nonblank(setup.cp, admin, sid)

    assert admin.delete(f"/api/v1/sessions/{sid}").status_code == 202
    wait_state(admin, sid, "stopped", 60)
    wait_for(lambda: _pod(setup, sid) is None, 30, what="pod deleted on stop")


def test_a_missing_image_fails_the_session_fast_with_the_pull_error(setup: Setup) -> None:
    admin = setup.admin
    started = time.monotonic()
    r = admin.post("/api/v1/sessions", json={"template": "broken-image", "cluster_id": "pods"})
    assert r.status_code == 201, r.text
    s = wait_state(admin, r.json()["id"], {"running", "failed"}, START_TIMEOUT + 30)
    elapsed = time.monotonic() - started
    print(f"missing image: session failed after {elapsed:.2f} s: {s.get('failure_reason')}")
    assert s["state"] == "failed", json.dumps(s)
    assert "ErrImagePull" in (s.get("failure_reason") or ""), s
    assert elapsed < START_TIMEOUT / 2  # the pull error, not the start timeout, ended it
