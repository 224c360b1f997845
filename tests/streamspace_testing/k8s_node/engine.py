"""The test node's container engine: the podman CLI with the project's containers.conf.

The CLI rather than podman's Docker-compatible API because the node needs what that API does
not offer the same way (CNI networks with a chosen subnet, `--network container:` sandboxes, an
event stream filtered by label), and each call is a short subprocess run off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NODE_LABEL = "org.streamspace.k8s-node"
POD_UID_LABEL = "io.kubernetes.pod.uid"
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
CONTAINER_LABEL = "io.kubernetes.container.name"
IMAGE_CACHE_SECONDS = 10.0
INFRA = "POD"
"""The container-name label of a pod's sandbox, as dockershim named it."""


class EngineError(RuntimeError):
    """A podman command failed; the message ends with its stderr."""


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Podman:
    """podman with CONTAINERS_CONF set, every call an asyncio subprocess."""

    def __init__(self, containers_conf: Path, podman: str = "podman") -> None:
        self.exe = podman
        self.env = {**os.environ, "CONTAINERS_CONF": str(containers_conf)}
        self._images: dict[str, tuple[float, dict[str, Any]]] = {}

    async def run(self, *args: str, timeout: float = 120.0) -> Result:
        proc = await asyncio.create_subprocess_exec(
            self.exe,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    async def check(self, *args: str, timeout: float = 120.0) -> str:
        result = await self.run(*args, timeout=timeout)
        if result.returncode != 0:
            raise EngineError(f"podman {' '.join(args[:2])} failed: {result.stderr.strip()}")
        return result.stdout

    async def image(self, ref: str) -> dict[str, Any] | None:
        """The image's inspect data, or None when it is not in local storage (no pulls here:
        there is no registry). Found images are remembered for a few seconds, as a kubelet's
        image manager caches what its runtime has; missing ones are asked again each time."""
        cached = self._images.get(ref)
        if cached is not None and time.monotonic() - cached[0] < IMAGE_CACHE_SECONDS:
            return cached[1]
        result = await self.run("image", "inspect", ref)
        if result.returncode != 0:
            self._images.pop(ref, None)
            return None
        data = json.loads(result.stdout)
        found = dict(data[0]) if data else None
        if found is not None:
            self._images[ref] = (time.monotonic(), found)
        return found

    async def inspect(self, name: str) -> dict[str, Any] | None:
        result = await self.run("container", "inspect", name)
        if result.returncode != 0:
            return None
        data = json.loads(result.stdout)
        return dict(data[0]) if data else None

    async def container_ids(self, *labels: str) -> list[str]:
        filters = [arg for label in labels for arg in ("--filter", f"label={label}")]
        out = await self.check("ps", "-a", "-q", "--no-trunc", *filters)
        return out.split()

    async def remove(self, names: Sequence[str], grace: int = 0) -> None:
        """Stop (SIGTERM, then SIGKILL after `grace` s) and remove; missing ones are fine."""
        if not names:
            return
        if grace > 0:
            await self.run("stop", "--ignore", "-t", str(grace), *names, timeout=grace + 60)
        await self.run("rm", "-f", "--ignore", "-t", "0", *names)

    async def network_subnets(self) -> set[str]:
        out = await self.check("network", "ls", "--format", "json")
        subnets: set[str] = set()
        for network in json.loads(out or "[]"):
            for subnet in network.get("subnets") or []:
                subnets.add(str(subnet.get("subnet")))
        return subnets

    async def events(self, label: str) -> AsyncIterator[dict[str, Any]]:
        """Container events of containers carrying `label`, as they happen, until cancelled."""
        proc = await asyncio.create_subprocess_exec(
            self.exe,
            "events",
            "--format",
            "json",
            "--filter",
            "type=container",
            "--filter",
            f"label={label}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=self.env,
        )
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                with contextlib.suppress(ValueError):
                    yield dict(json.loads(line))
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
