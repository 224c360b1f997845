"""The test node's container engine: podman, through its libpod REST API where it is hot.

Each pod start makes several engine calls in a row (sandbox create and start, its address,
image config, app create and start); a podman CLI run costs 30-130 ms of process start-up
each here, the same request to a `podman system service` a few. So the node runs a service of
its own and sends those calls there. The CLI stays for what runs once or rarely: networks,
logs, and the event stream filtered by label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from streamspace.podman import PodmanService, start_podman_service

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
    """podman with CONTAINERS_CONF set: CLI calls are asyncio subprocesses, API calls go to
    the service `start()` runs (until then, and after `close()`, they fail)."""

    def __init__(self, containers_conf: Path, podman: str = "podman") -> None:
        self.exe = podman
        self.env = {**os.environ, "CONTAINERS_CONF": str(containers_conf)}
        self._images: dict[str, tuple[float, dict[str, Any]]] = {}
        self._service: PodmanService | None = None
        self._http: httpx.AsyncClient | None = None

    async def start(self, run_dir: Path) -> None:
        """Run a `podman system service` on a socket in `run_dir` for the API calls."""
        self._service = await asyncio.to_thread(
            start_podman_service, run_dir, podman=self.exe, export=False
        )
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self._service.socket_path)),
            base_url="http://podman/v4.0.0/libpod",
            timeout=120.0,
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._service is not None:
            await asyncio.to_thread(self._service.stop)
            self._service = None

    async def api(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float = 120.0,
    ) -> httpx.Response:
        if self._http is None:
            raise EngineError(
                f"podman API {method} {path}: the node's podman service is not running"
            )
        try:
            return await self._http.request(method, path, params=params, json=body, timeout=timeout)
        except httpx.TransportError as exc:
            raise EngineError(f"podman API {method} {path} failed: {exc!r}") from exc

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
        response = await self.api("GET", f"/images/{_path(ref)}/json")
        if response.status_code != 200:
            self._images.pop(ref, None)
            return None
        found = dict(response.json())
        self._images[ref] = (time.monotonic(), found)
        return found

    async def inspect(self, name: str) -> dict[str, Any] | None:
        response = await self.api("GET", f"/containers/{_path(name)}/json")
        return dict(response.json()) if response.status_code == 200 else None

    async def start_container(self, name: str) -> str:
        """Start a created container: "" once it runs, else what podman said went wrong."""
        response = await self.api("POST", f"/containers/{_path(name)}/start")
        if response.status_code in (204, 304):
            return ""
        return _message(response)

    async def create(self, spec: Mapping[str, Any]) -> tuple[str, str]:
        """Create a container from a libpod create spec: (its id, "") or ("", what podman
        said went wrong)."""
        response = await self.api("POST", "/containers/create", body=dict(spec))
        if response.status_code == 201:
            return str(response.json()["Id"]), ""
        return "", _message(response)

    async def create_on_network(
        self,
        name: str,
        image: str,
        *,
        network: str,
        hostname: str,
        labels: Mapping[str, str],
        entrypoint: Sequence[str],
    ) -> None:
        """`podman create --replace --pull=never` on one network, through the API."""
        await self.remove([name])
        spec = {
            "name": name,
            "image": image,
            "hostname": hostname,
            "labels": dict(labels),
            "entrypoint": list(entrypoint),
            "netns": {"nsmode": "bridge"},
            "Networks": {network: {}},
        }
        _, failed = await self.create(spec)
        if failed:
            raise EngineError(f"podman create {name} failed: {failed}")

    @property
    def serving(self) -> bool:
        return self._http is not None

    async def container_states(self, *labels: str) -> dict[str, str]:
        """Id -> state ("created", "running", "exited", ...) of the containers carrying every
        one of `labels`."""
        filters = json.dumps({"label": list(labels)})
        response = await self.api(
            "GET", "/containers/json", params={"all": "true", "filters": filters}
        )
        if response.status_code != 200:
            raise EngineError(f"podman ps failed: {_message(response)}")
        return {str(row["Id"]): str(row.get("State", "")) for row in response.json() or []}

    async def container_ids(self, *labels: str) -> list[str]:
        return list(await self.container_states(*labels))

    async def remove(self, names: Sequence[str], grace: int = 0) -> None:
        """Stop (SIGTERM, then SIGKILL after `grace` s) and remove; missing ones are fine."""

        async def one(name: str) -> None:
            if grace > 0:
                await self.api(
                    "POST",
                    f"/containers/{_path(name)}/stop",
                    params={"timeout": str(grace)},
                    timeout=grace + 60,
                )
            response = await self.api(
                "DELETE",
                f"/containers/{_path(name)}",
                params={"force": "true", "timeout": "0"},
                timeout=60,
            )
            if response.status_code not in (200, 204, 404):
                raise EngineError(f"podman rm {name} failed: {_message(response)}")

        await asyncio.gather(*(one(name) for name in names))

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


def _path(name: str) -> str:
    return quote(name, safe="/:@")


def _message(response: httpx.Response) -> str:
    """The error libpod sends (`{"cause": ..., "message": ...}`), or the body as it came."""
    with contextlib.suppress(ValueError):
        data = response.json()
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    return f"HTTP {response.status_code}: {response.text.strip()[-500:]}"
