"""What a pod's status means for its session, as pure functions of the pod's JSON.

The scheduler and the kubelet say everything through the pod's status (conditions, container
states); reading it here, apart from any I/O, makes "scheduled on node n1" progress and "the
image cannot be pulled" failures testable as data.
"""

from __future__ import annotations

from typing import Any

from streamspace.agent.backends.kubernetes.objects import CONTAINER_NAME
from streamspace.protocol import SessionRunState

Pod = dict[str, Any]

FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
"""Container waiting reasons that do not resolve by waiting: the session fails with them now.
(`ErrImagePull` can be transient for a registry hiccup, but the kubelet then backs off for
seconds to minutes, longer than a user waits for a desktop.)"""


def _status(pod: Pod) -> dict[str, Any]:
    return pod.get("status") or {}


def _condition(pod: Pod, kind: str) -> dict[str, Any] | None:
    for condition in _status(pod).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return None


def container_status(pod: Pod) -> dict[str, Any]:
    for status in _status(pod).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            return dict(status)
    return {}


def terminating(pod: Pod) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def phase(pod: Pod) -> str:
    return str(_status(pod).get("phase") or "Pending")


def node_name(pod: Pod) -> str:
    return str((pod.get("spec") or {}).get("nodeName") or "")


def pod_ip(pod: Pod) -> str:
    return str(_status(pod).get("podIP") or "")


def container_running(pod: Pod) -> bool:
    return "running" in (container_status(pod).get("state") or {})


def run_state(pod: Pod) -> SessionRunState:
    """A pod being deleted is gone already for its session; a finished one has exited."""
    if terminating(pod):
        return "stopped"
    if phase(pod) in ("Succeeded", "Failed"):
        return "exited"
    return "running"


def failure(pod: Pod) -> str | None:
    """Why this pod will not come up, in words for the user; None while it still may."""
    scheduled = _condition(pod, "PodScheduled")
    if (
        scheduled
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == ("Unschedulable")
    ):
        message = scheduled.get("message") or "no node fits it"
        return f"the session pod cannot be scheduled: {message}"
    state = container_status(pod).get("state") or {}
    waiting = state.get("waiting") or {}
    reason = str(waiting.get("reason") or "")
    if reason in FATAL_WAITING:
        message = str(waiting.get("message") or "").strip()
        return f"{reason}: {message}" if message else reason
    if "terminated" in state or phase(pod) in ("Succeeded", "Failed"):
        return exit_reason(pod)
    return None


def exit_reason(pod: Pod) -> str:
    """Why a pod that ran is not running any more (the docker backend's wording)."""
    terminated = (container_status(pod).get("state") or {}).get("terminated") or {}
    if terminated.get("reason") == "OOMKilled":
        return "app was killed: out of memory"
    if terminated:
        reason = f"app exited with code {terminated.get('exitCode')}"
        message = str(terminated.get("message") or "").strip()
        return f"{reason}: {message}" if message else reason
    status = _status(pod)
    detail = status.get("message") or status.get("reason") or phase(pod)
    return f"the session pod ended: {detail}"


def progress(pod: Pod) -> list[str]:
    """The start milestones this pod has passed, in order; the caller reports the new ones."""
    reached: list[str] = []
    node = node_name(pod)
    scheduled = _condition(pod, "PodScheduled")
    if node or (scheduled and scheduled.get("status") == "True"):
        reached.append(f"scheduled on node {node}" if node else "scheduled")
    status = container_status(pod)
    state = status.get("state") or {}
    waiting_reason = (state.get("waiting") or {}).get("reason")
    image = (((pod.get("spec") or {}).get("containers") or [{}])[0]).get("image", "")
    if waiting_reason in ("ContainerCreating", "PodInitializing") or "running" in state:
        reached.append(f"pulling image {image}")
    if "running" in state:
        reached.append("container started")
    return reached
