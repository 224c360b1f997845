"""CPU and memory limits for local sessions through cgroups, where the host lets us.

cgroup v2 is used when the agent's own cgroup has the `cpu` and `memory` controllers and is
writable by the agent (systemd `Delegate=yes`, or a root agent on a pure v2 host): sessions get
children `streamspace-<session>` of a `streamspace` cgroup beside the agent. Hosts still on
the v1 (or hybrid) layout get the same through the v1 `cpu` and `memory` hierarchies when the
agent is root. Anywhere else limits are not enforced, and the agent says so in its isolation
report (the admin Agents page shows it).

The session's first process joins its cgroups before it execs anything (see
`sandbox.cgroup_join_argv`), so nothing of the session ever runs outside them, and stopping a
session can find every process through `cgroup.procs` even if it escaped its process tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from streamspace import logs

__all__ = ["CgroupLimits", "detect_limits"]

log = logs.get_logger("streamspace.agent.local")

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CPU_PERIOD_US = 100_000


def _own_v2_path(proc_cgroup: str) -> str | None:
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


def _own_v1_path(proc_cgroup: str, controller: str) -> str | None:
    for line in proc_cgroup.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controller in controllers.split(","):
            return path or "/"
    return None


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


@dataclass
class CgroupLimits:
    """Creates, fills and removes the cgroups of sessions (blocking: call in a thread)."""

    kind: str
    """"v2" or "v1"."""
    roots: dict[str, Path]
    """v2: {"unified": parent dir}; v1: {"cpu": dir, "memory": dir} under each hierarchy."""

    def _dirs(self, session_id: str) -> list[Path]:
        return [root / f"streamspace-{session_id}" for root in self.roots.values()]

    def create(self, session_id: str, cpu_millis: int, memory_mb: int) -> list[str]:
        """Make the session's cgroups with its limits; the cgroup.procs files to join."""
        procs: list[str] = []
        memory = str(memory_mb * 1024 * 1024)
        quota = max(cpu_millis * _CPU_PERIOD_US // 1000, 1000)
        for name, root in self.roots.items():
            path = root / f"streamspace-{session_id}"
            path.mkdir(mode=0o755, exist_ok=True)
            if self.kind == "v2":
                (path / "memory.max").write_text(memory)
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
                (path / "cpu.max").write_text(f"{quota} {_CPU_PERIOD_US}")
            elif name == "memory":
                (path / "memory.limit_in_bytes").write_text(memory)
                with contextlib.suppress(OSError):
                    (path / "memory.memsw.limit_in_bytes").write_text(memory)
            else:
                (path / "cpu.cfs_period_us").write_text(str(_CPU_PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            procs.append(str(path / "cgroup.procs"))
        return procs

    def pids(self, session_id: str) -> set[int]:
        found: set[int] = set()
        for path in self._dirs(session_id):
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return found

    def kill(self, session_id: str) -> None:
        """SIGKILL every process still in the session's cgroups."""
        for path in self._dirs(session_id):
            if self.kind == "v2" and (path / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (path / "cgroup.kill").write_text("1")
        for pid in self.pids(session_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, session_id: str) -> None:
        """Remove the cgroups once empty (a dying process may need a moment to leave)."""
        for path in self._dirs(session_id):
            deadline = time.monotonic() + 2.0
            while path.exists():
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        log.warning("cgroup_not_removed", path=path)
                        break
                    self.kill(session_id)
                    time.sleep(0.05)

    def memory_limit_bytes(self, session_id: str) -> int | None:
        for name, root in self.roots.items():
            path = root / f"streamspace-{session_id}"
            file = "memory.max" if self.kind == "v2" else "memory.limit_in_bytes"
            if self.kind == "v2" or name == "memory":
                with contextlib.suppress(OSError, ValueError):
                    return int((path / file).read_text().strip())
        return None


def _v2(unified: Path, own: str) -> CgroupLimits | None:
    """Sessions under `<agent's cgroup>/streamspace`; a non-root agent cgroup first moves the
    agent into a leaf `agent` child (cgroup v2 allows no processes beside child controllers)."""
    base = unified / own.lstrip("/")
    try:
        controllers = set((base / "cgroup.controllers").read_text().split())
        if not {"cpu", "memory"} <= controllers or not _writable_dir(base):
            return None
        if base != unified:
            leaf = base / "agent"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
        enabled = set((base / "cgroup.subtree_control").read_text().split())
        if not {"cpu", "memory"} <= enabled:
            (base / "cgroup.subtree_control").write_text("+cpu +memory")
        group = base / "streamspace"
        group.mkdir(exist_ok=True)
        (group / "cgroup.subtree_control").write_text("+cpu +memory")
    except OSError as exc:
        log.event("cgroup_v2_unusable", base=base, error=exc)
        return None
    return CgroupLimits("v2", {"unified": group})


def detect_limits(root: Path = _CGROUP_ROOT) -> tuple[CgroupLimits | None, str]:
    """The cgroup layout this agent can use, or None and why limits are not enforced."""
    try:
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        proc_cgroup = ""
    own = _own_v2_path(proc_cgroup)
    unified = root if (root / "cgroup.controllers").exists() else root / "unified"
    if own is not None and (unified / "cgroup.controllers").exists():
        found = _v2(unified, own)
        if found is not None:
            return found, "cgroup v2"
    if os.geteuid() == 0:
        roots: dict[str, Path] = {}
        for name in ("cpu", "memory"):
            own_v1 = _own_v1_path(proc_cgroup, name)
            hierarchy = root / name / (own_v1 or "/").lstrip("/")
            if own_v1 and (hierarchy / "cgroup.procs").exists() and _writable_dir(hierarchy):
                roots[name] = hierarchy / "streamspace"
        if len(roots) == 2:
            try:
                for path in roots.values():
                    path.mkdir(exist_ok=True)
            except OSError as exc:
                return None, f"limits not enforced: cannot create v1 cgroups ({exc})"
            return CgroupLimits("v1", roots), "cgroup v1"
    return None, (
        "limits not enforced: no writable cgroup with the cpu and memory controllers "
        "(delegate a cgroup v2 subtree to the agent, or run it as root)"
    )
