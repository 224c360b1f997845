"""The kubelet half of the test node: one worker per pod bound to it.

A worker creates the pod's sandbox (a `sleep` container on the node's podman network holding
the pod's IP and hostname, which the app containers join) and starts it while it creates the
app containers, which start once it runs. Each app container goes through the kubelet's
states: waiting (ContainerCreating, ErrImagePull -> ImagePullBackOff,
CreateContainerConfigError, CrashLoopBackOff), running, terminated; the restart policy decides
what follows an exit. Every change is written to `pods/status` at once. Stopping a worker
removes the pod's containers and its scratch directory; claims stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamspace.logs import get_logger

from .api import Kube, KubeError, ns_path
from .engine import (
    CONTAINER_LABEL,
    INFRA,
    NODE_LABEL,
    POD_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    POD_UID_LABEL,
    EngineError,
    Podman,
)
from .sources import (
    PodPaths,
    VolumeNotReady,
    container_mounts,
    needs_pod_ip,
    prepare_volumes,
    resolve_env,
)
from .spec import ConfigError, create_spec
from .status import ContainerState, now, pod_status, terminated

Obj = dict[str, Any]
log = get_logger(__name__)


@dataclass(frozen=True)
class NodeContext:
    """What every pod worker shares: the node's identity, engine, API and timings."""

    kube: Kube
    podman: Podman
    node_id: str
    host_ip: str
    network: str
    state_dir: Path
    infra_image: str
    expect_exit: Callable[[str], asyncio.Future[None]]
    retry_seconds: float = 1.0
    pull_backoff: float = 2.0
    crash_backoff: float = 1.0
    backoff_cap: float = 10.0


