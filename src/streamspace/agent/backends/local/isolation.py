"""Which isolation this host gives local sessions, decided once when the backend starts.

* root agent: `uid-sandbox`. Sessions run as their owner's own uid (setpriv), inside bubblewrap.
* non-root agent: `userns-sandbox`. The agent cannot switch users, so sessions share its uid
  but each runs in its own user, mount, PID and IPC namespace with no capabilities, seeing only
  its own home.
* `--insecure-shared-user` (an explicit opt-out for a single-person laptop): sessions run as
  the agent's user on the host, unsandboxed. Loudly logged, reported to the control plane, and
  shown in red to admins.

The sandbox is probed with a real bubblewrap run (as the uid sessions will get), so a host
without unprivileged user namespaces is found out here, with the reason, not at the first
session start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from streamspace.agent.backends.local.sandbox import setpriv_argv
from streamspace.protocol import IsolationMode

__all__ = ["IsolationPlan", "plan_isolation"]


@dataclass(frozen=True)
class IsolationPlan:
    mode: IsolationMode
    tini: str | None
    bwrap: str | None = None
    setpriv: str | None = None
    problem: str = ""
    """Why sessions cannot start here (empty when they can)."""

    @property
    def sandboxed(self) -> bool:
        return self.mode != "insecure-shared-user"

    @property
    def switches_uid(self) -> bool:
        return self.mode == "uid-sandbox"


def _probe(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        return (done.stderr or done.stdout).strip()[-300:] or f"exit code {done.returncode}"
    return ""


def plan_isolation(insecure_shared_user: bool, probe_uid: int) -> IsolationPlan:
    """Decide the mode and check it works (blocking: runs bubblewrap once)."""
    tini = shutil.which("tini")
    missing_tini = "" if tini else "tini is not installed (apt-get install tini)"
    if insecure_shared_user:
        return IsolationPlan("insecure-shared-user", tini, problem=missing_tini)
    root = os.geteuid() == 0
    mode: IsolationMode = "uid-sandbox" if root else "userns-sandbox"
    bwrap = shutil.which("bwrap")
    setpriv = shutil.which("setpriv") if root else None
    problems = [missing_tini] if missing_tini else []
    if bwrap is None:
        problems.append("bubblewrap is not installed (apt-get install bubblewrap)")
    if root and setpriv is None:
        problems.append("setpriv (util-linux) is not installed")
    if not problems and bwrap is not None:
        argv = setpriv_argv(setpriv, probe_uid, probe_uid) if setpriv else []
        argv += [
            bwrap,
            "--unshare-user",
            "--disable-userns",
            "--unshare-pid",
            "--cap-drop",
            "ALL",
            "--ro-bind",
            "/",
            "/",
            "--",
            "/bin/true",
        ]
        failure = _probe(argv)
        if failure:
            problems.append(
                f"bubblewrap cannot create a sandbox on this host ({failure}); enable "
                "unprivileged user namespaces (sysctl user.max_user_namespaces), or run the "
                "agent with --insecure-shared-user on a single-person machine"
            )
    return IsolationPlan(mode, tini, bwrap, setpriv, problem="; ".join(problems))
