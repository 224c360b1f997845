"""Pure builders for how a local session is launched: argv and environment as data.

Nothing here touches the system; `LocalBackend` gathers the facts (paths of tools, which host
directories exist, file descriptors) and these functions turn them into the exact command line,
which the unit tests check as data (kubespawner's `make_pod` style).

The chain, outermost first (each step `exec`s the next, so it is one process until bwrap forks):

1. `sh -c 'echo $$ > cgroup.procs …; exec …'` (only when CPU/memory limits are enforced): the
   process joins the session's cgroups before anything else runs, so every descendant is in it.
2. (only when the agent is root) a privileged `bwrap` that builds the session's filesystem
   view, then `setpriv`: the session owner's uid/gid, no supplementary groups, empty
   capability bounding/inheritable sets, `no_new_privs` (see `uid_sandbox_argv`).
3. `bwrap` as that unprivileged user: a fresh user namespace with every capability dropped
   and nested user namespaces disabled; fresh mount, PID, IPC, UTS and cgroup namespaces (and
   network, unless the template needs network); read-only system directories; writable only
   the session's home and its runtime directory, both bound from file descriptors the agent
   opened (the agent's state directory itself is never reachable); a private /tmp;
   /etc/passwd and /etc/group replaced by a copy that names the session's user.
4. `tini` as PID 1 of the sandbox: forwards stops to the init script and reaps orphans; when it
   exits the kernel kills whatever is left in the PID namespace, so no process outlives its
   session.
5. `session-init.sh`: Xvnc on a Unix socket (no TCP, no abstract X socket), then the app.

With `--insecure-shared-user` only steps 4 (tini as a subreaper) and 5 run, as the agent's own
user on the host's filesystem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "RESERVED_ENV",
    "SANDBOX_HOME",
    "SANDBOX_INIT",
    "SANDBOX_RUN",
    "SESSION_ENV_MARKER",
    "HostDir",
    "SandboxFds",
    "account_name",
    "cgroup_join_argv",
    "group_text",
    "passwd_text",
    "root_stage_env",
    "session_env",
    "setpriv_argv",
    "tini_argv",
    "uid_sandbox_argv",
    "userns_sandbox_argv",
]

SESSION_ENV_MARKER = "STREAMSPACE_SESSION_ID"
"""Carried by every process of a session; the unsandboxed mode hunts leftovers by it."""

SANDBOX_HOME = "/home/streamspace"
SANDBOX_RUN = "/run/streamspace"
SANDBOX_INIT = "/run/streamspace-init"
SANDBOX_DISPLAY = 1
"""Every sandbox has its own /tmp, so every sandbox can use display :1."""

RESERVED_ENV = frozenset(
    {
        "DISPLAY",
        "XAUTHORITY",
        "HOME",
        "XDG_RUNTIME_DIR",
        "PULSE_SERVER",
        "USER",
        "LOGNAME",
        SESSION_ENV_MARKER,
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
    }
)
"""Template env may not override these: they define the session's identity and display."""

_ACCOUNT_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class HostDir:
    """A top-level host directory as the sandbox shows it: bound read-only, or a symlink
    (merged-/usr systems have /bin -> usr/bin)."""

    path: str
    symlink_to: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class SandboxFds:
    """Descriptors the agent opened and passes to bwrap (numbers in the child)."""

    home: int
    run: int
    init: int
    passwd: int
    group: int
    info: int


def account_name(username: str) -> str:
    """The Unix login name shown inside the sandbox (cosmetic; the uid is what counts)."""
    lowered = username.lower()
    return lowered if _ACCOUNT_RE.fullmatch(lowered) else "streamspace"


def passwd_text(name: str, uid: int, gid: int, shell: str) -> str:
    return (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        f"{name}:x:{uid}:{gid}:StreamSpace session:{SANDBOX_HOME}:{shell}\n"
    )


def group_text(name: str, gid: int) -> str:
    return f"root:x:0:\nnogroup:x:65534:\n{name}:x:{gid}:\n"


def session_env(
    *,
    session_id: str,
    username: str,
    account: str,
    template: str,
    home: str,
    run_dir: str,
    display: int,
    geometry: str,
    depth: int,
    desktop: str,
    rfb_socket: str,
    xvnc: str,
    shell: str,
    template_env: Mapping[str, str],
    host_env: Mapping[str, str],
    clipboard_in: bool = True,
    clipboard_out: bool = True,
) -> dict[str, str]:
    """The environment of every process of the session (Xvnc, the init script, the app)."""
    env = {
        "PATH": _DEFAULT_PATH,
        "LANG": host_env.get("LANG", "C.UTF-8"),
        "TERM": "xterm",
        "SHELL": shell,
        "STREAMSPACE_USER": username,
        "STREAMSPACE_TEMPLATE": template,
    }
    if "TZ" in host_env:
        env["TZ"] = host_env["TZ"]
    env.update({k: v for k, v in template_env.items() if k not in RESERVED_ENV})
    env.update(
        {
            "HOME": home,
            "USER": account,
            "LOGNAME": account,
            "DISPLAY": f":{display}",
            "XAUTHORITY": f"{run_dir}/Xauthority",
            "XDG_RUNTIME_DIR": f"{run_dir}/xdg",
            "PULSE_SERVER": f"unix:{run_dir}/xdg/pulse/native",
            "SS_XVNC": xvnc,
            "SS_DISPLAY": str(display),
            "SS_GEOMETRY": geometry,
            "SS_DEPTH": str(depth),
            "SS_DESKTOP": desktop,
            "SS_RFB_SOCKET": rfb_socket,
            "SS_CLIPBOARD_IN": "1" if clipboard_in else "0",
            "SS_CLIPBOARD_OUT": "1" if clipboard_out else "0",
            "SS_APP_LOG": f"{run_dir}/app.log",
            SESSION_ENV_MARKER: session_id,
        }
    )
    return env


