"""A pod's container as `podman create` arguments, as pure functions.

What the kubelet and the CRI would make of the container spec: command/args against the image's
entrypoint/cmd, `$(VAR)` expansion, the merged pod/container securityContext (with the kubelet's
runAsNonRoot check against the image's user), CPU/memory limits, mounts prepared by the node.
"""

from __future__ import annotations

import json
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


def _security_args(pod: Obj, container: Obj) -> list[str]:
    ctx = security(pod, container)
    pod_ctx = (pod.get("spec") or {}).get("securityContext") or {}
    args: list[str] = []
    uid, gid = ctx.get("runAsUser"), ctx.get("runAsGroup")
    if uid is not None:
        args += ["--user", f"{uid}:{gid if gid is not None else 0}"]
    elif gid is not None:
        raise ConfigError("runAsGroup without runAsUser is not supported by the test node")
    groups = [*(pod_ctx.get("supplementalGroups") or [])]
    if pod_ctx.get("fsGroup") is not None:
        groups.append(pod_ctx["fsGroup"])
    for group in dict.fromkeys(groups):
        args += ["--group-add", str(group)]
    if ctx.get("privileged"):
        args.append("--privileged")
    if ctx.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if ctx.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    caps = ctx.get("capabilities") or {}
    args += [arg for cap in caps.get("drop") or [] for arg in ("--cap-drop", cap)]
    args += [arg for cap in caps.get("add") or [] for arg in ("--cap-add", cap)]
    if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    return args


def _limit_args(container: Obj) -> list[str]:
    limits = (container.get("resources") or {}).get("limits") or {}
    args: list[str] = []
    if "cpu" in limits:
        args += ["--cpus", str(quantity(limits["cpu"]))]
    if "memory" in limits:
        memory = int(quantity(limits["memory"]))
        args += ["--memory", f"{memory}b", "--memory-swap", f"{memory}b"]
    return args


def _mount_args(mounts: Sequence[Mount]) -> list[str]:
    args: list[str] = []
    for mount in mounts:
        if mount.source:
            args += ["-v", f"{mount.source}:{mount.target}:{'ro' if mount.read_only else 'rw'}"]
        elif mount.target == "/dev/shm":
            args += ["--shm-size", f"{mount.tmpfs_size or 64 * 2**20}b"]
        else:
            size = f",tmpfs-size={mount.tmpfs_size}" if mount.tmpfs_size else ""
            args += ["--mount", f"type=tmpfs,destination={mount.target},tmpfs-mode=1777{size}"]
    return args


def create_args(
    pod: Obj,
    container: Obj,
    *,
    name: str,
    sandbox: str,
    labels: Mapping[str, str],
    env: Mapping[str, str],
    mounts: Sequence[Mount],
    image_config: Obj,
    env_file: str,
) -> list[str]:
    """`podman create ...` arguments (without `create`) for one app container in the pod's
    sandbox (network, UTS): raises ConfigError when the kubelet would refuse it. The single-line
    part of `env` goes through `env_file` (written by the caller, 0600: it holds secrets' values),
    not the command line."""
    verify_non_root(pod, container, str(image_config.get("User") or ""))
    args = [
        "--name",
        name,
        f"--network=container:{sandbox}",
        f"--uts=container:{sandbox}",
        "--pull=never",
        *[arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")],
        *_security_args(pod, container),
        *_limit_args(container),
        *_mount_args(mounts),
    ]
    args += ["--env-file", env_file]
    for key, value in env.items():
        if "\n" in value:
            args += ["--env", f"{key}={value}"]
    if container.get("workingDir"):
        args += ["--workdir", str(container["workingDir"])]
    if container.get("tty"):
        args.append("--tty")
    if container.get("stdin"):
        args.append("--interactive")
    command = [expand(str(part), env) for part in container.get("command") or []]
    cmd = [expand(str(part), env) for part in container.get("args") or []]
    if command:
        args += ["--entrypoint", json.dumps(command)]
    args.append(str(container["image"]))
    args += cmd
    return args


def env_file_text(env: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in env.items() if "\n" not in value)
