"""Looking at container sessions from the outside: specs, viewers, execs and clean-up.

Container sessions publish Xvnc on a loopback port that requires VNC Authentication with a
per-session password only the agent can derive, so tests view a session the way the agent does:
through `DockerBackend.open_vnc`, which authenticates and presents security type None.
Everything a test creates on the engine (containers of its agent ids, home volumes of its user
ids, volumes it names) is removed by `Leftovers.sweep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors

from streamspace.agent.backends.docker import (
    AGENT_LABEL,
    DockerBackend,
    container_name,
    home_volume_name,
)
from streamspace.images import image_ref
from streamspace.protocol import Display, ImageLaunch, Resources, SessionSpec
from streamspace_testing.rfb import RFBClient

XTERM = image_ref("xterm")
HOME = "/home/streamspace"


def new_user_id() -> str:
    """An id shaped like the control plane's (32 hex digits)."""
    return uuid.uuid4().hex


def new_spec(user: str, user_id: str, **overrides: Any) -> SessionSpec:
    fields: dict[str, Any] = {
        "session_id": f"t-{uuid.uuid4().hex[:10]}",
        "user": user,
        "user_id": user_id,
        "template": "xterm",
        "image": ImageLaunch(image=XTERM),
        "display": Display(width=1024, height=640),
        "resources": Resources(cpu_millis=750, memory_mb=384),
    }
    fields.update(overrides)
    return SessionSpec(**fields)


def app_visible(client: RFBClient) -> bool:
    """True once a window covers part of the screen: Xvnc's bare root is black, and the
    cursor alone (drawn into the framebuffer) would already make it "non-blank"."""
    rgb = client.rgb_bytes()
    pixels = len(rgb) // 3
    if pixels == 0:
        return False
    sampled = range(0, pixels, 7)
    lit = sum(1 for i in sampled if rgb[3 * i] or rgb[3 * i + 1] or rgb[3 * i + 2])
    return lit >= 0.2 * len(sampled)


async def open_view(backend: DockerBackend, session_id: str, timeout: float = 15.0) -> RFBClient:
    """An RFB client on the session through the agent's authenticated connection."""
    async with asyncio.timeout(timeout):
        reader, writer = await backend.open_vnc(session_id)
        return await RFBClient.from_streams(reader, writer)


async def first_frame(backend: DockerBackend, session_id: str, timeout: float = 15.0) -> RFBClient:
    """Connect and pull updates until the app's window shows in the framebuffer."""
    client = await open_view(backend, session_id, timeout)
    try:
        await client.request_update(incremental=False, timeout=timeout)
        if not app_visible(client):
            await client.wait_for(app_visible, timeout=timeout)
    except BaseException:
        await client.close()
        raise
    return client


async def assert_streams(backend: DockerBackend, session_id: str) -> None:
    client = await first_frame(backend, session_id)
    try:
        assert client.framebuffer_nonblank(), "framebuffer stayed blank"
        assert app_visible(client), "the app's window never showed up"
    finally:
        await client.close()


def inspect(engine: docker.DockerClient, session_id: str) -> dict[str, Any]:
    attrs: dict[str, Any] = engine.containers.get(container_name(session_id)).attrs
    return attrs


def home_mount(engine: docker.DockerClient, session_id: str) -> str:
    """The name of the volume mounted at the session's home."""
    mounts = {m["Destination"]: m for m in inspect(engine, session_id)["Mounts"]}
    return str(mounts[HOME]["Name"])


def exec_in(engine: docker.DockerClient, session_id: str, cmd: list[str]) -> tuple[int, str]:
    result = engine.containers.get(container_name(session_id)).exec_run(cmd)
    output = result.output
    assert isinstance(output, bytes) and result.exit_code is not None
    return result.exit_code, output.decode(errors="replace")


def run_once(engine: docker.DockerClient, entrypoint: list[str], volume: str, mode: str) -> str:
    """Run a one-off helper container on a home volume as the session user (uid 1000, mounted at
    the home), without the session entrypoint (which needs a VNC password); its output.

    Not `containers.run`: its log stream can outlive a container that exits at once on podman's
    compatible API, and the test then hangs. Wait with a timeout, then read the logs."""
    container = engine.containers.create(
        XTERM,
        entrypoint=entrypoint,
        user="1000:1000",
        volumes={volume: {"bind": HOME, "mode": mode}},
    )
    try:
        container.start()
        result = container.wait(timeout=60)
        out = bytes(container.logs(stdout=True, stderr=True)).decode()
        assert result.get("StatusCode") == 0, out
        return out
    finally:
        container.remove(force=True)


def write_into_volume(engine: docker.DockerClient, volume: str, path: str, text: str) -> None:
    """Put a file into a volume as the session user would have."""
    run_once(engine, ["sh", "-c", f"printf %s '{text}' > {HOME}/{path}"], volume, "rw")


def read_from_volume(engine: docker.DockerClient, volume: str, path: str) -> str:
    return run_once(engine, ["cat", f"{HOME}/{path}"], volume, "ro")


@dataclass
class Leftovers:
    """What a test put on the shared engine, so it can be removed afterwards."""

    agent_ids: set[str] = field(default_factory=set)
    user_ids: set[str] = field(default_factory=set)
    volumes: set[str] = field(default_factory=set)

    def user_id(self) -> str:
        user_id = new_user_id()
        self.user_ids.add(user_id)
        return user_id

    def home_of(self, user_id: str, template: str = "xterm") -> str:
        name = home_volume_name(user_id, template)
        self.volumes.add(name)
        return name

    def sweep(self, engine: docker.DockerClient) -> None:
        for agent_id in self.agent_ids:
            for container in engine.containers.list(
                all=True, filters={"label": f"{AGENT_LABEL}={agent_id}"}
            ):
                container.remove(force=True)
        prefixes = tuple(f"ss-home_{user_id}_" for user_id in self.user_ids)
        for volume in engine.volumes.list():
            if volume.name in self.volumes or (prefixes and volume.name.startswith(prefixes)):
                with contextlib.suppress(docker.errors.NotFound):
                    volume.remove(force=True)
