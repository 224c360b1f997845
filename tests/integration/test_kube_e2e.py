"""Pod sessions end to end: control plane + `streamspace agent --backend kubernetes` + the real
kube-apiserver with the podman test node running the pods.

Create through the API, stream through the control plane tunnel (the agent dials the pod IP and
authenticates to the session's password-protected VNC server), hibernate/wake keeping the home on
its PVC, stop; and a template whose image does not exist fails fast with the kubelet's reason
instead of waiting for the start timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from api_support import assert_problem
from kube_support import new_namespace
from test_docker_e2e import _stream_nonblank

from conftest import PODMAN_MISSING, AgentProcess, ControlPlane, require, wait_for, wait_state
from streamspace_testing.opus import (
    dominant_frequency,
    listen,
    mic_loopback_command,
    pacat_tone_template,
    rms,
    round_trip,
)

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
TONE_HZ = 750
TONE_TEMPLATE = pacat_tone_template("tone-pod", "kubernetes", TONE_HZ)


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
    for template in (BROKEN_TEMPLATE, TONE_TEMPLATE):
        r = admin.post("/api/v1/templates", json=template)
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
            a["status"] == "online" and {"xterm", "broken-image", "tone-pod"} <= set(a["templates"])
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


def _pactl_info(server: str, home: Path, cookie: bytes | None) -> subprocess.CompletedProcess[str]:
    """`pactl info` against `server` as a client with no PulseAudio state of its own (and the
    given cookie, if any)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    if cookie is not None:
        (home / "cookie").write_bytes(cookie)
        env["PULSE_COOKIE"] = str(home / "cookie")
    return subprocess.run(
        ["pactl", "--server", server, "info"], env=env, capture_output=True, text=True, timeout=30
    )


