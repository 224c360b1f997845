"""Reaching the API server: in-cluster (the agent's ServiceAccount) or through a kubeconfig, and
turning the server's refusals into errors a user or operator can act on."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from streamspace.agent.backends.base import BackendError

T = TypeVar("T")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SERVICE_ACCOUNT_DIR.is_dir()


async def new_api_client(kubeconfig: str, context: str) -> tuple[k8s.ApiClient, str]:
    """A client and the namespace its configuration names ("" if none): the kubeconfig when
    one is given, else the pod's ServiceAccount when running in a cluster, else ~/.kube/config
    ($KUBECONFIG)."""
    configuration = k8s.Configuration()
    if not kubeconfig and in_cluster():
        k8s_config.load_incluster_config(client_configuration=configuration)
        namespace_file = SERVICE_ACCOUNT_DIR / "namespace"
        namespace = (
            (await asyncio.to_thread(namespace_file.read_text)).strip()
            if namespace_file.exists()
            else ""
        )
        return k8s.ApiClient(configuration), namespace
    path = kubeconfig or os.environ.get("KUBECONFIG", "") or str(Path.home() / ".kube/config")
    try:
        await k8s_config.load_kube_config(
            config_file=path, context=context or None, client_configuration=configuration
        )
        contexts, active = await asyncio.to_thread(
            k8s_config.list_kube_config_contexts, config_file=path
        )
    except (OSError, k8s_config.ConfigException) as exc:
        raise BackendError(f"cannot load the kubeconfig {path}: {exc}") from exc
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    namespace = str(((chosen or {}).get("context") or {}).get("namespace") or "")
    return k8s.ApiClient(configuration), namespace


def _message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or exc)


def translate(exc: ApiException, verb: str, resource: str, namespace: str) -> BackendError:
    """The server's refusal as a BackendError naming what was refused."""
    message = _message(exc)
    if exc.status == 403:
        return BackendError(
            f"Kubernetes RBAC forbids the agent to {verb} {resource} in namespace "
            f"{namespace!r}: {message} (grant the agent's Role `{verb}` on `{resource}`)"
        )
    if exc.status == 401:
        return BackendError(
            f"the Kubernetes API server rejected the agent's credentials: {message}"
        )
    return BackendError(f"Kubernetes refused to {verb} {resource} ({exc.status}): {message}")


async def call(
    awaitable: Awaitable[T], verb: str, resource: str, namespace: str, *, ok: tuple[int, ...] = ()
) -> T | None:
    """Await one API call; None if it failed with a status in `ok` (404 on delete, 409 on
    create), else a translated BackendError."""
    try:
        return await awaitable
    except ApiException as exc:
        if exc.status in ok:
            return None
        raise translate(exc, verb, resource, namespace) from exc
    except OSError as exc:
        raise BackendError(f"the Kubernetes API server is unreachable: {exc}") from exc
