"""Sessions as containers on a Docker-API engine (Docker, or podman's API service).

Design notes:

* Every docker SDK call runs in `asyncio.to_thread`; the client is created lazily so an engine
  that is down at agent start only makes `healthy()` false instead of failing construction.
* The engine is the source of truth: each session is one container named `ss-<session_id>` and
  labelled with session, owner, template and agent. `inventory()` lists this agent's labelled
  containers, so an agent restarted with the same id adopts its sessions without local state.
* Containers run as uid 1000 with every capability dropped, `no-new-privileges`, a pids limit,
  and CPU/memory limits from `SessionSpec.resources`.
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
  labels name the same user id and template.
* A v1 home volume (`ss-home-<name>-<template>`, no owner id) is mapped once to the id its
  owner's name has when the control plane is first asked (`legacy-volumes.json`). One whose
  name no user has is recorded as orphaned (`orphaned-volumes.json`) and never offered again:
  a user created later under that name must not inherit it. Nothing is deleted.
* States: a running container is "running", a created/stopped one "hibernated". The monitor
  reports a container it saw running that stopped without our asking through `on_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from streamspace.agent import vnc
from streamspace.agent.backends.base import Backend, BackendError, VNCStream, rfb_answers
from streamspace.agent.homeusage import HomeUsage
from streamspace.protocol import (
    CatalogEntry,
    Endpoint,
    InventoryItem,
    Isolation,
    SessionRunState,
    SessionSpec,
)

__all__ = [
    "AGENT_LABEL",
    "OWNER_ID_LABEL",
    "OWNER_LABEL",
    "SESSION_LABEL",
    "TEMPLATE_LABEL",
    "DockerBackend",
    "ExitCallback",
    "container_name",
    "home_volume_name",
]

log = logging.getLogger("streamspace.agent.docker")

ExitCallback = Callable[[str, str], Awaitable[None]]
"""on_exit(session_id, reason): a running session's container stopped on its own."""

SESSION_LABEL = "org.streamspace.session"
OWNER_LABEL = "org.streamspace.owner"
OWNER_ID_LABEL = "org.streamspace.owner-id"
TEMPLATE_LABEL = "org.streamspace.template"
AGENT_LABEL = "org.streamspace.agent"

CONTAINER_RUN_DIR = "/run/streamspace"
VNC_SOCKET_ENV = "STREAMSPACE_VNC_SOCKET"
CONTAINER_USER = "1000:1000"
CONTAINER_HOME = "/home/streamspace"
_UID = int(CONTAINER_USER.split(":")[0])
"""Owner of the session's VNC socket under a rootful engine; the container can plant other
files in that directory, so a root agent connects only to a socket of this uid."""
VNC_PASSWORD_ENV = "STREAMSPACE_VNC_PASSWD"
"""The obfuscated vncpasswd bytes as a printf format (octal escapes); the image's entrypoint
writes them to a 0600 file for Xvnc and drops the variable before starting the app."""
_RESERVED_ENV = frozenset(
    {
        "VNC_GEOMETRY",
        "VNC_DEPTH",
        "DISPLAY",
        "HOME",
        "USER",
        VNC_PASSWORD_ENV,
        "STREAMSPACE_VNC_SOCKET",
    }
)
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VOLUME_OK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_TEMPLATE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_RUNNING = frozenset({"running", "restarting"})
_HIBERNATED = frozenset({"created", "exited", "stopped", "configured", "paused", "initialized"})


def container_name(session_id: str) -> str:
    if not _SESSION_ID_RE.fullmatch(session_id):
        raise BackendError(
            f"invalid session id {session_id!r}: use letters, digits and . _ - (max 128)"
        )
    return f"ss-{session_id}"


def home_volume_name(user_id: str, template: str) -> str:
    """`ss-home_<user id>_<template>`: ids are hex and template names have no `_`, so the
    name is unambiguous (the v1 scheme joined names with `-`: alice+dev-chromium and
    alice-dev+chromium collided)."""
    if not _ID_RE.fullmatch(user_id) or not _TEMPLATE_RE.fullmatch(template):
        raise BackendError(f"cannot name a home volume for user {user_id!r}, {template!r}")
    return f"ss-home_{user_id}_{template}"


