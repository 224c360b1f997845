"""A podman-backed test node for the real kube-apiserver the tests run (test code, not product).

There is no kubelet and no kube-scheduler on the test machines, so this package plays both for
one Node: it binds pending pods to itself (or marks them Unschedulable with the scheduler's
message), runs their containers with podman from locally built images on a podman network of
its own, and reports what a kubelet reports through `pods/status`. See node.py for the
lifecycle, kubelet.py for container states, fit.py for scheduling, sources.py for env/volumes.

`RunningNode` runs a `TestNode` on an event loop of its own in a thread, so synchronous tests
and async tests on any loop scope can share one (the `k8s_node` fixture in tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import CONTAINER_LABEL, INFRA, NODE_LABEL, POD_UID_LABEL
from .node import ApiServer, NodeConfig, TestNode

__all__ = ["NodeConfig", "RunningNode", "TestNode"]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    network: str
    subnet: str
    host_ip: str
    storage_class: str
    node_id: str


class RunningNode:
    """A TestNode in a background thread; `start()` returns once the Node is registered."""

    def __init__(
        self, server: ApiServer, containers_conf: Path, config: NodeConfig | None = None
    ) -> None:
        self.node = TestNode(server, containers_conf, config)
        self.containers_conf = containers_conf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 60.0) -> NodeInfo:
        self._thread = threading.Thread(target=self._main, name="k8s-test-node", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the test node did not start")
        if self._error is not None:
            raise self._error
        return self.info

    @property
    def info(self) -> NodeInfo:
        node = self.node
        return NodeInfo(
            name=node.config.name,
            labels=node.labels,
            network=node.network,
            subnet=node.subnet,
            host_ip=node.host_ip,
            storage_class=node.config.storage_class,
            node_id=node.node_id,
        )

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.node.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.node.stop()

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def containers(self, pod_uid: str, *, include_sandbox: bool = False) -> list[dict[str, Any]]:
        """The podman containers of a pod (`podman ps -a` rows), for tests to look behind it."""
        out = subprocess.run(
            [
                "podman",
                "ps",
                "-a",
                "--format",
                "json",
                "--filter",
                f"label={POD_UID_LABEL}={pod_uid}",
                "--filter",
                f"label={NODE_LABEL}={self.node.node_id}",
            ],
            env={**os.environ, "CONTAINERS_CONF": str(self.containers_conf)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows: list[dict[str, Any]] = json.loads(out or "[]")
        if include_sandbox:
            return rows
        return [r for r in rows if (r.get("Labels") or {}).get(CONTAINER_LABEL) != INFRA]

    def exec(self, container_id: str, *command: str) -> str:
        """What `command` prints run inside one of the node's containers (`podman exec`)."""
        return subprocess.run(
            ["podman", "exec", container_id, *command],
            env={**os.environ, "CONTAINERS_CONF": str(self.containers_conf)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
