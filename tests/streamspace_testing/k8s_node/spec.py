"""A pod's container as a libpod container-create spec, as pure functions.

What the kubelet and the CRI would make of the container spec: command/args against the image's
entrypoint/cmd, `$(VAR)` expansion, the merged pod/container securityContext (with the kubelet's
runAsNonRoot check against the image's user), CPU/memory limits, mounts prepared by the node.
The spec is the body of podman's `POST /libpod/containers/create` (its SpecGenerator), which
applies the image's config and the containers.conf defaults as `podman create` does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .fit import quantity

Obj = dict[str, Any]
_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ConfigError(Exception):
    """The container cannot be created as specified: its waiting reason is
    CreateContainerConfigError with this message."""


@dataclass(frozen=True)
class Mount:
    target: str
    source: str = ""
    """A host directory; empty for a tmpfs."""
    read_only: bool = False
    tmpfs_size: int = 0


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` references: defined ones are replaced, `$$` escapes, others stay."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_RE.sub(sub, text)


def pod_ref(pod: Obj) -> str:
    meta = pod.get("metadata") or {}
    return f'"{meta.get("name")}_{meta.get("namespace")}({meta.get("uid")})"'


def security(pod: Obj, container: Obj) -> Obj:
    """The container's effective securityContext: its own fields over the pod's."""
    pod_ctx = (pod.get("spec") or {}).get("securityContext") or {}
    merged = {
        key: pod_ctx[key]
        for key in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
        if key in pod_ctx
    }
    merged.update(container.get("securityContext") or {})
    return merged


def verify_non_root(pod: Obj, container: Obj, image_user: str) -> None:
    ctx = security(pod, container)
    if not ctx.get("runAsNonRoot"):
        return
    where = f"(pod: {pod_ref(pod)}, container: {container.get('name')})"
    uid = ctx.get("runAsUser")
    if uid is not None:
        if int(uid) == 0:
            raise ConfigError(f"container's runAsUser breaks non-root policy {where}")
        return
    user = image_user.split(":", 1)[0]
    if user and not user.isdigit():
        raise ConfigError(
            f"container has runAsNonRoot and image has non-numeric user ({user}), "
            f"cannot verify user is non-root {where}"
        )
    if not user or int(user) == 0:
        raise ConfigError(f"container has runAsNonRoot and image will run as root {where}")


CPU_PERIOD = 100_000
"""The CFS period `--cpus` uses; the quota is the CPU limit times it."""


def _security(pod: Obj, container: Obj) -> Obj:
    ctx = security(pod, container)
    pod_ctx = (pod.get("spec") or {}).get("securityContext") or {}
    out: Obj = {}
    uid, gid = ctx.get("runAsUser"), ctx.get("runAsGroup")
    if uid is not None:
        out["user"] = f"{uid}:{gid if gid is not None else 0}"
    elif gid is not None:
        raise ConfigError("runAsGroup without runAsUser is not supported by the test node")
    groups = [*(pod_ctx.get("supplementalGroups") or [])]
    if pod_ctx.get("fsGroup") is not None:
        groups.append(pod_ctx["fsGroup"])
    if groups:
        out["groups"] = [str(group) for group in dict.fromkeys(groups)]
    if ctx.get("privileged"):
        out["privileged"] = True
    if ctx.get("allowPrivilegeEscalation") is False:
        out["no_new_privileges"] = True
    if ctx.get("readOnlyRootFilesystem"):
        out["read_only_filesystem"] = True
    caps = ctx.get("capabilities") or {}
    if caps.get("drop"):
        out["cap_drop"] = [str(cap) for cap in caps["drop"]]
    if caps.get("add"):
        out["cap_add"] = [str(cap) for cap in caps["add"]]
    if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
        out["seccomp_profile_path"] = "unconfined"
    return out


def _limits(container: Obj) -> Obj:
    limits = (container.get("resources") or {}).get("limits") or {}
    resources: Obj = {}
    if "cpu" in limits:
        resources["cpu"] = {
            "quota": int(quantity(limits["cpu"]) * CPU_PERIOD),
            "period": CPU_PERIOD,
        }
    if "memory" in limits:
        memory = int(quantity(limits["memory"]))
        resources["memory"] = {"limit": memory, "swap": memory}
    return {"resource_limits": resources} if resources else {}


def _mounts(mounts: Sequence[Mount]) -> Obj:
    out: list[Obj] = []
    spec: Obj = {}
    for mount in mounts:
        if mount.source:
            mode = "ro" if mount.read_only else "rw"
            out.append(
                {
                    "destination": mount.target,
                    "type": "bind",
                    "source": mount.source,
                    "options": [mode, "rbind"],
                }
            )
        elif mount.target == "/dev/shm":
            spec["shm_size"] = mount.tmpfs_size or 64 * 2**20
        else:
            options = ["mode=1777"]
            if mount.tmpfs_size:
                options.append(f"size={mount.tmpfs_size}")
            out.append(
                {
                    "destination": mount.target,
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": options,
                }
            )
    if out:
        spec["mounts"] = out
    return spec


def create_spec(
    pod: Obj,
    container: Obj,
    *,
    name: str,
    sandbox: str,
    labels: Mapping[str, str],
    env: Mapping[str, str],
    mounts: Sequence[Mount],
    image_config: Obj,
) -> Obj:
    """The create spec for one app container in the pod's sandbox (its network and UTS
    namespaces): raises ConfigError when the kubelet would refuse it. `env` holds secrets'
    values; it travels in the request body over the node's own socket, never on a command
    line."""
    verify_non_root(pod, container, str(image_config.get("User") or ""))
    spec: Obj = {
        "name": name,
        "image": str(container["image"]),
        "labels": dict(labels),
        "env": dict(env),
        "netns": {"nsmode": "container", "value": sandbox},
        "utsns": {"nsmode": "container", "value": sandbox},
        **_security(pod, container),
        **_limits(container),
        **_mounts(mounts),
    }
    if container.get("workingDir"):
        spec["work_dir"] = str(container["workingDir"])
    if container.get("tty"):
        spec["terminal"] = True
    if container.get("stdin"):
        spec["stdin"] = True
    command = [expand(str(part), env) for part in container.get("command") or []]
    args = [expand(str(part), env) for part in container.get("args") or []]
    if command:
        spec["entrypoint"] = command
    if args:
        spec["command"] = args
    return spec