def legacy_home_volume_name(user: str, template: str) -> str:
    """The v1 name, `ss-home-<user>-<template>`, kept only to find volumes to migrate."""
    raw = f"ss-home-{user}-{template}"
    if _VOLUME_OK_RE.fullmatch(raw) and len(raw) <= 200:
        return raw
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{user}-{template}").strip("-.")[:100]
    digest = hashlib.sha256(f"{user}\0{template}".encode()).hexdigest()[:10]
    return f"ss-home-{safe}-{digest}" if safe else f"ss-home-{digest}"


def vnc_password(key: bytes, session_id: str) -> bytes:
    """The session's VNC password: 8 printable bytes from an HMAC of its id."""
    alphabet = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
    digest = hmac.new(key, session_id.encode(), hashlib.sha256).digest()
    return bytes(alphabet[b % len(alphabet)] for b in digest[: vnc.PASSWORD_BYTES])


def _printf_octal(data: bytes) -> str:
    return "".join(f"\\{b:03o}" for b in data)


def _normalize_ref(ref: str) -> str:
    """Add the implicit :latest so catalog references compare equal to engine tags."""
    last = ref.rsplit("/", 1)[-1]
    if "@" in ref or ":" in last:
        return ref
    return f"{ref}:latest"


def _state_of(attrs: dict[str, Any]) -> str:
    """The container's status from either list (string) or inspect (dict) attrs."""
    state = attrs.get("State")
    if isinstance(state, dict):
        return str(state.get("Status", "")).lower()
    return str(state or "").lower()


def _run_state(status: str) -> SessionRunState:
    if status in _RUNNING:
        return "running"
    if status in _HIBERNATED:
        return "hibernated"
    if status in ("dead", "removing"):
        return "exited"
    return "unknown"


def _labels(attrs: dict[str, Any]) -> dict[str, str]:
    labels = attrs.get("Labels")
    if labels is None:
        labels = (attrs.get("Config") or {}).get("Labels")
    return dict(labels or {})


