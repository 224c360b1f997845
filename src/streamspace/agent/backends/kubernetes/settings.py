"""The kubernetes backend's options, read once from the agent's settings (`STREAMSPACE_KUBE_*`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.kubernetes.objects import PodSettings
from streamspace.config import Settings

DEFAULT_AGENT_POD_LABELS = {"app.kubernetes.io/name": "streamspace-agent"}


def parse_labels(text: str, what: str) -> dict[str, str]:
    """`key=value,key2=value2` as a dict; a malformed item is an operator error."""
    labels: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BackendError(f"{what}: {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def parse_tolerations(text: str) -> tuple[dict[str, Any], ...]:
    if not text.strip():
        return ()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BackendError(f"kube_tolerations is not JSON: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BackendError("kube_tolerations must be a JSON list of objects")
    return tuple(value)


@dataclass(frozen=True)
class KubeConfig:
    kubeconfig: str = ""
    """Empty: in-cluster ServiceAccount, else $KUBECONFIG / ~/.kube/config."""
    context: str = ""
    namespace: str = ""
    """Empty: the kubeconfig context's, the agent's own in a cluster, else `default`."""
    storage_class: str = ""
    home_size: str = "10Gi"
    pod: PodSettings = field(default_factory=PodSettings)
    agent_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_AGENT_POD_LABELS)
    )
    agent_namespace: str = ""
    start_timeout: float = 120.0
    delete_grace_seconds: int = 5
    network_policies: bool = True
    """Create the agent's NetworkPolicies (VNC ingress from the agent only; no egress for
    sessions without network). Off only where the cluster has no NetworkPolicy API at all."""

    @classmethod
    def from_settings(cls, settings: Settings, namespace: str | None = None) -> KubeConfig:
        """`namespace` (the agent's `--namespace`) overrides the setting."""
        return cls(
            kubeconfig=settings.kube_kubeconfig,
            context=settings.kube_context,
            namespace=namespace if namespace is not None else settings.kube_namespace,
            storage_class=settings.kube_storage_class,
            home_size=settings.kube_home_size,
            pod=PodSettings(
                image_pull_policy=settings.kube_image_pull_policy,
                image_pull_secrets=tuple(settings.kube_image_pull_secrets),
                node_selector=parse_labels(settings.kube_node_selector, "kube_node_selector"),
                tolerations=parse_tolerations(settings.kube_tolerations),
            ),
            agent_pod_labels=parse_labels(settings.kube_agent_pod_labels, "kube_agent_pod_labels")
            or dict(DEFAULT_AGENT_POD_LABELS),
            agent_namespace=settings.kube_agent_namespace,
            start_timeout=settings.kube_start_timeout_seconds,
        )
