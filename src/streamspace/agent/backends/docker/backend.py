"""Sessions as containers on a Docker-API engine (Docker, or podman's API service).

Design notes:

* Every docker SDK call runs in a thread (`engine.py`); the client is created lazily so an
  engine that is down at agent start only makes `healthy()` false instead of failing
  construction.
* The engine is the source of truth: each session is one container named `ss-<session_id>` and
  labelled with session, owner, template and agent. `inventory()` lists this agent's labelled
  containers, so an agent restarted with the same id adopts its sessions without local state.
* What a container is (user, capabilities, limits, network, mounts, environment) is plain data
  built by `spec.container_config()`: uid 1000, every capability dropped, `no-new-privileges`,
  a pids limit, CPU/memory limits from `SessionSpec.resources`.
* No TCP port: the image's Xvnc listens on a Unix socket in `/run/streamspace`, a per-session
  directory of the agent's state dir (`docker-run/<session>`, owned by the container's uid,
  mode 0700, inside the agent's 0700 state dir) bind-mounted into the container. Only the agent
  (and the session itself) can reach it; nothing on any network can. So the engine must run on
  the agent's host, as the published loopback ports of before required too.
* The VNC server also requires VNC Authentication with a per-session password derived from a
  key only the agent holds (`vnc-key`, 0600), so a restarted agent can still connect; the agent
  authenticates and gives the viewer security type None (see agent/vnc.py).
* Templates without `network: true` get `network_mode: none` (loopback only); browsers get the
  engine's default network.
* A persistent home is the named volume `ss-home_<user id>_<template>` at /home/streamspace
  (`_` occurs in neither ids nor template names, so two owners can never share a name); it
  survives hibernate (container stop) and stop (container removal), and is reused only if its
  labels name the same user id and template. v1 volumes are mapped once (`homes.py`).
* States: a running container is "running", a created/stopped one "hibernated". The monitor
  (started by `watch_exits`) reports a container it saw running that stopped without our
  asking through the agent's callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from docker.models.containers import Container

from streamspace import logs
from streamspace.agent import vnc
from streamspace.agent.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    ExitCallback,
    HomeAccess,
    SoundServer,
    VNCStream,
    rfb_answers,
)
from streamspace.agent.backends.docker.containers import Containers
from streamspace.agent.backends.docker.engine import RUNNING, Engine, normalize_ref, state_of
from streamspace.agent.backends.docker.homes import Homes
from streamspace.agent.backends.docker.monitor import ExitMonitor
from streamspace.agent.backends.docker.spec import (
    CONTAINER_UID,
    CONTAINER_USER,
    container_config,
    container_name,
    vnc_password,
)
from streamspace.agent.homeusage import HomeUsage
from streamspace.private_files import create_private_file, private_dir
from streamspace.protocol import (
    CatalogEntry,
    Endpoint,
    InventoryItem,
    Isolation,
    SessionRunState,
    SessionSpec,
)

log = logs.get_logger("streamspace.agent.docker")


class DockerBackend(Backend):
    """Runs each session as one container on a Docker-compatible engine (see module doc).

    `base_url` is the engine's API (e.g. unix:///run/podman/podman.sock; None = $DOCKER_HOST
    or Docker's default socket). `state_dir` holds the VNC key, the sessions' socket
    directories and the home bookkeeping; the sessions themselves are the engine's labelled
    containers.
    """

    kind = "docker"

    def __init__(
        self,
        base_url: str | None,
        agent_id: str,
        state_dir: Path,
        *,
        poll_interval: float = 2.0,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        request_timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url
        self.agent_id = agent_id
        self.state_dir = Path(state_dir)
        self._on_exit: ExitCallback | None = None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.request_timeout = request_timeout
        self._engine = Engine(base_url, request_timeout=request_timeout, stop_timeout=stop_timeout)
        self._locks: dict[str, asyncio.Lock] = {}
        self._stopped: set[str] = set()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        run_root = self.state_dir / "docker-run"
        run_root.mkdir(mode=0o700, exist_ok=True)
        self._containers = Containers(engine=self._engine, agent_id=agent_id, run_root=run_root)
        self._monitor = ExitMonitor(
            engine=self._engine,
            containers=self._containers,
            lock=self._lock,
            logs_tail=self._logs_tail,
            notify=self._notify,
            poll_interval=poll_interval,
        )
        self._vnc_key = self._load_key(self.state_dir / "vnc-key")
        self.usage = HomeUsage(self.state_dir / "home-usage.json")
        """Home volume sizes, measured on stop/hibernate where the volume's directory is on this
        host (a local engine); a remote engine's volumes are not measured."""
        self._homes = Homes(engine=self._engine, state_dir=self.state_dir, usage=self.usage)

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        return cls(
            base_url=options.docker_host or os.environ.get("DOCKER_HOST"),
            agent_id=label_id(options.state_dir),
            state_dir=options.state_dir,
        )

    @staticmethod
    def _load_key(path: Path) -> bytes:
        try:
            return bytes.fromhex(path.read_text().strip())
        except FileNotFoundError:
            key = os.urandom(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(key.hex())
            return key

    @property
    def engine_url(self) -> str:
        return self._engine.url

    @property
    def poll_interval(self) -> float:
        """Seconds between the exit monitor's checks; may be changed while it runs."""
        return self._monitor.poll_interval

    @poll_interval.setter
    def poll_interval(self, value: float) -> None:
        self._monitor.poll_interval = value

    # ---- Backend API --------------------------------------------------------------------

    async def start(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="start")

    async def wake(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="wake")

    async def stop(self, session_id: str) -> None:
        container_name(session_id)
        async with self._lock(session_id):
            self._monitor.forget(session_id)
            for container in await self._containers.find(session_id):
                await self._engine.call(self._engine.remove, container)
                await self._homes.measure(container.attrs)
            await self._containers.remove_run_dir(session_id)
            self._stopped.add(session_id)
        log.event("session_stopped", session_id=session_id)

    async def hibernate(self, session_id: str) -> None:
        container_name(session_id)
        async with self._lock(session_id):
            found = await self._containers.find(session_id)
            if not found:
                raise BackendError(f"session {session_id} is not known to this agent")
            self._monitor.forget(session_id)
            for container in found:
                if state_of(container.attrs) in RUNNING:
                    await self._engine.call(self._engine.stop, container)
                await self._homes.measure(container.attrs)
        log.event("session_hibernated", session_id=session_id)

    async def status(self, session_id: str) -> InventoryItem:
        container_name(session_id)
        found = await self._containers.find(session_id)
        if not found:
            state: SessionRunState = "stopped" if session_id in self._stopped else "unknown"
            return InventoryItem(session_id=session_id, state=state)
        return self._containers.item(found[0].attrs, session_id)

    async def inventory(self) -> list[InventoryItem]:
        containers = await self._containers.all()
        items = [self._containers.item(c.attrs) for c in containers]
        return sorted(items, key=lambda item: item.session_id)

    def runnable_templates(self, catalog: Iterable[CatalogEntry]) -> list[str]:
        images = self._engine.images()
        return [
            entry.name
            for entry in catalog
            if entry.image is not None and normalize_ref(entry.image.image) in images
        ]

    def isolation(self) -> Isolation:
        return Isolation(
            mode="container",
            detail=(
                f"one container per session as uid {CONTAINER_USER.split(':')[0]}, all "
                "capabilities dropped, no-new-privileges, no network unless the template asks; "
                "VNC on a Unix socket only the agent reaches, with a per-session password"
            ),
            limits_enforced=True,
        )

    async def open_vnc(self, session_id: str, connect_timeout: float = 10.0) -> VNCStream:
        """Connect to the session's VNC socket, authenticate with the session's password, and
        offer the viewer security type None."""
        item = await self.status(session_id)
        if item.state != "running" or item.endpoint is None:
            raise BackendError(f"session {session_id} is not running on this agent")
        reader, writer = await vnc.open_unix(
            self._containers.socket(session_id), connect_timeout, _socket_owner()
        )
        try:
            await asyncio.wait_for(
                vnc.authenticate(reader, writer, vnc_password(self._vnc_key, session_id)),
                connect_timeout,
            )
        except BaseException:
            writer.close()
            raise
        front = vnc.NoneSecurityFront(reader, writer)
        return front, front

    async def home_access(self, session_id: str) -> HomeAccess:
        """The home volume's directory on this host (`volume inspect`'s Mountpoint), as the
        container's uid. Needs the engine on this host and a persistent home."""
        for container in await self._containers.find(session_id):
            where = await self._homes.home_dir(container.attrs)
            if where is None:
                raise BackendError(
                    f"session {session_id} has no home volume this agent can reach (no "
                    "persistent home, or the engine runs on another host)"
                )
            uid, gid = (int(x) for x in CONTAINER_USER.split(":"))
            return HomeAccess(root=where, uid=uid, gid=gid)
        raise BackendError(f"session {session_id} is not on this agent")

    async def open_audio(self, session_id: str) -> SoundServer:
        """The session's PulseAudio socket beside its VNC socket, checked like that one (a
        socket of the container's uid, no symlink): the container can write that directory."""
        item = await self.status(session_id)
        if item.state != "running":
            raise BackendError(f"session {session_id} is not running on this agent")
        try:
            fd = await asyncio.to_thread(
                vnc.checked_socket_fd, self._containers.audio_socket(session_id), _socket_owner()
            )
        except FileNotFoundError:
            raise BackendError(
                "the session has no sound server (its image has no pulseaudio)"
            ) from None
        except OSError as exc:
            raise BackendError(f"cannot reach the session's sound server: {exc}") from exc
        return SoundServer(socket_fd=fd)

    async def healthy(self) -> tuple[bool, str]:
        try:
            await self._engine.call(self._engine.ping)
        except BackendError as exc:
            return False, str(exc)
        with contextlib.suppress(BackendError):
            await self.refresh_images()
        return True, ""

    async def close(self) -> None:
        """Stop watching and drop the client; the containers keep running for the next agent."""
        await self._monitor.close()
        await self._engine.close()

    async def legacy_home_names(self) -> list[str]:
        return await self._homes.legacy_names()

    async def migrate_homes(self, owners: dict[str, str]) -> dict[str, str]:
        """Map v1 volumes (named after user names) to the ids those names have now."""
        return await self._homes.migrate(owners)

    async def watch_exits(self, on_exit: ExitCallback) -> None:
        """Poll this agent's containers (every poll_interval) and report unexpected exits."""
        self._on_exit = on_exit
        self._monitor.start()

    # ---- extras ---------------------------------------------------------------------------

    async def refresh_images(self) -> set[str]:
        """Re-read the engine's local image tags (used by runnable_templates)."""
        return await self._engine.refresh_images()

    # ---- start / wake -------------------------------------------------------------------

    async def _ensure_running(self, spec: SessionSpec, action: str) -> Endpoint:
        session_id = spec.session_id
        container_name(session_id)
        if spec.image is None:
            raise BackendError(f"template {spec.template!r} has no container image")
        async with self._lock(session_id):
            started = time.monotonic()
            found = await self._containers.find(session_id)
            container = found[0] if found else None
            created = False
            if container is None:
                container = await self._create(spec)
                created = True
            status = state_of(container.attrs)
            if status == "paused":
                await self._engine.call(container.unpause)
            elif status not in RUNNING:
                try:
                    await self._engine.call(container.start)
                except BackendError:
                    if created:
                        await self._engine.call(self._engine.remove, container)
                    raise
            try:
                endpoint = await self._wait_ready(container, session_id)
            except BaseException:
                # A fresh container that never served is removed; an existing one is left
                # stopped (hibernated) so its writable layer is not lost.
                with contextlib.suppress(BackendError):
                    if created:
                        await self._engine.call(self._engine.remove, container)
                    else:
                        await self._engine.call(self._engine.stop, container)
                raise
            self._stopped.discard(session_id)
            self._monitor.saw_running(session_id)
        log.event(
            "session_started",
            session_id=session_id,
            action=action,
            user=spec.user,
            template=spec.template,
            image=spec.image.image,
            port=endpoint.port,
            created=created,
            seconds=round(time.monotonic() - started, 3),
        )
        return endpoint

    async def _create(self, spec: SessionSpec) -> Container:
        assert spec.image is not None
        image = spec.image.image
        if not await self._engine.call(self._engine.has_image, image):
            self._engine.schedule_image_refresh()
            raise BackendError(
                f"image {image} not built on agent {self.agent_id}; run `streamspace images build`"
            )
        run_dir = await asyncio.to_thread(self._containers.prepare_run_dir, spec.session_id)
        config = container_config(
            spec,
            agent_id=self.agent_id,
            vnc_password=vnc_password(self._vnc_key, spec.session_id),
            run_dir=run_dir,
            home_volume=await self._homes.prepare(spec),
        )
        created: Container | None = await self._engine.call(self._engine.create, config)
        if created is None:
            raise BackendError(
                f"a container named {config['name']} already exists on the engine but is not "
                f"labelled for agent {self.agent_id}"
            )
        return created

    async def _wait_ready(self, container: Container, session_id: str) -> Endpoint:
        """Wait until the session's VNC socket answers the RFB banner."""
        deadline = time.monotonic() + self.start_timeout
        next_inspect = 0.0
        socket_path = self._containers.socket(session_id)
        while True:
            now = time.monotonic()
            if now >= next_inspect:
                if not await self._engine.call(self._engine.reload, container):
                    raise BackendError("the session container was removed during startup")
                status = state_of(container.attrs)
                if status not in RUNNING:
                    code = (container.attrs.get("State") or {}).get("ExitCode")
                    tail = await self._logs_tail(container)
                    raise BackendError(
                        f"the session container exited during startup (code {code}): {tail}"
                    )
                next_inspect = now + 0.5
            if await _rfb_answers(socket_path):
                return Endpoint(unix_path=str(socket_path))
            if time.monotonic() > deadline:
                tail = await self._logs_tail(container)
                raise BackendError(
                    f"the session's VNC server did not answer within "
                    f"{self.start_timeout:.0f}s: {tail}"
                )
            await asyncio.sleep(0.05)

    async def _logs_tail(self, container: Container, lines: int = 15) -> str:
        try:
            raw = await self._engine.call(container.logs, tail=lines)
        except BackendError:
            return "(logs unavailable)"
        text = raw.decode(errors="replace").strip() if isinstance(raw, bytes) else str(raw)
        return text or "(no output)"

    # ---- exits and locks ------------------------------------------------------------------

    async def _notify(self, session_id: str, reason: str) -> None:
        if self._on_exit is None:
            return
        try:
            await self._on_exit(session_id, reason)
        except Exception:
            log.exception("on_exit_callback_failed", session_id=session_id)

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())


def label_id(state_dir: Path) -> str:
    """A stable id for labelling this agent's containers, made once per state dir (blocking).

    The agent id is only known after enrolment; containers must be findable across restarts
    from the first start on, so the label uses an id of the state dir itself.
    """
    path = state_dir / "backend-id"
    if path.exists():
        return path.read_text().strip()
    private_dir(state_dir)
    value = uuid.uuid4().hex
    create_private_file(path)
    path.write_text(value)
    return value


def _socket_owner() -> int | None:
    """The uid the session's socket must have: a rootless engine maps it to a subordinate id."""
    return CONTAINER_UID if os.geteuid() == 0 else None


async def _rfb_answers(socket_path: Path) -> bool:
    try:
        with vnc.socket_handle(socket_path, owner=_socket_owner()) as path:
            return await rfb_answers(unix_path=path, read_timeout=1.0)
    except OSError:  # not there (yet), or not a socket of the container's user
        return False