def test_a_tone_in_the_pod_reaches_the_viewer_and_its_sound_port_wants_the_cookie(
    setup: Setup, tmp_path: Path
) -> None:
    for tool in ("gst-launch-1.0", "pactl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install-system.sh)")
    r = setup.admin.post("/api/v1/sessions", json={"template": "tone-pod"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert wait_state(setup.admin, sid, {"running", "failed"}, START_TIMEOUT)["state"] == "running"

    ticket = setup.admin.post(f"/api/v1/sessions/{sid}/connect").json()["ticket"]
    url = f"ws://127.0.0.1:{setup.cp.port}/api/v1/streams/audio?ticket={ticket}"
    samples = asyncio.run(listen(url, 1.5))
    tail = samples[-48_000:]
    assert rms(tail) > 0.05, f"the stream is silent (rms {rms(tail):.4f})"
    assert abs(dominant_frequency(tail) - TONE_HZ) < 10

    # The sound port is on the pod network, where other pods (or a test node's neighbours)
    # reach it: without the session's cookie it refuses; with the one in its Secret it answers.
    from streamspace.agent.backends.kubernetes.objects import (
        SECRET_COOKIE_KEY,
        SOUND_PORT,
        secret_name,
    )

    pod = _pod(setup, sid)
    server = f"tcp:{pod.status.pod_ip}:{SOUND_PORT}"
    secret = asyncio.run(
        _admin_call(setup.kubeconfig, "read_namespaced_secret", secret_name(sid), setup.namespace)
    )
    cookie = bytes.fromhex(base64.b64decode(secret.data[SECRET_COOKIE_KEY]).decode())
    (tmp_path / "stranger").mkdir()
    refused = _pactl_info(server, tmp_path / "stranger", None)
    assert refused.returncode != 0 and "denied" in (refused.stdout + refused.stderr).lower()
    (tmp_path / "wrong").mkdir()
    wrong = _pactl_info(server, tmp_path / "wrong", bytes(256))
    assert wrong.returncode != 0 and "denied" in (wrong.stdout + wrong.stderr).lower()
    (tmp_path / "agent").mkdir()
    allowed = _pactl_info(server, tmp_path / "agent", cookie)
    assert allowed.returncode == 0, allowed.stderr
    assert "streamspace" in allowed.stdout  # the session's null sink is its default


MIC_HZ = 660
MIC_LOOPBACK_TEMPLATE: dict[str, Any] = {
    "name": "mic-loopback-pod",
    "display_name": "Microphone loopback (pod test)",
    "category": "Test",
    "resources": {"cpu_millis": 250, "memory_mb": 256},
    "display": {"width": 320, "height": 240, "depth": 24},
    "launch": {
        "kubernetes": {
            "image": "localhost/streamspace/xterm:latest",
            "command": mic_loopback_command(),
        }
    },
}


def test_the_browsers_microphone_reaches_the_pod_through_its_cookie_protected_port(
    setup: Setup,
) -> None:
    """The agent's decoder reaches the pod's PulseAudio over TCP with the session's cookie;
    an app in the pod that plays back its default source returns the tone on the sound."""
    if shutil.which("gst-launch-1.0") is None:
        pytest.skip("gst-launch-1.0 is not installed (scripts/install-system.sh)")
    admin = setup.admin
    r = admin.post("/api/v1/groups", json={"name": "mic-pods", "allow_microphone": True})
    assert r.status_code == 201, r.text
    assert admin.put(f"/api/v1/groups/{r.json()['id']}/members/admin").status_code == 200
    r = admin.post("/api/v1/templates", json=MIC_LOOPBACK_TEMPLATE)
    assert r.status_code == 201, r.text
    wait_for(
        lambda: any(
            "mic-loopback-pod" in a["templates"] for a in admin.get("/api/v1/agents").json()
        ),
        60,
        what="the kubernetes agent offering the loopback template",
    )
    r = admin.post("/api/v1/sessions", json={"template": "mic-loopback-pod"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert wait_state(admin, sid, {"running", "failed"}, START_TIMEOUT)["state"] == "running"

    def url(path: str) -> str:
        ticket = admin.post(f"/api/v1/sessions/{sid}/connect").json()["ticket"]
        return f"ws://127.0.0.1:{setup.cp.port}/api/v1/streams/{path}?ticket={ticket}"

    tail = asyncio.run(round_trip(url("microphone"), url("audio"), MIC_HZ))[-48_000:]
    assert rms(tail) > 0.05, f"the loopback is silent (rms {rms(tail):.4f})"
    assert abs(dominant_frequency(tail) - MIC_HZ) < 10


def test_files_reach_the_pod_home_through_its_sftp_server_and_links_are_refused(
    setup: Setup,
) -> None:
    admin = setup.admin
    r = admin.post("/api/v1/sessions", json={"template": "xterm", "cluster_id": "pods"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert wait_state(admin, sid, {"running", "failed"}, START_TIMEOUT)["state"] == "running"
    content = f"/api/v1/sessions/{sid}/files/content"

    payload = os.urandom(2 * 1024 * 1024 + 5)
    r = admin.put(content, params={"path": "Uploads/in.bin"}, content=payload)
    assert r.status_code == 201, r.text
    seen = _exec(setup, sid, ["stat", "-c", "%u:%s", "/home/streamspace/Uploads/in.bin"])
    assert seen.stdout.strip() == f"1000:{len(payload)}", seen.stderr
    made = _exec(
        setup,
        sid,
        ["sh", "-c", "echo made-inside > /home/streamspace/inside.txt && "
         "ln -s /etc /home/streamspace/etc-link && ln -s /etc/passwd /home/streamspace/pw"],
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert admin.get(content, params={"path": "inside.txt"}).content == b"made-inside\n"
    assert admin.get(content, params={"path": "Uploads/in.bin"}).content == payload
    assert_problem(admin.get(content, params={"path": "etc-link/passwd"}), 403, "link")
    assert_problem(admin.get(content, params={"path": "pw"}), 403, "link")
    assert_problem(admin.put(content, params={"path": "etc-link/x"}, content=b"x"), 403)
    assert_problem(admin.get(content, params={"path": "nothing-here"}), 404)

    listed = admin.get(f"/api/v1/sessions/{sid}/files").json()["items"]
    kinds = {e["name"]: e["type"] for e in listed}
    assert kinds["etc-link"] == "symlink" and kinds["Uploads"] == "dir"
    assert kinds["inside.txt"] == "file"

    with zipfile.ZipFile(io.BytesIO(admin.get(content, params={"path": ""}).content)) as zf:
        assert zf.read("Uploads/in.bin") == payload
        assert zf.read("inside.txt") == b"made-inside\n"
        assert not [n for n in zf.namelist() if n.startswith(("etc-link", "pw"))]


def test_the_pods_file_service_admits_only_the_sessions_agent_key_and_no_shell(
    setup: Setup,
) -> None:
    """Anyone on the pod network reaches port 2222: a key of their own is refused, and even
    the agent's key gets SFTP only, never a command."""
    import asyncssh

    from streamspace.agent.backends.kubernetes.objects import (
        FILES_PORT,
        SECRET_FILES_CLIENT_KEY,
        SECRET_FILES_HOST_PUBLIC,
        secret_name,
    )

    r = setup.admin.post("/api/v1/sessions", json={"template": "xterm", "cluster_id": "pods"})
    sid = r.json()["id"]
    assert wait_state(setup.admin, sid, {"running", "failed"}, START_TIMEOUT)["state"] == "running"
    host = _pod(setup, sid).status.pod_ip
    secret = asyncio.run(
        _admin_call(setup.kubeconfig, "read_namespaced_secret", secret_name(sid), setup.namespace)
    )
    agent_key = asyncssh.import_private_key(base64.b64decode(secret.data[SECRET_FILES_CLIENT_KEY]))
    host_key = asyncssh.import_public_key(base64.b64decode(secret.data[SECRET_FILES_HOST_PUBLIC]))

    async def attempt(key: asyncssh.SSHKey) -> str:
        try:
            async with asyncssh.connect(
                host,
                FILES_PORT,
                username="streamspace",
                client_keys=[key],
                known_hosts=([host_key], [], []),
                config=None,
                agent_path=None,
                connect_timeout=10,
            ) as conn:
                done = await conn.run("id; touch /home/streamspace/ran", check=False)
                return f"ran: {done.exit_status} {done.stdout!r} {done.stderr!r}"
        except asyncssh.PermissionDenied:
            return "denied"

    assert asyncio.run(attempt(asyncssh.generate_private_key("ssh-ed25519"))) == "denied"
    outcome = asyncio.run(attempt(agent_key))
    assert "uid=" not in outcome and "sftp connections only" in outcome, outcome
    assert _exec(setup, sid, ["test", "-e", "/home/streamspace/ran"]).returncode == 1

    # The agent trusts only the host key it gave the pod: whoever answers on that address with
    # another key (a pod that took over the IP, a man in the middle) gets no files.
    from streamspace.agent import sftphome
    from streamspace.agent.backends.base import SftpAccess
    from streamspace.agent.homefs import FileOpError

    stranger = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    access = SftpAccess(
        host=host,
        port=FILES_PORT,
        user="streamspace",
        client_key=base64.b64decode(secret.data[SECRET_FILES_CLIENT_KEY]),
        host_key=stranger,
        root="/home/streamspace",
    )
    with pytest.raises(FileOpError, match="cannot reach the session's file service"):
        asyncio.run(sftphome.connect(access))
    trusted = SftpAccess(**{**access.__dict__, "host_key": host_key.export_public_key().decode()})

    async def listing() -> list[str]:
        home = await sftphome.connect(trusted)
        try:
            entries, _ = await home.list_dir([])
            return [e.name for e in entries]
        finally:
            await home.close()

    assert _exec(setup, sid, ["touch", "/home/streamspace/marker"]).returncode == 0
    assert "marker" in asyncio.run(listing())