def cgroup_join_argv(procs_files: Sequence[str]) -> list[str]:
    """Join the given cgroups (their cgroup.procs files), then exec the rest of argv."""
    script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "streamspace-cgroup", *procs_files, "--"]


def setpriv_argv(setpriv: str, uid: int, gid: int) -> list[str]:
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


ROOT_STAGE_ENV_KEYS = ("PATH", SESSION_ENV_MARKER)
"""All the environment the stages that run as root (cgroup join, the privileged bwrap,
setpriv) get: nothing from templates or the agent reaches a root process (LD_AUDIT, GCONV_PATH,
exported shell functions...). The session's own environment is set by the inner bwrap."""


def root_stage_env(session_env: Mapping[str, str]) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        SESSION_ENV_MARKER: session_env[SESSION_ENV_MARKER],
    }


def setenv_args(env: Mapping[str, str]) -> list[str]:
    """bwrap arguments that give the sandboxed process exactly `env`."""
    args = ["--clearenv"]
    for key, value in sorted(env.items()):
        args += ["--setenv", key, value]
    return args


def _namespaces(fds: SandboxFds, network: bool) -> list[str]:
    """An unprivileged bwrap: new user (no nested ones), PID, IPC, UTS, cgroup and (unless the
    app needs network) net namespaces, no capabilities; its child is PID 1."""
    args = [
        "--unshare-user",
        "--disable-userns",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "streamspace",
        "--cap-drop",
        "ALL",
        "--as-pid-1",
        "--info-fd",
        str(fds.info),
    ]
    return args if network else [*args, "--unshare-net"]


def _filesystem(fds: SandboxFds, system: Sequence[HostDir], proc: list[str]) -> list[str]:
    """The session's view of the filesystem: read-only system, its own home and runtime dir."""
    args: list[str] = []
    for entry in system:
        if entry.symlink_to is not None:
            args += ["--symlink", entry.symlink_to, entry.path]
        else:
            args += ["--ro-bind-try" if entry.optional else "--ro-bind", entry.path, entry.path]
    args += ["--perms", "0644", "--ro-bind-data", str(fds.passwd), "/etc/passwd"]
    args += ["--perms", "0644", "--ro-bind-data", str(fds.group), "/etc/group"]
    args += [*proc, "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
    args += ["--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--dir", "/tmp/.X11-unix"]
    args += ["--perms", "0755", "--dir", "/home", "--bind-fd", str(fds.home), SANDBOX_HOME]
    args += ["--perms", "0755", "--dir", "/run", "--bind-fd", str(fds.run), SANDBOX_RUN]
    args += ["--perms", "0644", "--ro-bind-data", str(fds.init), SANDBOX_INIT]
    return args


def userns_sandbox_argv(
    bwrap: str,
    fds: SandboxFds,
    system: Sequence[HostDir],
    env: Mapping[str, str],
    *,
    network: bool,
) -> list[str]:
    """One unprivileged bwrap (the agent is not root): the session keeps the agent's uid."""
    return [
        bwrap,
        *_namespaces(fds, network),
        *setenv_args(env),
        *_filesystem(fds, system, ["--proc", "/proc"]),
        "--chdir",
        SANDBOX_HOME,
        "--",
    ]


def uid_sandbox_argv(
    bwrap: str,
    setpriv: str,
    uid: int,
    gid: int,
    fds: SandboxFds,
    system: Sequence[HostDir],
    env: Mapping[str, str],
    *,
    network: bool,
) -> list[str]:
    """Root agent: a privileged bwrap builds the filesystem view (its sources live in the
    agent's private state dir, which the session's uid cannot traverse), setpriv drops to the
    owner's uid, and an unprivileged bwrap inside adds the namespaces and disables user
    namespaces, exactly as for a non-root agent. The outer stage keeps only the capabilities
    setpriv needs and runs nothing but setpriv. It binds the host's /proc (a fresh one may
    only be mounted where a complete proc is visible); the inner stage mounts the session's
    own /proc over it."""
    outer = [
        bwrap,
        "--cap-drop",
        "ALL",
        "--cap-add",
        "CAP_SETUID",
        "--cap-add",
        "CAP_SETGID",
        "--cap-add",
        "CAP_SETPCAP",
        *_filesystem(fds, system, ["--bind", "/proc", "/proc"]),
        "--",
    ]
    inner = [
        bwrap,
        *_namespaces(fds, network),
        *setenv_args(env),
        "--bind",
        "/",
        "/",
        "--dev-bind",
        "/dev",
        "/dev",
        "--proc",
        "/proc",
        "--chdir",
        SANDBOX_HOME,
        "--",
    ]
    return [*outer, *setpriv_argv(setpriv, uid, gid), *inner]


def tini_argv(tini: str, init_script: str, command: Sequence[str], *, subreaper: bool) -> list[str]:
    """tini, then the init script with the app's argv (`-s` when tini is not PID 1)."""
    return [tini, *(["-s"] if subreaper else []), "--", "/bin/sh", init_script, *command]
