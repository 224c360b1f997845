"""The kube-scheduler half of the test node (with the bits of the controller-manager it needs).

Pending pods without a node are bound to the test node through `pods/binding` when they fit
(fit.py); otherwise their PodScheduled condition says Unschedulable with the scheduler's
message, and they are tried again each round, since what they wait for (a claim, a label) may
come. Claims of pods being bound are provisioned on the spot (marked Bound), and claims being
deleted lose their `kubernetes.io/pvc-protection` finalizer once no live pod uses them, which
is the work of the PV and PVC-protection controllers that do not run here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from streamspace.logs import get_logger

from .api import Kube, KubeError, ns_path
from .fit import (
    Capacity,
    check_claims,
    claim_names,
    matches_node,
    resource_problems,
    unschedulable_message,
)
from .status import now

Obj = dict[str, Any]
PVC_PROTECTION = "kubernetes.io/pvc-protection"
log = get_logger(__name__)


def _live(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def needs_scheduling(pod: Obj, scheduler_name: str = "default-scheduler") -> bool:
    spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
    return (
        not spec.get("nodeName")
        and not meta.get("deletionTimestamp")
        and (spec.get("schedulerName") or "default-scheduler") == scheduler_name
        and _live(pod)
    )


class Scheduler:
    def __init__(
        self,
        kube: Kube,
        *,
        node_name: str,
        labels: Mapping[str, str],
        capacity: Capacity,
        pods: Callable[[], Iterable[Obj]],
        claims_dir: Path,
        period: float = 1.0,
    ) -> None:
        self.kube = kube
        self.node_name = node_name
        self.labels = dict(labels)
        self.capacity = capacity
        self.pods = pods
        self.claims_dir = claims_dir
        self.period = period
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.period)
            self.wake.clear()
            try:
                await self.round()
                await self.release_claims()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("k8s_node.scheduler_round_failed")

    async def round(self) -> None:
        pending = [p for p in self.pods() if needs_scheduling(p)]
        if not pending:
            return
        listed = await self.kube.request("GET", "/apis/storage.k8s.io/v1/storageclasses")
        classes = {c["metadata"]["name"] for c in listed.get("items") or []}
        for pod in pending:
            await self.schedule(pod, classes)

    async def schedule(self, pod: Obj, classes: set[str]) -> None:
        meta = pod["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if not matches_node(pod, self.node_name, self.labels):
            await self._unschedulable(pod, unschedulable_message(affinity=True))
            return
        claims = {
            claim: await self.kube.get(ns_path(namespace, "persistentvolumeclaims", claim))
            for claim in claim_names(pod)
        }
        check = check_claims(claims, classes)
        if check.message:
            await self._unschedulable(pod, unschedulable_message(prefilter=check.message))
            return
        bound = [
            p
            for p in self.pods()
            if (p.get("spec") or {}).get("nodeName") == self.node_name and _live(p)
        ]
        problems = resource_problems(pod, bound, self.capacity)
        if problems:
            await self._unschedulable(pod, unschedulable_message(resources=problems))
            return
        for claim in check.to_bind:
            await self._provision(claim)
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            await self.kube.request("POST", ns_path(namespace, "pods", name, "binding"), binding)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise
            return
        pod.setdefault("spec", {})["nodeName"] = self.node_name
        log.event("k8s_node.scheduled", pod=f"{namespace}/{name}", node=self.node_name)

    async def _unschedulable(self, pod: Obj, message: str) -> None:
        conditions = (pod.get("status") or {}).get("conditions") or []
        old: Obj = next((c for c in conditions if c.get("type") == "PodScheduled"), {})
        if old.get("status") == "False" and old.get("message") == message:
            return
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": now(),
        }
        meta = pod["metadata"]
        path = ns_path(meta["namespace"], "pods", meta["name"], "status")
        updated = await self.kube.patch(path, {"status": {"conditions": [condition]}})
        if updated is not None:
            pod["status"] = updated.get("status") or {}
        log.event("k8s_node.unschedulable", pod=f"{meta['namespace']}/{meta['name']}", why=message)

    async def _provision(self, claim: Obj) -> None:
        meta, spec = claim["metadata"], claim.get("spec") or {}
        status = {
            "phase": "Bound",
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "capacity": {
                "storage": ((spec.get("resources") or {}).get("requests") or {}).get(
                    "storage", "1Gi"
                )
            },
        }
        path = ns_path(meta["namespace"], "persistentvolumeclaims", meta["name"], "status")
        await self.kube.patch(path, {"status": status})
        log.event("k8s_node.claim_bound", claim=f"{meta['namespace']}/{meta['name']}")

    async def release_claims(self) -> None:
        """Drop the protection finalizer of deleted claims no live pod mounts, and their data."""
        listed = await self.kube.request("GET", "/api/v1/persistentvolumeclaims")
        for claim in listed.get("items") or []:
            meta = claim["metadata"]
            finalizers = list(meta.get("finalizers") or [])
            if not meta.get("deletionTimestamp") or PVC_PROTECTION not in finalizers:
                continue
            in_use = any(
                p["metadata"]["namespace"] == meta["namespace"]
                and meta["name"] in claim_names(p)
                and _live(p)
                for p in self.pods()
            )
            if in_use:
                continue
            finalizers.remove(PVC_PROTECTION)
            path = ns_path(meta["namespace"], "persistentvolumeclaims", meta["name"])
            body = {
                "metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}
            }
            with contextlib.suppress(KubeError):
                await self.kube.patch(path, body)
                data = self.claims_dir / meta["uid"]
                await asyncio.to_thread(_remove_tree, data)
                log.event("k8s_node.claim_released", claim=f"{meta['namespace']}/{meta['name']}")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
