"""Sessions as pods on a Kubernetes cluster, through its API server.

Design notes:

* The API server is the source of truth. A session is one Pod (`objects.make_pod`) plus a
  Secret with its VNC password; both are labelled with the agent, so an agent restarted with
  the same id adopts its sessions from two watch caches (`reflector.py`): pods and secrets of
  this agent in its namespace. Status and inventory read those caches; nothing polls per
  session.
* States: a pod that is not being deleted is "running" (until its phase says it finished:
  "exited"); a Secret without a pod is "hibernated" (hibernate deletes the pod and keeps the
  Secret and the home); neither is "stopped"/"unknown".
* The home is a PVC per user id + template (`make_pvc`), reused only if its annotations name
  the same user id and template; stop keeps it.
* No Service: the agent dials the pod IP. The pod's VNC port is reachable inside the cluster, so
  a NetworkPolicy admits it only from the agent's pods, and Xvnc requires the session's VNC
  password (derived like the docker backend's, from a key in the state dir, and read back from
  the Secret to authenticate, so an agent with a fresh state dir still gets in).
* Start reports milestones as the pod's status passes them ("scheduled on node n1", "pulling
  image …", "container started", "VNC ready") through `on_progress`, and fails within a watch
  event of a clear failure (`podstate.failure`: ErrImagePull, Unschedulable, CrashLoopBackOff,
  …) instead of waiting for the start timeout; a missing StorageClass fails before anything
  is created.
* Every API refusal becomes a BackendError naming the verb and resource (`api.translate`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any, Self

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from streamspace import logs
from streamspace.agent import vnc
from streamspace.agent.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    ExitCallback,
    ProgressCallback,
    SftpAccess,
    SoundServer,
    VNCStream,
    rfb_answers,
)
from streamspace.agent.backends.kubernetes import api, objects, podstate, resources
from streamspace.agent.backends.kubernetes.monitor import PodExits, session_of
from streamspace.agent.backends.kubernetes.reflector import Reflector
from streamspace.agent.backends.kubernetes.settings import KubeConfig
from streamspace.private_files import create_private_file, private_dir
from streamspace.protocol import (
    CatalogEntry,
    Endpoint,
    InventoryItem,
    Isolation,
    SessionRunState,
    SessionSpec,
)

log = logs.get_logger("streamspace.agent.kubernetes")

SYNC_TIMEOUT = resources.SYNC_TIMEOUT
SOUND_PROBE_SECONDS = 3.0
"""How long the pod's sound port may take to accept before the session counts as soundless."""
PROBE_INTERVAL = 0.05
"""How often a starting pod's VNC port is tried: as often as the docker backend tries, for
FAST_PROBE_SECONDS after the pod gets its address and whenever its container runs; in between
(a long image pull keeps the container waiting with the address already there) every
SLOW_PROBE_INTERVAL, so many slow starts do not hammer the pod network. A status change wakes
the wait at once either way."""
SLOW_PROBE_INTERVAL = 0.5
FAST_PROBE_SECONDS = 2.0


