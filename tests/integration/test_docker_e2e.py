"""Container sessions end to end: control plane + `streamspace agent --backend docker` + podman.

Create through the API, stream through the control plane tunnel (the agent authenticates to the
session's password-protected VNC server; the viewer speaks security type None), hibernate/wake
keeping the home volume, stop, and agent restarts adopting (or removing) labelled containers.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from conftest import PODMAN_MISSING, AgentProcess, ControlPlane, require, wait_for, wait_state

pytestmark = pytest.mark.podman


@pytest.fixture
def setup(make_control_plane: Any, podman_service: Any, tmp_path: Path) -> Any:
    require(PODMAN_MISSING)
    import docker

    cp: ControlPlane = make_control_plane(agent_heartbeat_seconds=1.0, loop_interval_seconds=0.5)
    state_dir = tmp_path / "docker-agent"
    agent = AgentProcess(
        cp.url,
        state_dir,
        cp.join_token(),
        "containers",
        backend="docker",
        extra=["--docker-host", podman_service.docker_host],
    ).start()
    engine = docker.DockerClient(base_url=podman_service.docker_host)
    admin = cp.login()
    wait_for(
        lambda: any(
            a["status"] == "online" and "xterm" in a["templates"]
            for a in admin.get("/api/v1/agents").json()
        ),
        60,
        what="docker agent online with the xterm image",
    )
    admin_id = admin.get("/api/v1/auth/me").json()["id"]
    yield cp, agent, engine, admin, state_dir
    for s in admin.get("/api/v1/sessions", params={"active": "true", "all": "true"}).json()[
        "items"
    ]:
        admin.delete(f"/api/v1/sessions/{s['id']}")
    with contextlib.suppress(AssertionError):
        wait_for(
            lambda: (
                admin.get("/api/v1/sessions", params={"active": "true", "all": "true"}).json()[
                    "total"
                ]
                == 0
            ),
            30,
        )
    agent.terminate()
    label_id = (state_dir / "backend-id").read_text().strip()
    for c in engine.containers.list(
        all=True, filters={"label": f"org.streamspace.agent={label_id}"}
    ):
        c.remove(force=True)
    for v in engine.volumes.list():
        if v.name.startswith(f"ss-home_{admin_id}_"):
            v.remove(force=True)
    engine.close()


def _stream_nonblank(cp: ControlPlane, client: Any, session_id: str) -> bool:
    from streamspace_testing.rfb import RFBClient, WebSocketTransport

    async def run() -> bool:
        t = client.post(f"/api/v1/sessions/{session_id}/connect").json()
        transport = await WebSocketTransport.connect(
            f"ws://127.0.0.1:{cp.port}{t['ws_path']}?ticket={t['ticket']}"
        )
        rfb = RFBClient(transport)
        try:
            await rfb.handshake()
            await rfb.request_update(False)
            for _ in range(20):
                if rfb.framebuffer_nonblank():
                    return True
                await rfb.request_update(True, timeout=2)
            return rfb.framebuffer_nonblank()
        finally:
            await rfb.close()

    return asyncio.run(run())


def _container(engine: Any, session_id: str) -> Any:
    from streamspace.agent.backends.docker import container_name

    return engine.containers.get(container_name(session_id))


def test_container_session_lifecycle_through_the_control_plane(setup: Any) -> None:
    from streamspace.agent.backends.docker import OWNER_ID_LABEL, home_volume_name

    cp, _agent, engine, admin, _ = setup
    admin_id = admin.get("/api/v1/auth/me").json()["id"]
    r = admin.post(
        "/api/v1/sessions",
        json={
            "template": "xterm",
            "cluster_id": "containers",
            "resources": {"cpu_millis": 700, "memory_mb": 600},
        },
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    s = wait_state(admin, sid, {"running", "failed"}, 90)
    assert s["state"] == "running", s
    assert s["cluster_id"] == "containers"
    assert _stream_nonblank(cp, admin, sid)
    # The agent's snapshot client goes through the same password-protected VNC connection.
    thumb = admin.get(f"/api/v1/sessions/{sid}/thumbnail")
    assert thumb.status_code == 200, thumb.text
    assert thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:3] == b"\xff\xd8\xff"

    container = _container(engine, sid)
    host = container.attrs["HostConfig"]
    assert host["NanoCpus"] == 700_000_000
    assert host["Memory"] == 600 * 1024 * 1024
    assert not host.get("PortBindings")  # VNC is a Unix socket, no port is published
    assert container.attrs["Config"]["User"] not in ("", "0", "root")
    assert container.attrs["Config"]["Labels"][OWNER_ID_LABEL] == admin_id

    code, _ = container.exec_run(["sh", "-c", "echo kept > /home/streamspace/note.txt"])
    assert code == 0
    volume = next(
        m["Name"] for m in container.attrs["Mounts"] if m["Destination"] == "/home/streamspace"
    )
    assert volume == home_volume_name(admin_id, "xterm")

    assert admin.post(f"/api/v1/sessions/{sid}/hibernate").status_code == 202
    wait_state(admin, sid, "hibernated", 60)
    container.reload()
    assert container.status in ("exited", "stopped", "created")
    assert engine.volumes.get(volume) is not None

    assert admin.post(f"/api/v1/sessions/{sid}/wake").status_code == 202
    wait_state(admin, sid, "running", 60)
    container = _container(engine, sid)
    code, out = container.exec_run(["cat", "/home/streamspace/note.txt"])
    assert code == 0 and out.strip() == b"kept"
    assert _stream_nonblank(cp, admin, sid)

    assert admin.delete(f"/api/v1/sessions/{sid}").status_code == 202
    wait_state(admin, sid, "stopped", 60)
    import docker.errors

    with pytest.raises(docker.errors.NotFound):
        _container(engine, sid)
    assert engine.volumes.get(volume) is not None


def test_agent_restart_adopts_running_containers_and_removes_unknown_ones(setup: Any) -> None:
    cp, agent, engine, admin, state_dir = setup
    sid = admin.post("/api/v1/sessions", json={"template": "xterm"}).json()["id"]
    assert wait_state(admin, sid, {"running", "failed"}, 90)["state"] == "running"
    label_id = (state_dir / "backend-id").read_text().strip()
    stray = engine.containers.run(
        "localhost/streamspace/xterm:latest",
        entrypoint=["sleep", "300"],
        name="ss-stray-session",
        detach=True,
        labels={
            "org.streamspace.agent": label_id,
            "org.streamspace.session": "stray-session",
            "org.streamspace.owner": "nobody",
            "org.streamspace.template": "xterm",
        },
    )
    assert engine.containers.get(stray.id).status == "running"
    agent.kill()
    assert _container(engine, sid).status == "running"
    agent.start()
    wait_for(
        lambda: admin.get("/api/v1/agents").json()[0]["status"] == "online", 60, what="reconnect"
    )
    assert admin.get(f"/api/v1/sessions/{sid}").json()["state"] == "running"
    assert _stream_nonblank(cp, admin, sid)
    import docker.errors

    def stray_gone() -> bool:
        try:
            engine.containers.get(stray.id)
        except docker.errors.NotFound:
            return True
        except docker.errors.APIError as exc:  # podman answers 500 "no such container"
            return "no such container" in str(exc)
        return False

    wait_for(stray_gone, 30, what="unknown labelled container removed")
