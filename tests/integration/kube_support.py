"""What the kubernetes backend's tests share: an admin client, a namespace per test, and pod
status written through `pods/status` as a kubelet (or the scheduler) would."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.config import new_client_from_config

from streamspace_testing.kube import KubeAPIServer


@asynccontextmanager
async def api_client(
    server: KubeAPIServer, tmp_path: Path, token: str | None = None
) -> AsyncIterator[k8s.ApiClient]:
    kubeconfig = server.write_kubeconfig(tmp_path / f"kubeconfig-{uuid.uuid4().hex[:8]}", token)
    api = await new_client_from_config(config_file=str(kubeconfig))
    try:
        yield api
    finally:
        await api.close()


async def new_namespace(core: k8s.CoreV1Api) -> str:
    """A namespace with its `default` ServiceAccount, which no controller-manager creates here."""
    name = f"ss-test-{uuid.uuid4().hex[:10]}"
    await core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    await core.create_namespaced_service_account(
        name, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="default"))
    )
    return name


def container_status(image: str, state: dict[str, Any], ready: bool = False) -> dict[str, Any]:
    return {
        "name": "session",
        "image": image,
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "state": state,
    }


async def write_status(core: k8s.CoreV1Api, namespace: str, name: str, **status: Any) -> None:
    """Replace the pod's status as the kubelet does (merge patch of `status` only)."""
    await core.patch_namespaced_pod_status(name, namespace, {"status": status})


async def eventually(
    check: Callable[[], Any], within: float = 10.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.05)