class KubernetesBackend(Backend):
    """Runs each session as one pod in one namespace of a cluster (see module doc).

    `state_dir` holds only the VNC key; `config` says how to reach the cluster and what the
    pods get. `api_client` replaces the one built from `config` (its caller closes it)."""

    kind = "kubernetes"

    def __init__(
        self,
        agent_id: str,
        state_dir: Path,
        *,
        config: KubeConfig | None = None,
        on_exit: ExitCallback | None = None,
        on_progress: ProgressCallback | None = None,
        api_client: k8s.ApiClient | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.state_dir = Path(state_dir)
        self.config = config or KubeConfig()
        self.on_exit = on_exit
        self.on_progress = on_progress
        self.namespace = self.config.namespace
        self._client = api_client
        self._own_client = api_client is None
        self._connecting = asyncio.Lock()
        self._pods: Reflector | None = None
        self._secrets: Reflector | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._stopped: set[str] = set()
        self._objects: resources.SessionObjects | None = None
        self._exits = PodExits(lock=self._lock, notify=self._notify)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._vnc_key = _load_key(self.state_dir / "vnc-key")

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        """Pods are labelled with an id of the state dir, not the enrolled agent id: they must
        be findable across restarts from the first start on, before enrolment (as docker's)."""
        return cls(
            label_id(options.state_dir),
            options.state_dir,
            config=KubeConfig.from_settings(options.settings),
        )

    # ---- connection and caches ---------------------------------------------------------

    async def _ready(self) -> tuple[Reflector, Reflector]:
        """Connect and fill both caches once; later calls return at once."""
        async with self._connecting:
            if self._pods is None or self._secrets is None:
                if self._client is None:
                    self._client, found = await api.new_api_client(
                        self.config.kubeconfig, self.config.context
                    )
                    self.namespace = self.namespace or found
                self.namespace = self.namespace or "default"
                core = k8s.CoreV1Api(self._client)
                selector = objects.agent_selector(self.agent_id)
                pods = Reflector(
                    functools.partial(core.list_namespaced_pod, self.namespace),
                    kind="pods",
                    label_selector=f"{selector},{objects.COMPONENT_LABEL}=session",
                )
                secrets = Reflector(
                    functools.partial(core.list_namespaced_secret, self.namespace),
                    kind="secrets",
                    label_selector=f"{selector},{objects.COMPONENT_LABEL}=session",
                )
                pods.add_listener(self._exits.on_event)
                self._pods, self._secrets = pods, secrets
                self._objects = resources.SessionObjects(
                    client=self._client,
                    namespace=self.namespace,
                    agent_id=self.agent_id,
                    config=self.config,
                    secrets=secrets,
                    vnc_key=self._vnc_key,
                )
                pods.start()
                secrets.start()
        for cache in (self._pods, self._secrets):
            if not cache.synced:
                try:
                    await cache.wait_synced(SYNC_TIMEOUT)
                except ApiException as exc:
                    raise api.translate(exc, "list", cache.kind, self.namespace) from exc
                except TimeoutError:
                    raise BackendError(
                        f"the Kubernetes API server did not list {cache.kind} within "
                        f"{SYNC_TIMEOUT:.0f}s"
                    ) from None
                except BackendError:
                    raise
                except Exception as exc:
                    raise BackendError(f"cannot list {cache.kind}: {exc}") from exc
        return self._pods, self._secrets

    @property
    def _core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self._client)

    def _pod(self, session_id: str) -> dict[str, Any] | None:
        assert self._pods is not None
        return self._pods.items.get(objects.pod_name(session_id))

    def _secret(self, session_id: str) -> dict[str, Any] | None:
        assert self._secrets is not None
        return self._secrets.items.get(objects.secret_name(session_id))

    async def _call(
        self, awaitable: Awaitable[Any], verb: str, resource: str, ok: tuple[int, ...] = ()
    ) -> Any:
        return await api.call(awaitable, verb, resource, self.namespace, ok=ok)

    # ---- Backend API --------------------------------------------------------------------

    async def start(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="start")

    async def wake(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="wake")

    async def stop(self, session_id: str) -> None:
        objects.pod_name(session_id)
        await self._ready()
        async with self._lock(session_id):
            await self._delete_pod(session_id)
            await self._call(
                self._core.delete_namespaced_secret(
                    objects.secret_name(session_id), self.namespace
                ),
                "delete",
                "secrets",
                ok=(404,),
            )
            assert self._secrets is not None
            secrets, name = self._secrets, objects.secret_name(session_id)
            await secrets.wait_for(lambda: name not in secrets.items, SYNC_TIMEOUT)
            self._stopped.add(session_id)
        log.event("session_stopped", session_id=session_id, namespace=self.namespace)

    async def hibernate(self, session_id: str) -> None:
        objects.pod_name(session_id)
        await self._ready()
        async with self._lock(session_id):
            if self._pod(session_id) is None and self._secret(session_id) is None:
                raise BackendError(f"session {session_id} is not known to this agent")
            await self._delete_pod(session_id)
        log.event("session_hibernated", session_id=session_id, namespace=self.namespace)

    async def status(self, session_id: str) -> InventoryItem:
        objects.pod_name(session_id)
        await self._ready()
        pod = self._pod(session_id)
        if pod is not None and not podstate.terminating(pod):
            return self._item(pod)
        secret = self._secret(session_id)
        if secret is not None:
            return self._item(secret, state="hibernated")
        state: SessionRunState = "stopped" if session_id in self._stopped else "unknown"
        return InventoryItem(session_id=session_id, state=state)

    async def inventory(self) -> list[InventoryItem]:
        pods, secrets = await self._ready()
        items: dict[str, InventoryItem] = {}
        for secret in secrets.items.values():
            if session_of(secret):
                items[session_of(secret)] = self._item(secret, state="hibernated")
        for pod in pods.items.values():
            if session_of(pod) and not podstate.terminating(pod):
                items[session_of(pod)] = self._item(pod)
        return sorted(items.values(), key=lambda item: item.session_id)

    def runnable_templates(self, catalog: Iterable[CatalogEntry]) -> list[str]:
        """Every image template: the cluster's nodes pull images, the agent cannot see them."""
        return [entry.name for entry in catalog if entry.image is not None]

    def isolation(self) -> Isolation:
        return Isolation(
            mode="container",
            detail=(
                "one pod per session as uid 1000 (runAsNonRoot), all capabilities dropped, no "
                "privilege escalation, seccomp RuntimeDefault, no ServiceAccount token; VNC "
                "admitted only from the agent's pods (NetworkPolicy), with a per-session password"
            ),
            limits_enforced=True,
        )

    async def open_vnc(self, session_id: str, connect_timeout: float = 10.0) -> VNCStream:
        """Connect to the pod's VNC port, authenticate with the session's password (from its
        Secret), and offer the viewer security type None."""
        item = await self.status(session_id)
        if item.state != "running" or item.endpoint is None:
            raise BackendError(f"session {session_id} is not running on this agent")
        password = self._password(session_id)
        reader, writer = await vnc.open_endpoint(item.endpoint, connect_timeout)
        try:
            await asyncio.wait_for(vnc.authenticate(reader, writer, password), connect_timeout)
        except BaseException:
            writer.close()
            raise
        front = vnc.NoneSecurityFront(reader, writer)
        return front, front

    async def open_audio(self, session_id: str) -> SoundServer:
        """The pod's sound port (cookie authentication; its cookie from the session's Secret),
        once it accepts a connection: an image without pulseaudio has nothing listening."""
        item = await self.status(session_id)
        if item.state != "running" or item.endpoint is None or item.endpoint.host is None:
            raise BackendError(f"session {session_id} is not running on this agent")
        host = item.endpoint.host
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, objects.SOUND_PORT), SOUND_PROBE_SECONDS
            )
        except (OSError, TimeoutError):
            raise BackendError(
                "the session has no sound server (its image has no pulseaudio)"
            ) from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return SoundServer(host=host, port=objects.SOUND_PORT, cookie=self._cookie(session_id))

    async def home_access(self, session_id: str) -> SftpAccess:
        """The pod's SFTP server (the image's sshd, as the session user, admitting only this
        session's agent key), while the pod runs: a hibernated session's home is its claim,
        which only a pod can mount."""
        item = await self.status(session_id)
        if item.state != "running" or item.endpoint is None or item.endpoint.host is None:
            raise BackendError(
                f"session {session_id} is not running on this agent (a pod's files are "
                "reachable while it runs)"
            )
        client_key, host_key = self._files_keys(session_id)
        return SftpAccess(
            host=item.endpoint.host,
            port=objects.FILES_PORT,
            user=objects.FILES_USER,
            client_key=client_key,
            host_key=host_key,
            root=objects.CONTAINER_HOME,
        )

    async def healthy(self) -> tuple[bool, str]:
        try:
            pods, secrets = await self._ready()
        except BackendError as exc:
            return False, str(exc)
        for cache in (pods, secrets):
            if cache.last_error is not None:
                return False, f"watching {cache.kind} fails: {cache.last_error}"
        return True, ""

    async def close(self) -> None:
        """Stop watching and drop the client; the pods keep running for the next agent."""
        for cache in (self._pods, self._secrets):
            if cache is not None:
                await cache.close()
        self._pods = self._secrets = None
        await self._exits.close()
        if self._client is not None and self._own_client:
            await self._client.close()
            self._client = None

    # ---- hooks the agent calls -------------------------------------------------------------

    async def watch_exits(self, on_exit: ExitCallback) -> None:
        """Report pods that end on their own through `on_exit`, from the pod cache's events."""
        self.on_exit = on_exit
        pods, _ = await self._ready()
        self._exits.adopt(list(pods.items.values()))
        self._exits.enabled = True

    def report_progress(self, on_progress: ProgressCallback) -> None:
        self.on_progress = on_progress

    # ---- start / wake -------------------------------------------------------------------

    async def _ensure_running(self, spec: SessionSpec, action: str) -> Endpoint:
        session_id = spec.session_id
        name = objects.pod_name(session_id)
        if spec.image is None:
            raise BackendError(f"template {spec.template!r} has no container image")
        pods, _ = await self._ready()
        async with self._lock(session_id):
            started = time.monotonic()
            deadline = started + self.config.start_timeout
            pod = self._pod(session_id)
            if pod is not None and (
                podstate.run_state(pod) == "exited" or podstate.failure(pod) is not None
            ):
                # A finished pod, or one that will never come up (left by an earlier attempt,
                # or adopted): a fresh one may, e.g. once the image exists.
                await self._delete_pod(session_id)
            await self._wait_gone(pods, name, deadline)
            created = self._pod(session_id) is None
            if created:
                assert self._objects is not None
                session_objects = self._objects
                # Independent objects, so one round trip instead of three; the pod waits for
                # all of them: it must not mount a claim that turned out to be someone else's.
                _, _, claim = await asyncio.gather(
                    session_objects.ensure_policies(),
                    session_objects.ensure_secret(spec),
                    _maybe(session_objects.ensure_home(spec) if spec.persistent_home else None),
                )
                manifest = objects.make_pod(
                    spec,
                    agent_id=self.agent_id,
                    namespace=self.namespace,
                    settings=self.config.pod,
                    home_claim=claim,
                )
                made = await self._call(
                    self._core.create_namespaced_pod(self.namespace, resources.body(manifest)),
                    "create",
                    "pods",
                    ok=(409,),
                )
                if made is None and self._pod(session_id) is None:
                    raise BackendError(
                        f"a pod named {name} already exists in namespace {self.namespace} "
                        f"but is not labelled for agent {self.agent_id}"
                    )
                await pods.wait_for(lambda: name in pods.items, SYNC_TIMEOUT)
                await self._progress(session_id, f"pod {name} created")
            try:
                endpoint = await self._wait_ready(pods, session_id, deadline)
            except BaseException:
                if created:  # a fresh pod that never served goes; secret and home stay
                    await self._delete_pod(session_id)
                raise
            self._stopped.discard(session_id)
            self._exits.saw_running(session_id)
        log.event(
            "session_started",
            session_id=session_id,
            action=action,
            user=spec.user,
            template=spec.template,
            image=spec.image.image,
            namespace=self.namespace,
            endpoint=endpoint.describe(),
            created=created,
            seconds=round(time.monotonic() - started, 3),
        )
        return endpoint

    async def _wait_gone(self, pods: Reflector, name: str, deadline: float) -> None:
        """A pod still terminating (from a hibernate or stop just before) must be gone before
        one of the same name can be created."""
        pod = pods.items.get(name)
        if pod is None or not podstate.terminating(pod):
            return  # a live pod is the session's own (start is idempotent)
        if not await pods.wait_for(lambda: name not in pods.items, deadline - time.monotonic()):
            raise BackendError(f"the session's previous pod {name} is still being deleted")

    async def _wait_ready(self, pods: Reflector, session_id: str, deadline: float) -> Endpoint:
        """Follow the pod's status through the cache until its VNC server answers.

        The port is probed from the moment the pod has an address, not only once its status
        says the container runs: that status is one more kubelet write and watch event, and
        Xvnc may already listen. Ready is returned only when the cache says running too, so
        what `status` and `open_vnc` read next agrees."""
        name = objects.pod_name(session_id)
        reported: set[str] = set()
        answered = False
        addressed_at: float | None = None
        port = self.config.pod.vnc_port
        while True:
            pod = pods.items.get(name)
            if pod is None or podstate.terminating(pod):
                raise BackendError("the session pod was deleted during startup")
            failed = podstate.failure(pod)
            if failed is not None:
                raise BackendError(failed)
            for milestone in podstate.progress(pod):
                if milestone not in reported:
                    reported.add(milestone)
                    await self._progress(session_id, milestone)
            address = podstate.pod_ip(pod)
            if address and addressed_at is None:
                addressed_at = time.monotonic()
            if address and not answered:
                answered = await rfb_answers(port, host=address, read_timeout=1.0)
            if answered and podstate.container_running(pod):
                await self._progress(session_id, "VNC ready")
                return Endpoint(host=address, port=port)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError(
                    f"the session's VNC server did not answer within "
                    f"{self.config.start_timeout:.0f}s (pod phase {podstate.phase(pod)})"
                )
            # An address but no answer yet: probe again soon; otherwise sleep until the pod
            # changes.
            wait = remaining
            if address and not answered and addressed_at is not None:
                hurry = (
                    podstate.container_running(pod)
                    or time.monotonic() - addressed_at < FAST_PROBE_SECONDS
                )
                wait = min(remaining, PROBE_INTERVAL if hurry else SLOW_PROBE_INTERVAL)
            await pods.wait_for(functools.partial(_changed, pods, name, _version(pod)), wait)

    async def _delete_pod(self, session_id: str) -> None:
        """Delete the pod and wait until the cache shows it gone or terminating, so what this
        agent reports next already says so (the kubelet may take the grace period to end it)."""
        self._exits.expect_gone(session_id)
        name = objects.pod_name(session_id)
        await self._call(
            self._core.delete_namespaced_pod(
                name, self.namespace, grace_period_seconds=self.config.delete_grace_seconds
            ),
            "delete",
            "pods",
            ok=(404,),
        )
        assert self._pods is not None
        pods = self._pods
        await pods.wait_for(
            lambda: name not in pods.items or podstate.terminating(pods.items[name]),
            SYNC_TIMEOUT,
        )

    def _item(self, obj: dict[str, Any], state: SessionRunState | None = None) -> InventoryItem:
        notes = (obj.get("metadata") or {}).get("annotations") or {}
        run = state or podstate.run_state(obj)
        address = podstate.pod_ip(obj) if state is None else ""
        endpoint = (
            Endpoint(host=address, port=self.config.pod.vnc_port)
            if run == "running" and address and podstate.container_running(obj)
            else None
        )
        return InventoryItem(
            session_id=session_of(obj),
            state=run,
            endpoint=endpoint,
            user=notes.get(objects.OWNER_ANNOTATION),
            template=notes.get(objects.TEMPLATE_ANNOTATION),
        )

    def _password(self, session_id: str) -> bytes:
        secret = self._secret(session_id)
        data = (secret or {}).get("data") or {}
        encoded = data.get(objects.SECRET_PASSWORD_KEY)
        if not encoded:
            return objects.vnc_password(self._vnc_key, session_id)
        return base64.b64decode(encoded)

    def _cookie(self, session_id: str) -> bytes:
        secret = self._secret(session_id)
        data = (secret or {}).get("data") or {}
        encoded = data.get(objects.SECRET_COOKIE_KEY)
        if not encoded:
            return objects.sound_cookie(self._vnc_key, session_id)
        return bytes.fromhex(base64.b64decode(encoded).decode("ascii"))

    def _files_keys(self, session_id: str) -> tuple[bytes, str]:
        """(the agent's private key, the pod's host key line), as the Secret holds them."""
        data = (self._secret(session_id) or {}).get("data") or {}
        client = data.get(objects.SECRET_FILES_CLIENT_KEY)
        host = data.get(objects.SECRET_FILES_HOST_PUBLIC)
        if client and host:
            return base64.b64decode(client), base64.b64decode(host).decode("ascii")
        keys = objects.files_keys(self._vnc_key, session_id)
        return keys.client_private.encode("ascii"), keys.host_public

    # ---- callbacks and locks ------------------------------------------------------------

    async def _progress(self, session_id: str, message: str) -> None:
        log.event("session_progress", session_id=session_id, message=message)
        if self.on_progress is None:
            return
        try:
            await self.on_progress(session_id, message)
        except Exception:
            log.exception("on_progress_callback_failed", session_id=session_id)

    async def _notify(self, session_id: str, reason: str) -> None:
        if self.on_exit is None:
            return
        try:
            await self.on_exit(session_id, reason)
        except Exception:
            log.exception("on_exit_callback_failed", session_id=session_id)

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())


async def _maybe(awaitable: Awaitable[str] | None) -> str | None:
    return None if awaitable is None else await awaitable


def _version(obj: dict[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


def _changed(pods: Reflector, name: str, version: str) -> bool:
    return _version(pods.items.get(name)) != version


def label_id(state_dir: Path) -> str:
    """A stable id for labelling this agent's pods and secrets, made once per state dir
    (blocking; a label value: 32 hex digits)."""
    path = state_dir / "backend-id"
    if path.exists():
        return path.read_text().strip()
    private_dir(state_dir)
    value = uuid.uuid4().hex
    create_private_file(path)
    path.write_text(value)
    return value


def _load_key(path: Path) -> bytes:
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        key = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex())
        return key
