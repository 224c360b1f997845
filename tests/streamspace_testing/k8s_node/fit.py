"""Whether a pod fits the test node, as kube-scheduler's default plugins decide, as data.

Covered: nodeSelector and required node affinity (NodeAffinity), CPU/memory requests and the
pod count against allocatable (NodeResourcesFit), claims (VolumeBinding: a missing claim, a
claim being deleted, an unbound claim whose class does not exist). Messages have the shape the
real scheduler writes into the PodScheduled condition, so what reads them sees the real text.
Taints are not modelled: the test node has none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

Obj = dict[str, Any]

_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY_RE = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
NOT_HELPFUL = "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
NO_VICTIMS = "preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."


def quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("500m", "1.5", "256Mi", "1e3") as a number."""
    match = _QUANTITY_RE.match(str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a quantity: {text!r}")
    return Decimal(match.group(1)) * Decimal(_SUFFIXES[match.group(2)])


@dataclass(frozen=True)
class Capacity:
    cpu: Decimal
    memory: Decimal
    pods: int


@dataclass
class Requests:
    cpu: Decimal = Decimal(0)
    memory: Decimal = Decimal(0)
    names: list[str] = field(default_factory=list)


def pod_requests(pod: Obj) -> Requests:
    """The larger of the containers' sum and any one init container, per resource."""
    spec = pod.get("spec") or {}

    def of(container: Obj, name: str) -> Decimal:
        value = ((container.get("resources") or {}).get("requests") or {}).get(name)
        return quantity(value) if value is not None else Decimal(0)

    total = Requests()
    for container in spec.get("containers") or []:
        total.cpu += of(container, "cpu")
        total.memory += of(container, "memory")
    for init in spec.get("initContainers") or []:
        total.cpu = max(total.cpu, of(init, "cpu"))
        total.memory = max(total.memory, of(init, "memory"))
    return total


def _expression_matches(expression: Obj, labels: Mapping[str, str]) -> bool:
    key, operator = expression.get("key", ""), expression.get("operator", "")
    values = list(expression.get("values") or [])
    present = key in labels
    if operator == "In":
        return present and labels[key] in values
    if operator == "NotIn":
        return not present or labels[key] not in values
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator in ("Gt", "Lt") and present and values:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if operator == "Gt" else have < want
    return False


def matches_node(pod: Obj, node_name: str, labels: Mapping[str, str]) -> bool:
    """nodeSelector (every pair) and required node affinity (any term, every expression)."""
    spec = pod.get("spec") or {}
    selector = spec.get("nodeSelector") or {}
    if any(labels.get(key) != value for key, value in selector.items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True
    fields = {"metadata.name": node_name}
    return any(
        all(_expression_matches(e, labels) for e in term.get("matchExpressions") or [])
        and all(_expression_matches(e, fields) for e in term.get("matchFields") or [])
        for term in terms
    )


def resource_problems(pod: Obj, bound: Iterable[Obj], capacity: Capacity) -> list[str]:
    """NodeResourcesFit's reasons ("Too many pods", "Insufficient cpu", ...), empty if it fits."""
    used = Requests()
    count = 0
    for other in bound:
        count += 1
        requests = pod_requests(other)
        used.cpu += requests.cpu
        used.memory += requests.memory
    wanted = pod_requests(pod)
    problems = []
    if count + 1 > capacity.pods:
        problems.append("Too many pods")
    if wanted.cpu and used.cpu + wanted.cpu > capacity.cpu:
        problems.append("Insufficient cpu")
    if wanted.memory and used.memory + wanted.memory > capacity.memory:
        problems.append("Insufficient memory")
    return problems


def claim_names(pod: Obj) -> list[str]:
    return [
        str(volume["persistentVolumeClaim"]["claimName"])
        for volume in (pod.get("spec") or {}).get("volumes") or []
        if volume.get("persistentVolumeClaim")
    ]


@dataclass(frozen=True)
class ClaimCheck:
    message: str | None
    """The PreFilter message when the pod cannot be scheduled for its claims."""
    to_bind: list[Obj]
    """Unbound claims of an existing class, which the node provisions on binding the pod."""


def check_claims(claims: Mapping[str, Obj | None], classes: set[str]) -> ClaimCheck:
    """VolumeBinding's PreFilter: a missing or deleted claim, or an unbound claim that no class
    can provision (the real scheduler treats a class it cannot find as Immediate binding, and
    an unbound Immediate claim makes the pod unschedulable)."""
    to_bind: list[Obj] = []
    for name, claim in claims.items():
        if claim is None:
            return ClaimCheck(f'persistentvolumeclaim "{name}" not found', [])
        if (claim.get("metadata") or {}).get("deletionTimestamp"):
            return ClaimCheck(f'persistentvolumeclaim "{name}" is being deleted', [])
        if (claim.get("status") or {}).get("phase") == "Bound":
            continue
        if (claim.get("spec") or {}).get("storageClassName") not in classes:
            return ClaimCheck("pod has unbound immediate PersistentVolumeClaims", [])
        to_bind.append(claim)
    return ClaimCheck(None, to_bind)


def unschedulable_message(
    *, prefilter: str | None = None, affinity: bool = False, resources: list[str] | None = None
) -> str:
    """The FitError text kube-scheduler writes for a one-node cluster."""
    if prefilter:
        return f"0/1 nodes are available: {prefilter}. {NOT_HELPFUL}"
    if affinity:
        return (
            "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
            f"{NOT_HELPFUL}"
        )
    reasons = ", ".join(f"1 {problem}" for problem in resources or [])
    return f"0/1 nodes are available: {reasons}. {NO_VICTIMS}"
