"""What a pod's containers get from the API besides their spec: environment variables (values,
Secret/ConfigMap keys, fields of the pod) and volumes (Secret, ConfigMap, emptyDir, claims,
hostPath), materialised on the host as the kubelet would.

Claims are host directories under the node's state directory keyed by the claim's uid, so what
a pod writes there is there again for the next pod using the claim, and only deleting the claim
(or the node) loses it. A new claim's directory is root's, mode 0755, as a freshly formatted
cloud disk; the pod's `fsGroup` makes it group-writable (setgid), as the kubelet's ownership
management does. Projected volumes (the ServiceAccount token) are mounted empty: pods here
cannot reach the API server anyway (it listens on loopback).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import Kube, ns_path
from .fit import quantity
from .spec import ConfigError, Mount, expand

Obj = dict[str, Any]
_FIELD_RE = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class VolumeNotReady(Exception):
    """A volume's source is missing: the pod waits in ContainerCreating (kubelet: FailedMount)."""


@dataclass(frozen=True)
class PodPaths:
    pod_dir: Path
    claims_dir: Path

    def volume(self, name: str) -> Path:
        return self.pod_dir / "volumes" / name


async def _keys(kube: Kube, namespace: str, kind: str, name: str) -> dict[str, bytes] | None:
    resource = "secrets" if kind == "Secret" else "configmaps"
    obj = await kube.get(ns_path(namespace, resource, name))
    if obj is None:
        return None
    if kind == "Secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def needs_pod_ip(container: Obj) -> bool:
    """Whether the container's environment names the pod's IP, which exists only once the
    sandbox runs."""
    return any(
        ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        in ("status.podIP", "status.podIPs")
        for var in container.get("env") or []
    )


def _field(pod: Obj, path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": pod_ip,
        "status.hostIP": host_ip,
    }
    if path in simple:
        return str(simple[path] or "")
    match = _FIELD_RE.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ConfigError(f"fieldRef {path} is not supported by the test node")


async def resolve_env(
    kube: Kube, pod: Obj, container: Obj, *, pod_ip: str, host_ip: str
) -> dict[str, str]:
    """The container's environment in the kubelet's order: envFrom, then env (each `$(VAR)`
    expanded against what came before); ConfigError with the kubelet's message when a
    referenced Secret/ConfigMap or key is missing and not optional."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, ref in (
            ("Secret", source.get("secretRef")),
            ("ConfigMap", source.get("configMapRef")),
        ):
            if not ref:
                continue
            data = await _keys(kube, namespace, kind, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
            env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = _field(pod, source["fieldRef"]["fieldPath"], pod_ip, host_ip)
            continue
        kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
        ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
        if not ref:
            raise ConfigError(f"env {name}: this valueFrom is not supported by the test node")
        data = await _keys(kube, namespace, kind, ref["name"])
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                continue
            if data is None:
                raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
        env[name] = data[ref["key"]].decode(errors="replace")
    return env


def _write_keys(target: Path, data: Mapping[str, bytes], volume: Obj, fs_group: int | None) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    target.chmod(0o755)
    default_mode = int(volume.get("defaultMode", 0o644))
    items = volume.get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        if item["key"] not in data:
            continue
        path = target / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[item["key"]])
        mode = int(item.get("mode", default_mode))
        if fs_group is not None:
            os.chown(path, 0, fs_group)
            mode |= 0o440
        path.chmod(mode)


def _own_claim(path: Path, fs_group: int | None) -> None:
    if not path.exists():
        path.mkdir(parents=True)
        path.chmod(0o755)
    if fs_group is None or path.stat().st_gid == fs_group:
        return
    for root, dirs, files in os.walk(path):
        for entry in [root, *(os.path.join(root, n) for n in dirs + files)]:
            st = os.lstat(entry)
            os.lchown(entry, -1, fs_group)
            if not os.path.islink(entry):
                extra = 0o2070 if os.path.isdir(entry) else 0o060
                os.chmod(entry, (st.st_mode & 0o7777) | extra)


async def prepare_volumes(kube: Kube, pod: Obj, paths: PodPaths) -> dict[str, Mount]:
    """Each volume of the pod as a mount source (target filled in per container mount)."""
    namespace = pod["metadata"]["namespace"]
    fs_group = ((pod.get("spec") or {}).get("securityContext") or {}).get("fsGroup")
    mounts: dict[str, Mount] = {}
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        name = volume["name"]
        target = paths.volume(name)
        if "secret" in volume or "configMap" in volume:
            kind = "Secret" if "secret" in volume else "ConfigMap"
            source = volume.get("secret") or volume.get("configMap") or {}
            ref = source.get("secretName") if kind == "Secret" else source.get("name")
            data = await _keys(kube, namespace, kind, str(ref))
            if data is None and not source.get("optional"):
                raise VolumeNotReady(f'{kind.lower()} "{ref}" not found')
            await asyncio.to_thread(_write_keys, target, data or {}, source, fs_group)
            mounts[name] = Mount(target="", source=str(target), read_only=True)
        elif "emptyDir" in volume:
            empty = volume["emptyDir"] or {}
            size = int(quantity(empty["sizeLimit"])) if empty.get("sizeLimit") else 0
            if empty.get("medium") == "Memory":
                mounts[name] = Mount(target="", tmpfs_size=size)
                continue
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o777)
            mounts[name] = Mount(target="", source=str(target))
        elif "persistentVolumeClaim" in volume:
            ref = volume["persistentVolumeClaim"]
            claim = await kube.get(ns_path(namespace, "persistentvolumeclaims", ref["claimName"]))
            if claim is None:
                raise VolumeNotReady(f'persistentvolumeclaim "{ref["claimName"]}" not found')
            path = paths.claims_dir / claim["metadata"]["uid"]
            await asyncio.to_thread(_own_claim, path, fs_group)
            mounts[name] = Mount(target="", source=str(path), read_only=bool(ref.get("readOnly")))
        elif "hostPath" in volume:
            mounts[name] = Mount(target="", source=str(volume["hostPath"]["path"]))
        elif "projected" in volume:
            target.mkdir(parents=True, exist_ok=True)
            mounts[name] = Mount(target="", source=str(target), read_only=True)
        else:
            kinds = sorted(set(volume) - {"name"})
            raise ConfigError(
                f'volume "{name}": {kinds} volumes are not supported by the test node'
            )
    return mounts


def container_mounts(container: Obj, volumes: Mapping[str, Mount]) -> list[Mount]:
    result = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise ConfigError(f'volumeMount "{mount["name"]}" names no volume of the pod')
        source = volume.source
        if source and mount.get("subPath"):
            source = os.path.join(source, mount["subPath"])
            os.makedirs(source, exist_ok=True)
        result.append(
            Mount(
                target=mount["mountPath"],
                source=source,
                read_only=volume.read_only or bool(mount.get("readOnly")),
                tmpfs_size=volume.tmpfs_size,
            )
        )
    return result