class PodWorker:
    def __init__(self, ctx: NodeContext, pod: Obj) -> None:
        self.ctx = ctx
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.name: str = meta["name"]
        self.namespace: str = meta["namespace"]
        self.path = ns_path(self.namespace, "pods", self.name)
        self.containers = [
            ContainerState(c["name"], c["image"]) for c in pod["spec"].get("containers") or []
        ]
        self.init_containers = [
            ContainerState(c["name"], c["image"]) for c in pod["spec"].get("initContainers") or []
        ]
        if self.init_containers:
            for state in self.containers:
                state.state = _waiting("PodInitializing")
        self.initialized = not self.init_containers
        self.init_failed = False
        self.pod_ip = ""
        self.sandbox_ready = False
        self._sandbox_up: asyncio.Future[None] | None = None
        """Done once the sandbox runs, has its address and that is reported."""
        self._sandbox_started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the sandbox runs: its network namespace is there to join."""
        self.start_time = now()
        self.paths = PodPaths(ctx.state_dir / "pods" / self.uid, ctx.state_dir / "claims")
        self._last: Obj | None = None
        self._report_lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None

    @property
    def prefix(self) -> str:
        return f"k8s_{self.namespace}_{self.name}_{self.uid[:8]}"

    def labels(self, container: str) -> dict[str, str]:
        return {
            NODE_LABEL: self.ctx.node_id,
            POD_UID_LABEL: self.uid,
            POD_NAME_LABEL: self.name,
            POD_NAMESPACE_LABEL: self.namespace,
            CONTAINER_LABEL: container,
        }

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"pod {self.namespace}/{self.name}")

    async def stop(self, grace: int, finish_deletion: bool) -> None:
        """Kill the pod's containers (SIGTERM, `grace` s, SIGKILL), remove them and its scratch
        directory; then, for an object marked for deletion, delete it for good."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        podman = self.ctx.podman
        ids = await podman.container_ids(f"{POD_UID_LABEL}={self.uid}")
        infra = await podman.container_ids(
            f"{POD_UID_LABEL}={self.uid}", f"{CONTAINER_LABEL}={INFRA}"
        )
        await podman.remove([i for i in ids if i not in infra], grace)
        await podman.remove(infra)
        await asyncio.to_thread(shutil.rmtree, self.paths.pod_dir, True)
        log.event("k8s_node.pod_removed", pod=f"{self.namespace}/{self.name}", containers=len(ids))
        if finish_deletion:
            await self.ctx.kube.delete(
                self.path, {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}}
            )

    async def report(self, message: str = "") -> None:
        async with self._report_lock:
            status = pod_status(
                self.pod,
                self.containers,
                host_ip=self.ctx.host_ip,
                pod_ip=self.pod_ip,
                start_time=self.start_time,
                sandbox_ready=self.sandbox_ready,
                init_containers=self.init_containers,
                initialized=self.initialized,
                init_failed=self.init_failed,
                message=message,
            )
            comparable = {**status, "conditions": [_no_time(c) for c in status["conditions"]]}
            if comparable == self._last:
                return
            try:
                updated = await self.ctx.kube.patch(self.path + "/status", {"status": status})
            except KubeError as exc:
                log.warning(
                    "k8s_node.status_refused", pod=f"{self.namespace}/{self.name}", error=str(exc)
                )
                return
            if updated is not None:
                self.pod = updated
                self._last = comparable

    async def _run(self) -> None:
        try:
            # Only starting a container needs its sandbox running (its network namespace
            # exists once the sandbox is created), so the sandbox's runc start overlaps the
            # volume reads and the app containers' creation. A kubelet's sandbox creation and
            # volume manager overlap the same way; its container creation waits for the
            # sandbox, which on this podman would add a whole runc start to every pod start.
            # Status writes are ordered by the report lock, so the first need not be awaited
            # before the sandbox is made.
            pending = asyncio.ensure_future(self.report())
            await self._create_sandbox()
            await pending
            self._sandbox_up = asyncio.ensure_future(self._start_sandbox())
            volumes = await self._volumes()
            for index in range(len(self.init_containers)):
                if not await self._init(index, volumes):
                    self.init_failed = True
                    await self.report()
                    return
            self.initialized = True
            for state in self.containers:
                state.state = _waiting("ContainerCreating")
            await self.report()
            await asyncio.gather(*(self._app(i, volumes) for i in range(len(self.containers))))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("k8s_node.pod_failed", pod=f"{self.namespace}/{self.name}")
        finally:
            sandbox = self._sandbox_up
            if sandbox is not None and not sandbox.done():
                sandbox.cancel()
            elif sandbox is not None and not sandbox.cancelled() and sandbox.exception():
                log.warning(
                    "k8s_node.sandbox_failed",
                    pod=f"{self.namespace}/{self.name}",
                    error=str(sandbox.exception()),
                )

    @property
    def _sandbox_name(self) -> str:
        return f"{self.prefix}_{INFRA}"

    async def _create_sandbox(self) -> None:
        hostname = str(self.pod["spec"].get("hostname") or self.name)[:63]
        await self.ctx.podman.create_on_network(
            self._sandbox_name,
            self.ctx.infra_image,
            network=self.ctx.network,
            hostname=hostname,
            labels=self.labels(INFRA),
            entrypoint=["sleep", "infinity"],
        )

    async def _start_sandbox(self) -> None:
        name = self._sandbox_name
        failed = await self.ctx.podman.start_container(name)
        if failed:
            error = EngineError(f"podman start {name} failed: {failed}")
            self._sandbox_started.set_exception(error)
            self._sandbox_started.exception()  # retrieved: raised below and where awaited
            raise error
        self._sandbox_started.set_result(None)
        info = await self.ctx.podman.inspect(name) or {}
        networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
        self.pod_ip = str((networks.get(self.ctx.network) or {}).get("IPAddress") or "")
        if not self.pod_ip:
            raise EngineError(f"sandbox {name} got no address on {self.ctx.network}")
        self.sandbox_ready = True
        await self.report()

    async def _sandbox_addressed(self) -> None:
        assert self._sandbox_up is not None
        await asyncio.shield(self._sandbox_up)

    async def _volumes(self) -> dict[str, Any]:
        while True:
            try:
                return await prepare_volumes(self.ctx.kube, self.pod, self.paths)
            except VolumeNotReady as exc:
                log.event(
                    "k8s_node.volume_waiting", pod=f"{self.namespace}/{self.name}", why=str(exc)
                )
            except ConfigError as exc:
                for state in self.containers:
                    state.state = _waiting("CreateContainerConfigError", str(exc))
                await self.report()
            await asyncio.sleep(self.ctx.retry_seconds)

    async def _image(self, spec: Obj, state: ContainerState) -> Obj:
        """The container's image config, once the image is in local storage."""
        ref = str(spec["image"])
        backoff = self.ctx.pull_backoff
        while True:
            image = await self.ctx.podman.image(ref)
            if image is not None:
                state.image_id = str(image.get("Id", ""))
                return dict(image.get("Config") or {})
            if spec.get("imagePullPolicy") == "Never":
                message = f'Container image "{ref}" is not present with pull policy of Never'
                state.state = _waiting("ErrImageNeverPull", message)
                await self.report()
                await asyncio.sleep(self.ctx.retry_seconds)
                continue
            state.state = _waiting(
                "ErrImagePull",
                f'failed to pull and unpack image "{ref}": not found in the test node\'s local '
                "storage, and the test node has no registry to pull from",
            )
            await self.report()
            await asyncio.sleep(self.ctx.retry_seconds)
            state.state = _waiting("ImagePullBackOff", f'Back-off pulling image "{ref}"')
            await self.report()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.ctx.backoff_cap)

    async def _app(self, index: int, volumes: dict[str, Any]) -> None:
        spec = self.pod["spec"]["containers"][index]
        state = self.containers[index]
        policy = str(self.pod["spec"].get("restartPolicy") or "Always")
        while True:
            code = await self._run_once(spec, state, volumes)
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            await self._back_off(spec, state)

    async def _init(self, index: int, volumes: dict[str, Any]) -> bool:
        """Run one init container to success; False when it failed under restartPolicy Never
        (the pod fails)."""
        spec = self.pod["spec"]["initContainers"][index]
        state = self.init_containers[index]
        while True:
            if await self._run_once(spec, state, volumes) == 0:
                return True
            if self.pod["spec"].get("restartPolicy") == "Never":
                return False
            await self._back_off(spec, state)

    async def _back_off(self, spec: Obj, state: ContainerState) -> None:
        """The kubelet's restart: at once after the first exit, then with doubling delays."""
        state.last_state = state.state
        state.restart_count += 1
        if state.restart_count < 2:
            return
        delay = min(self.ctx.crash_backoff * 2 ** (state.restart_count - 2), self.ctx.backoff_cap)
        state.state = _waiting(
            "CrashLoopBackOff",
            f"back-off {delay:g}s restarting failed container={spec['name']} "
            f"pod={self.name}_{self.namespace}({self.uid})",
        )
        await self.report()
        await asyncio.sleep(delay)

    async def _run_once(self, spec: Obj, state: ContainerState, volumes: dict[str, Any]) -> int:
        """Create, start and wait for one run of the container; its exit code. Waiting states
        (image, config, create errors) retry until they clear."""
        podman = self.ctx.podman
        name = f"{self.prefix}_{spec['name']}"
        while True:
            image_config = await self._image(spec, state)
            if needs_pod_ip(spec):
                await self._sandbox_addressed()
            try:
                env = await resolve_env(
                    self.ctx.kube, self.pod, spec, pod_ip=self.pod_ip, host_ip=self.ctx.host_ip
                )
                body = create_spec(
                    self.pod,
                    spec,
                    name=name,
                    sandbox=self._sandbox_name,
                    labels=self.labels(spec["name"]),
                    env=env,
                    mounts=container_mounts(spec, volumes),
                    image_config=image_config,
                )
            except ConfigError as exc:
                state.state = _waiting("CreateContainerConfigError", str(exc))
                await self.report()
                await asyncio.sleep(self.ctx.retry_seconds)
                continue
            if state.container_id:  # a restart: the previous run's container has the name
                await podman.remove([name])
            container_id, failed = await podman.create(body)
            if "already in use" in failed:
                # Left by an earlier worker for this pod (e.g. a node restarted mid-start).
                await podman.remove([name])
                container_id, failed = await podman.create(body)
            if not failed:
                break
            state.state = _waiting("CreateContainerError", failed[-500:])
            await self.report()
            await asyncio.sleep(self.ctx.retry_seconds)
        state.container_id = container_id
        await asyncio.shield(self._sandbox_started)
        exited = self.ctx.expect_exit(state.container_id)
        start_error = await podman.start_container(state.container_id)
        if not start_error:
            # Running once the runtime says it started, as a kubelet's PLEG reports it; a
            # container that exits at once is seen by its exit event.
            state.state = {"running": {"startedAt": now()}}
            await self.report()
            await exited
            info = await self._finished(state.container_id)
            state.state = terminated(info)
            await self._termination_message(spec, state)
        else:
            state.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": start_error[-500:],
                    "startedAt": now(),
                    "finishedAt": now(),
                }
            }
        await self.report()
        return int(state.state["terminated"]["exitCode"])

    async def _finished(self, container_id: str) -> Obj:
        """The exited container's inspect data, once podman has recorded how it ended (its
        `died` event can come before the exit code and time are stored)."""
        info: Obj = {}
        for _ in range(50):
            info = await self.ctx.podman.inspect(container_id) or {}
            state = info.get("State") or {}
            if not state.get("Running") and not str(state.get("FinishedAt", "")).startswith("0001"):
                break
            await asyncio.sleep(0.1)
        return info

    async def _termination_message(self, spec: Obj, state: ContainerState) -> None:
        """The kubelet's FallbackToLogsOnError: a failed container's last log lines (80 lines,
        2048 bytes at most) become its termination message."""
        ended = state.state["terminated"]
        if (
            ended["exitCode"] == 0
            or spec.get("terminationMessagePolicy") != "FallbackToLogsOnError"
        ):
            return
        logs = await self.ctx.podman.run("logs", "--tail", "80", state.container_id)
        text = (logs.stdout + logs.stderr).strip()
        if text:
            ended["message"] = text.encode()[-2048:].decode(errors="replace")


def _waiting(reason: str, message: str = "") -> Obj:
    waiting: Obj = {"reason": reason}
    if message:
        waiting["message"] = message
    return {"waiting": waiting}


def _no_time(condition: Obj) -> Obj:
    return {k: v for k, v in condition.items() if k != "lastTransitionTime"}
