"""A pod's status as the kubelet writes it, as pure functions of what the node knows.

Phase follows the kubelet's getPhase: a container that never ran keeps the pod Pending; any
running one makes it Running; once all stopped, the restart policy decides between Running
(it will restart), Succeeded and Failed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    """MicroTime, what Lease renewals carry."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ContainerState:
    """One container of a pod as the node tracks it, in the API's terms."""

    name: str
    image: str
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    restart_count: int = 0
    container_id: str = ""
    image_id: str = ""

    @property
    def running(self) -> bool:
        return "running" in self.state

    def api(self) -> Obj:
        status: Obj = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.running,
            "started": self.running,
            "restartCount": self.restart_count,
        }
        if self.container_id:
            status["containerID"] = f"podman://{self.container_id}"
        return status


def phase(containers: list[ContainerState], restart_policy: str) -> str:
    running = waiting = stopped = succeeded = 0
    for c in containers:
        if c.running:
            running += 1
        elif "terminated" in c.state:
            stopped += 1
            succeeded += c.state["terminated"].get("exitCode") == 0
        elif "terminated" in c.last_state:
            stopped += 1
            succeeded += c.last_state["terminated"].get("exitCode") == 0
        else:
            waiting += 1
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if restart_policy == "OnFailure":
        return "Succeeded" if stopped == succeeded else "Running"
    return "Succeeded" if stopped == succeeded else "Failed"


def _condition(
    previous: list[Obj], kind: str, status: bool, reason: str = "", message: str = ""
) -> Obj:
    value = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    changed = old is None or old.get("status") != value
    condition: Obj = {
        "type": kind,
        "status": value,
        "lastProbeTime": None,
        "lastTransitionTime": now() if changed or old is None else old.get("lastTransitionTime"),
    }
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def pod_status(
    pod: Obj,
    containers: list[ContainerState],
    *,
    host_ip: str,
    pod_ip: str,
    start_time: str,
    sandbox_ready: bool,
    init_containers: list[ContainerState] | None = None,
    initialized: bool = True,
    init_failed: bool = False,
    message: str = "",
) -> Obj:
    """The whole status of a pod bound to this node (the node owns every field of it). Until
    its init containers have all succeeded, a pod is Pending (Failed if one failed for good)."""
    spec = pod.get("spec") or {}
    previous = list((pod.get("status") or {}).get("conditions") or [])
    restart_policy = str(spec.get("restartPolicy") or "Always")
    inits = init_containers or []
    if init_failed:
        pod_phase = "Failed"
    elif not initialized:
        pod_phase = "Pending"
    else:
        pod_phase = phase(containers, restart_policy)
    incomplete = [c.name for c in inits if not _succeeded(c)]
    unready = [c.name for c in containers if not c.running]
    if pod_phase in ("Succeeded", "Failed"):
        reason, text = "PodCompleted", ""
    elif unready:
        reason, text = (
            "ContainersNotReady",
            f"containers with unready status: [{' '.join(unready)}]",
        )
    else:
        reason, text = "", ""
    ready = not unready and pod_phase == "Running"
    scheduled = next((c for c in previous if c.get("type") == "PodScheduled"), None)
    conditions = [
        _condition(previous, "PodReadyToStartContainers", sandbox_ready),
        _condition(
            previous,
            "Initialized",
            initialized,
            "" if initialized else "ContainersNotInitialized",
            "" if initialized else f"containers with incomplete status: [{' '.join(incomplete)}]",
        ),
        _condition(previous, "Ready", ready, "" if ready else reason, "" if ready else text),
        _condition(
            previous, "ContainersReady", ready, "" if ready else reason, "" if ready else text
        ),
        scheduled or _condition(previous, "PodScheduled", True),
    ]
    status: Obj = {
        "phase": pod_phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": start_time,
        "containerStatuses": [c.api() for c in containers],
        **({"initContainerStatuses": [_init_api(c) for c in inits]} if inits else {}),
        "qosClass": (pod.get("status") or {}).get("qosClass"),
    }
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    if message:
        status["message"] = message
    return status


def _succeeded(container: ContainerState) -> bool:
    return (container.state.get("terminated") or {}).get("exitCode") == 0


def _init_api(container: ContainerState) -> Obj:
    """An init container is ready once it has succeeded."""
    return {**container.api(), "ready": _succeeded(container), "started": container.running}


def terminated(info: Obj) -> Obj:
    """A podman inspect's State as the API's `terminated` container state."""
    state = info.get("State") or {}
    code = int(state.get("ExitCode") or 0)
    reason = "OOMKilled" if state.get("OOMKilled") else "Completed" if code == 0 else "Error"
    return {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "startedAt": _rfc3339(state.get("StartedAt")),
            "finishedAt": _rfc3339(state.get("FinishedAt")),
            "containerID": f"podman://{info.get('Id', '')}",
        }
    }


def _rfc3339(value: Any) -> str:
    """podman's timestamps (nanoseconds, zone offset) cut to the API's whole seconds in UTC."""
    if not value:
        return now()
    text = str(value)
    try:
        head, _, rest = text.partition(".")
        zone = rest.lstrip("0123456789") if rest else text[19:]
        parsed = dt.datetime.fromisoformat(head[:19] + (zone.split(" ")[0] or "+00:00"))
    except ValueError:
        return now()
    if parsed.year < 2000:  # podman's zero time: not (yet) recorded
        return now()
    return parsed.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