class DockerBackend(Backend):
    """Runs each session as one container on a Docker-compatible engine (see module doc).

    `base_url` is the engine's API (e.g. unix:///run/podman/podman.sock; None = $DOCKER_HOST
    or Docker's default socket). `state_dir` is accepted for parity with the other backends;
    nothing is kept there, because the engine's container labels are the state.
    """

    kind = "docker"

    def __init__(
        self,
        base_url: str | None,
        agent_id: str,
        state_dir: Path,
        *,
        on_exit: ExitCallback | None = None,
        poll_interval: float = 2.0,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        request_timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url
        self.agent_id = agent_id
        self.state_dir = Path(state_dir)
        self.on_exit = on_exit
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.request_timeout = request_timeout
        self._client: docker.DockerClient | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._stopped: set[str] = set()
        self._seen_running: set[str] = set()
        self._images: set[str] | None = None
        self._images_at = 0.0
        self._images_refresh: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._run = self.state_dir / "docker-run"
        self._run.mkdir(mode=0o700, exist_ok=True)
        self._vnc_key = self._load_key(self.state_dir / "vnc-key")
        self.usage = HomeUsage(self.state_dir / "home-usage.json")
        """Home volume sizes, measured on stop/hibernate where the volume's directory is on this
        host (a local engine); a remote engine's volumes are not measured."""
        self._legacy_path = self.state_dir / "legacy-volumes.json"
        self._legacy: dict[str, str] = self._load_legacy()
        """Migrated v1 home volumes: "<user id>_<template>" -> the v1 volume name."""
        self._orphaned_path = self.state_dir / "orphaned-volumes.json"
        self._orphaned: set[str] = self._load_orphaned()
        """v1 home volumes whose owner name no user had when they were to be migrated."""

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

    def _load_legacy(self) -> dict[str, str]:
        try:
            data = json.loads(self._legacy_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _load_orphaned(self) -> set[str]:
        try:
            data = json.loads(self._orphaned_path.read_text())
        except (OSError, ValueError):
            return set()
        return {str(v) for v in data} if isinstance(data, list) else set()

    @staticmethod
    def _write_state(path: Path, data: object) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)

    @property
    def engine_url(self) -> str:
        return self.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    # ---- Backend API --------------------------------------------------------------------

    async def start(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="start")

    async def wake(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="wake")

    async def stop(self, session_id: str) -> None:
        container_name(session_id)
        async with self._lock(session_id):
            self._seen_running.discard(session_id)
            for container in await self._find(session_id):
                await self._call(self._remove, container)
                await self._measure_home(container)
            await asyncio.to_thread(shutil.rmtree, self._run / session_id, True)
            self._stopped.add(session_id)
        log.info("session_stopped session_id=%s", session_id)

    async def hibernate(self, session_id: str) -> None:
        container_name(session_id)
        async with self._lock(session_id):
            found = await self._find(session_id)
            if not found:
                raise BackendError(f"session {session_id} is not known to this agent")
            self._seen_running.discard(session_id)
            for container in found:
                if _state_of(container.attrs) in _RUNNING:
                    await self._call(self._stop_sync, container)
                await self._measure_home(container)
        log.info("session_hibernated session_id=%s", session_id)

    async def status(self, session_id: str) -> InventoryItem:
        container_name(session_id)
        found = await self._find(session_id)
        if not found:
            state: SessionRunState = "stopped" if session_id in self._stopped else "unknown"
            return InventoryItem(session_id=session_id, state=state)
        return self._item(found[0].attrs, session_id)

    async def inventory(self) -> list[InventoryItem]:
        containers = await self._list()
        items = [self._item(c.attrs) for c in containers]
        return sorted(items, key=lambda item: item.session_id)

    def runnable_templates(self, catalog: Iterable[CatalogEntry]) -> list[str]:
        images = self._image_cache()
        return [
            entry.name
            for entry in catalog
            if entry.image is not None and _normalize_ref(entry.image.image) in images
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
        """Connect to the published port, authenticate with the session's password, and offer
        the viewer security type None."""
        item = await self.status(session_id)
        if item.state != "running" or item.endpoint is None:
            raise BackendError(f"session {session_id} is not running on this agent")
        reader, writer = await vnc.open_unix(
            self._socket(session_id), connect_timeout, _socket_owner()
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

    async def healthy(self) -> tuple[bool, str]:
        try:
            await self._call(self._ping)
        except BackendError as exc:
            return False, str(exc)
        with contextlib.suppress(BackendError):
            await self.refresh_images()
        return True, ""

    async def close(self) -> None:
        """Stop watching and drop the client; the containers keep running for the next agent."""
        tasks = [t for t in (self._monitor, self._images_refresh) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._monitor = self._images_refresh = None
        if self._callbacks:
            await asyncio.gather(*self._callbacks, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    # ---- extras used by the agent --------------------------------------------------------

    async def start_monitor(self, on_exit: ExitCallback | None = None) -> None:
        """Poll this agent's containers (every poll_interval) and report unexpected exits."""
        if on_exit is not None:
            self.on_exit = on_exit
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._monitor_loop(), name="docker-monitor")

    async def remove_unknown(self, keep: set[str]) -> list[str]:
        """Remove every container of this agent whose session id is not in keep."""
        removed = sorted({item.session_id for item in await self.inventory()} - set(keep))
        for session_id in removed:
            await self.stop(session_id)
        return removed

    async def refresh_images(self) -> set[str]:
        """Re-read the engine's local image tags (used by runnable_templates)."""
        tags = await self._call(self._local_tags)
        self._images, self._images_at = tags, time.monotonic()
        return tags

    # ---- start / wake -------------------------------------------------------------------

    async def _ensure_running(self, spec: SessionSpec, action: str) -> Endpoint:
        session_id = spec.session_id
        name = container_name(session_id)
        if spec.image is None:
            raise BackendError(f"template {spec.template!r} has no container image")
        async with self._lock(session_id):
            started = time.monotonic()
            found = await self._find(session_id)
            container = found[0] if found else None
            created = False
            if container is None:
                container = await self._create(spec, name)
                created = True
            status = _state_of(container.attrs)
            if status == "paused":
                await self._call(container.unpause)
            elif status not in _RUNNING:
                try:
                    await self._call(container.start)
                except BackendError:
                    if created:
                        await self._call(self._remove, container)
                    raise
            try:
                endpoint = await self._wait_ready(container, session_id)
            except BaseException:
                # A fresh container that never served is removed; an existing one is left
                # stopped (hibernated) so its writable layer is not lost.
                with contextlib.suppress(BackendError):
                    if created:
                        await self._call(self._remove, container)
                    else:
                        await self._call(self._stop_sync, container)
                raise
            self._stopped.discard(session_id)
            self._seen_running.add(session_id)
        log.info(
            "session_started session_id=%s action=%s user=%s template=%s image=%s port=%s "
            "created=%s seconds=%.3f",
            session_id,
            action,
            spec.user,
            spec.template,
            spec.image.image,
            endpoint.port,
            created,
            time.monotonic() - started,
        )
        return endpoint

    async def _create(self, spec: SessionSpec, name: str) -> Container:
        assert spec.image is not None
        image = spec.image.image
        if not await self._call(self._has_image, image):
            self._schedule_image_refresh()
            raise BackendError(
                f"image {image} not built on agent {self.agent_id}; run `streamspace images build`"
            )
        labels = {
            SESSION_LABEL: spec.session_id,
            OWNER_LABEL: spec.user,
            OWNER_ID_LABEL: spec.user_id,
            TEMPLATE_LABEL: spec.template,
            AGENT_LABEL: self.agent_id,
        }
        env = {k: v for k, v in spec.image.env.items() if k not in _RESERVED_ENV}
        env["VNC_GEOMETRY"] = f"{spec.display.width}x{spec.display.height}"
        env["VNC_DEPTH"] = str(spec.display.depth)
        password = vnc_password(self._vnc_key, spec.session_id)
        env[VNC_PASSWORD_ENV] = _printf_octal(vnc.obfuscated_password(password))
        memory_mb = spec.resources.memory_mb
        kwargs: dict[str, Any] = {
            "name": name,
            "labels": labels,
            "environment": env,
            "user": CONTAINER_USER,
            "nano_cpus": spec.resources.cpu_millis * 1_000_000,
            "mem_limit": f"{memory_mb}m",
            "shm_size": f"{max(64, min(512, memory_mb // 4))}m",
            "pids_limit": 2048,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "hostname": "streamspace",
            "detach": True,
        }
        if spec.image.command:
            kwargs["command"] = list(spec.image.command)
        if not spec.network:
            kwargs["network_mode"] = "none"
        run_dir = await asyncio.to_thread(self._prepare_run_dir, spec.session_id)
        kwargs["volumes"] = {str(run_dir): {"bind": CONTAINER_RUN_DIR, "mode": "rw"}}
        env[VNC_SOCKET_ENV] = f"{CONTAINER_RUN_DIR}/vnc.sock"
        if spec.persistent_home:
            volume = self._legacy.get(f"{spec.user_id}_{spec.template}") or home_volume_name(
                spec.user_id, spec.template
            )
            await self._call(self._ensure_volume, volume, spec)
            where = await self._call(self._volume_path, volume)
            if where is not None:
                await asyncio.to_thread(self.usage.check, volume, where, spec.home_limit_mb)
            kwargs["volumes"][volume] = {"bind": CONTAINER_HOME, "mode": "rw"}
        created: Container | None = await self._call(self._create_sync, image, kwargs)
        if created is None:
            raise BackendError(
                f"a container named {name} already exists on the engine but is not "
                f"labelled for agent {self.agent_id}"
            )
        return created

    async def _wait_ready(self, container: Container, session_id: str) -> Endpoint:
        """Wait until the session's VNC socket answers the RFB banner."""
        deadline = time.monotonic() + self.start_timeout
        next_inspect = 0.0
        socket_path = self._socket(session_id)
        while True:
            now = time.monotonic()
            if now >= next_inspect:
                if not await self._call(self._reload, container):
                    raise BackendError("the session container was removed during startup")
                status = _state_of(container.attrs)
                if status not in _RUNNING:
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
            raw = await self._call(container.logs, tail=lines)
        except BackendError:
            return "(logs unavailable)"
        text = raw.decode(errors="replace").strip() if isinstance(raw, bytes) else str(raw)
        return text or "(no output)"

    # ---- monitor ------------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        with contextlib.suppress(BackendError):
            await self.refresh_images()
        while True:
            try:
                await self._check_all()
            except BackendError as exc:
                log.warning("monitor_engine_unreachable error=%s", exc)
            except Exception:
                log.exception("monitor_check_failed")
            await asyncio.sleep(self.poll_interval)

    async def _check_all(self) -> None:
        containers = {
            self._session_of(c.attrs): c for c in await self._list() if self._session_of(c.attrs)
        }
        for session_id, container in containers.items():
            if _state_of(container.attrs) in _RUNNING and not self._lock(session_id).locked():
                self._seen_running.add(session_id)
        for session_id in list(self._seen_running):
            lock = self._lock(session_id)
            if lock.locked():
                continue  # start/stop/hibernate owns the session right now
            listed = containers.get(session_id)
            if listed is not None and _state_of(listed.attrs) in _RUNNING:
                continue
            async with lock:
                if session_id not in self._seen_running:
                    continue
                found = await self._find(session_id)
                if found and _state_of(found[0].attrs) in _RUNNING:
                    continue
                self._seen_running.discard(session_id)
                reason = await self._exit_reason(found[0] if found else None)
            log.warning("session_exited session_id=%s reason=%r", session_id, reason)
            if self.on_exit is not None:
                task = asyncio.create_task(self._notify(session_id, reason))
                self._callbacks.add(task)
                task.add_done_callback(self._callbacks.discard)

    async def _exit_reason(self, container: Container | None) -> str:
        if container is None:
            return "session container was removed"
        try:
            if not await self._call(self._reload, container):
                return "session container was removed"
        except BackendError:
            return "session container state unavailable (engine unreachable)"
        state = container.attrs.get("State") or {}
        if state.get("OOMKilled"):
            return "app was killed: out of memory"
        reason = f"app exited with code {state.get('ExitCode')}"
        tail = await self._logs_tail(container, lines=3)
        return f"{reason}: {tail}" if tail and tail != "(no output)" else reason

    async def _notify(self, session_id: str, reason: str) -> None:
        assert self.on_exit is not None
        try:
            await self.on_exit(session_id, reason)
        except Exception:
            log.exception("on_exit_callback_failed session_id=%s", session_id)

    # ---- engine helpers (sync ones run in threads via _call) -----------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking SDK call in a thread; every engine failure becomes a BackendError.

        Cases a caller must tell apart (missing image, vanished container, name conflict) are
        handled inside the synchronous helpers, which return a value for them instead. The
        client itself is only ever created inside such a thread (construction talks to the
        engine to negotiate the API version).
        """
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.APIError as exc:
            raise BackendError(f"container engine error: {exc.explanation or exc}") from exc
        except (docker.errors.DockerException, OSError) as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: BaseException) -> BackendError:
        return BackendError(f"container engine unreachable at {self.engine_url}: {exc}")

    def _client_sync(self) -> docker.DockerClient:
        if self._client is None:
            try:
                if self.base_url is None:
                    self._client = docker.from_env(timeout=int(self.request_timeout))
                else:
                    self._client = docker.DockerClient(
                        base_url=self.base_url, timeout=int(self.request_timeout)
                    )
            except docker.errors.DockerException as exc:
                raise self._unreachable(exc) from exc
        return self._client

    def _ping(self) -> bool:
        return bool(self._client_sync().ping())

    def _has_image(self, ref: str) -> bool:
        try:
            self._client_sync().images.get(ref)
        except docker.errors.ImageNotFound:
            return False
        return True

    def _create_sync(self, image: str, kwargs: dict[str, Any]) -> Container | None:
        """Create the container; None if its name is taken (HTTP 409)."""
        try:
            return self._client_sync().containers.create(image, **kwargs)
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                return None
            raise

    def _list_sync(self, labels: list[str]) -> list[Container]:
        result: list[Container] = self._client_sync().containers.list(
            all=True, sparse=True, filters={"label": labels}
        )
        return result

    def _reload(self, container: Container) -> bool:
        """Refresh container.attrs by inspect; False if the container no longer exists."""
        try:
            container.reload()
        except docker.errors.NotFound:
            return False
        return True

    def _stop_sync(self, container: Container) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            container.stop(timeout=int(self.stop_timeout))

    def _local_tags(self) -> set[str]:
        tags: set[str] = set()
        for image in self._client_sync().images.list():
            for tag in image.attrs.get("RepoTags") or []:
                tags.add(tag)
                for prefix in ("docker.io/library/", "docker.io/"):
                    if tag.startswith(prefix):
                        tags.add(tag[len(prefix) :])
        return tags

    def _image_cache(self) -> set[str]:
        """Local image tags for the (synchronous) runnable_templates.

        The first call reads them directly when the engine is on a local unix socket (one quick
        request; an absent socket fails at once); otherwise, and on later calls, the cache is
        used and refreshed in the background when missing or over 30 s old.
        """
        if self._images is None and not self.engine_url.startswith(("unix://", "/")):
            self._schedule_image_refresh()
            return set()
        if self._images is None:
            try:
                self._images, self._images_at = self._local_tags(), time.monotonic()
            except (docker.errors.DockerException, OSError, BackendError) as exc:
                log.warning("image_list_failed url=%s error=%s", self.engine_url, exc)
                return set()
        elif time.monotonic() - self._images_at > 30.0:
            self._schedule_image_refresh()
        return self._images

    def _schedule_image_refresh(self) -> None:
        if self._images_refresh is not None and not self._images_refresh.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def refresh() -> None:
            with contextlib.suppress(BackendError):
                await self.refresh_images()

        self._images_refresh = loop.create_task(refresh(), name="docker-image-refresh")

    def _volume_path(self, name: str) -> Path | None:
        """The volume's directory if the agent can read it (the engine runs on this host)."""
        try:
            mountpoint = (self._client_sync().volumes.get(name).attrs or {}).get("Mountpoint")
        except docker.errors.NotFound:
            return None
        path = Path(mountpoint) if mountpoint else None
        return path if path is not None and os.access(path, os.R_OK | os.X_OK) else None

    async def _measure_home(self, container: Container) -> None:
        mounts = (container.attrs or {}).get("Mounts") or []
        for mount in mounts:
            if mount.get("Destination") == CONTAINER_HOME and mount.get("Name"):
                where = await self._call(self._volume_path, mount["Name"])
                if where is not None:
                    await asyncio.to_thread(self.usage.measure, mount["Name"], where)

    def _socket(self, session_id: str) -> Path:
        return self._run / session_id / "vnc.sock"

    def _prepare_run_dir(self, session_id: str) -> Path:
        """The session's socket directory: a real directory owned by the container's uid."""
        uid, gid = (int(x) for x in CONTAINER_USER.split(":"))
        path = self._run / session_id
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        if path.is_symlink() or not path.is_dir():
            raise BackendError(f"{path} is not a directory")
        if os.geteuid() == 0:
            os.chown(path, uid, gid, follow_symlinks=False)
        path.chmod(0o700)
        return path

    def _ensure_volume(self, name: str, spec: SessionSpec) -> None:
        """Create the home volume, or check that the existing one is this user's for this
        template: a volume is never handed to someone its labels do not name."""
        volumes = self._client_sync().volumes
        try:
            volume = volumes.get(name)
        except docker.errors.NotFound:
            volumes.create(
                name,
                labels={
                    OWNER_LABEL: spec.user,
                    OWNER_ID_LABEL: spec.user_id,
                    TEMPLATE_LABEL: spec.template,
                },
            )
            return
        labels = (volume.attrs or {}).get("Labels") or {}
        legacy = self._legacy.get(f"{spec.user_id}_{spec.template}") == name
        owner_ok = labels.get(OWNER_ID_LABEL) == spec.user_id or (
            legacy and OWNER_ID_LABEL not in labels
        )
        if not owner_ok or labels.get(TEMPLATE_LABEL) != spec.template:
            raise BackendError(
                f"home volume {name} exists but is not labelled for this user and template; "
                "refusing to mount someone else's files"
            )

    # ---- v1 home volumes ------------------------------------------------------------------

    def _legacy_volumes_sync(self) -> list[tuple[str, str, str]]:
        """(volume, owner name, template) of v1 home volumes not yet mapped to an id."""
        mapped = set(self._legacy.values()) | self._orphaned
        found = []
        for volume in self._client_sync().volumes.list(filters={"label": OWNER_LABEL}):
            labels = (volume.attrs or {}).get("Labels") or {}
            if OWNER_ID_LABEL in labels or volume.name in mapped:
                continue
            owner, template = labels.get(OWNER_LABEL, ""), labels.get(TEMPLATE_LABEL, "")
            if owner and template and volume.name == legacy_home_volume_name(owner, template):
                found.append((volume.name, owner, template))
        return found

    async def legacy_home_names(self) -> list[str]:
        try:
            found = await self._call(self._legacy_volumes_sync)
        except BackendError:
            return []
        return sorted({owner for _, owner, _ in found})

    async def migrate_homes(self, owners: dict[str, str]) -> dict[str, str]:
        """Map v1 volumes (named after user names) to the ids those names have now.

        Volume labels cannot change, so the mapping is kept in the agent's state. Volumes of
        names no user has stay where they are, unmounted, and are recorded as orphaned so that
        a user created later under the same name does not get them (nothing is deleted)."""
        moved: dict[str, str] = {}
        orphaned: set[str] = set()
        for volume, owner, template in await self._call(self._legacy_volumes_sync):
            user_id = owners.get(owner)
            if user_id is None:
                orphaned.add(volume)
                log.warning("home_volume_orphaned volume=%s owner=%s", volume, owner)
                continue
            if not _ID_RE.fullmatch(user_id):
                log.warning("home_volume_bad_owner_id volume=%s owner=%s", volume, owner)
                continue
            self._legacy.setdefault(f"{user_id}_{template}", volume)
            moved[volume] = user_id
            log.info("home_volume_migrated volume=%s owner=%s user_id=%s", volume, owner, user_id)
        if moved:
            await asyncio.to_thread(self._write_state, self._legacy_path, self._legacy)
        if orphaned:
            self._orphaned |= orphaned
            await asyncio.to_thread(self._write_state, self._orphaned_path, sorted(self._orphaned))
        return moved

    def _remove(self, container: Container) -> None:
        try:
            container.remove(force=True, v=False)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # Removal already under way (e.g. a concurrent stop) counts as removed.
            if exc.status_code != 409:
                raise

    async def _list(self) -> list[Container]:
        result: list[Container] = await self._call(
            self._list_sync, [f"{AGENT_LABEL}={self.agent_id}"]
        )
        return result

    async def _find(self, session_id: str) -> list[Container]:
        """This agent's containers for one session (normally zero or one), inspected."""
        labels = [f"{AGENT_LABEL}={self.agent_id}", f"{SESSION_LABEL}={session_id}"]
        listed: list[Container] = await self._call(self._list_sync, labels)
        return [c for c in listed if await self._call(self._reload, c)]

    def _session_of(self, attrs: dict[str, Any]) -> str:
        session_id = _labels(attrs).get(SESSION_LABEL, "")
        if session_id:
            return session_id
        names = attrs.get("Names") or [attrs.get("Name") or ""]
        name = str(names[0]).lstrip("/")
        return name[3:] if name.startswith("ss-") else name

    def _item(self, attrs: dict[str, Any], session_id: str | None = None) -> InventoryItem:
        labels = _labels(attrs)
        state = _run_state(_state_of(attrs))
        sid = session_id or self._session_of(attrs)
        endpoint = (
            Endpoint(unix_path=str(self._socket(sid)))
            if state == "running" and _SESSION_ID_RE.fullmatch(sid)
            else None
        )
        return InventoryItem(
            session_id=sid,
            state=state,
            endpoint=endpoint,
            user=labels.get(OWNER_LABEL),
            template=labels.get(TEMPLATE_LABEL),
        )

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())


def _socket_owner() -> int | None:
    """The uid the session's socket must have: a rootless engine maps it to a subordinate id."""
    return _UID if os.geteuid() == 0 else None


async def _rfb_answers(socket_path: Path) -> bool:
    try:
        with vnc.socket_handle(socket_path, owner=_socket_owner()) as path:
            return await rfb_answers(unix_path=path, read_timeout=1.0)
    except OSError:  # not there (yet), or not a socket of the container's user
        return False
