"""Spawning a session: its directories, then one process (bwrap -> tini -> the init script,
which runs Xvnc and the app) with the sandbox's files handed over as file descriptors.

Everything here blocks (it runs in a thread). The argv and environment come from the pure
builders in `sandbox`; this module gathers the host facts they need and starts the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.local import display as xdisplay
from streamspace.agent.backends.local import processes
from streamspace.agent.backends.local.homes import HomeStore
from streamspace.agent.backends.local.isolation import IsolationPlan
from streamspace.agent.backends.local.limits import CgroupLimits
from streamspace.agent.backends.local.logtail import tail
from streamspace.agent.backends.local.records import SessionRecord
from streamspace.agent.backends.local.sandbox import (
    SANDBOX_DISPLAY,
    SANDBOX_HOME,
    SANDBOX_INIT,
    SANDBOX_RUN,
    HostDir,
    SandboxFds,
    account_name,
    cgroup_join_argv,
    group_text,
    passwd_text,
    root_stage_env,
    session_env,
    tini_argv,
    uid_sandbox_argv,
    userns_sandbox_argv,
)
from streamspace.protocol import SessionSpec

INIT_SCRIPT = Path(__file__).with_name("session-init.sh")
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_OPTIONAL_DIRS = ("/etc/alternatives", "/var/cache/fontconfig", "/usr/share/fonts")
_SANDBOX_VISIBLE = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/lib32/", "/libx32/")
"""Where programs a sandbox can run live (see host_system_dirs)."""


def host_system_dirs() -> list[HostDir]:
    """/usr and /etc read-only; the top-level lib/bin dirs as the host has them."""
    found = [HostDir("/usr"), HostDir("/etc")]
    for top in _SYSTEM_DIRS:
        if os.path.islink(top):
            found.append(HostDir(top, symlink_to=os.readlink(top)))
        elif os.path.isdir(top):
            found.append(HostDir(top))
    found += [HostDir(p, optional=True) for p in _OPTIONAL_DIRS if not p.startswith("/usr")]
    return found


def take_socket(rec: SessionRecord) -> None:
    """Move Xvnc's socket out of the directory the session user can write, into the agent's
    own: from there on nobody can swap it for a symlink to some other socket on the host (the
    D-Bus system bus, a container engine) for the agent to connect to as root. What is moved
    must still be a socket of the session's own uid, not something planted before the move."""
    os.rename(rec.made_socket, rec.rfb_socket)
    st = os.lstat(rec.rfb_socket)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != rec.uid:
        os.unlink(rec.rfb_socket)
        raise BackendError("the session's VNC socket was replaced before it could be secured")


def check_visible_in_sandbox(what: str, path: str) -> None:
    if not os.path.realpath(path).startswith(_SANDBOX_VISIBLE):
        raise BackendError(
            f"{what} is at {path}, outside what a sandbox sees (the host's /usr); "
            "install it from the distribution's packages"
        )


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_info(fd: int, timeout: float) -> dict[str, Any]:
    """bwrap's --info-fd JSON (the sandbox's PID 1 as seen from the host)."""
    deadline = time.monotonic() + timeout
    raw = b""
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        if not chunk:
            break
        raw += chunk
        with contextlib.suppress(ValueError):
            data = json.loads(raw)
            if isinstance(data, dict):
                return data
    raise BackendError(f"the sandbox did not report its process in {timeout:.0f}s")


class Spawner:
    def __init__(
        self,
        *,
        plan: IsolationPlan,
        limits: CgroupLimits | None,
        homes: HomeStore,
        start_timeout: float,
    ) -> None:
        self._plan = plan
        self._limits = limits
        self._homes = homes
        self.start_timeout = start_timeout

    def prepare(self, rec: SessionRecord, home: Path) -> None:
        """Home and runtime directories; the runtime one is made fresh on every start.

        `run/<id>` (agent only) holds the session log; `run/<id>/session` (the session's uid)
        holds the X cookie, the VNC socket and XDG_RUNTIME_DIR, and is what the sandbox sees
        as /run/streamspace. Files are written before the directory is handed over, so the
        session user never gets a chance to plant a symlink where the agent writes."""
        self._homes.prepare(home, rec.uid, rec.gid)
        run_dir = Path(rec.run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(mode=0o700)
        session_dir = run_dir / "session"
        session_dir.mkdir(mode=0o700)
        (session_dir / "xdg").mkdir(mode=0o700)
        xdisplay.write_xauthority(
            session_dir / "Xauthority", rec.display or SANDBOX_DISPLAY, secrets.token_bytes(16)
        )
        for path in (session_dir / "xdg", session_dir / "Xauthority", session_dir):
            os.chown(path, rec.uid, rec.gid, follow_symlinks=False)

    def spawn(
        self, rec: SessionRecord, spec: SessionSpec, xvnc: str, home: Path
    ) -> subprocess.Popen[bytes]:
        assert spec.local is not None
        plan = self._plan
        assert plan.tini is not None
        session_dir = Path(rec.run_dir) / "session"
        sandboxed = plan.sandboxed
        account = account_name(spec.user) if sandboxed else os.environ.get("USER", "user")
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        env = session_env(
            session_id=spec.session_id,
            username=spec.user,
            account=account,
            template=spec.template,
            home=SANDBOX_HOME if sandboxed else str(home),
            run_dir=SANDBOX_RUN if sandboxed else str(session_dir),
            display=rec.display or SANDBOX_DISPLAY,
            geometry=f"{spec.display.width}x{spec.display.height}",
            depth=spec.display.depth,
            desktop=f"{spec.template} ({spec.user})",
            rfb_socket=f"{SANDBOX_RUN}/vnc.sock" if sandboxed else "vnc.sock",
            xvnc=xvnc,
            shell=shell,
            template_env=spec.local.env,
            host_env=os.environ,
            clipboard_in=spec.clipboard.copy_in,
            clipboard_out=spec.clipboard.copy_out,
        )
        argv: list[str] = []
        if self._limits is not None:
            argv += cgroup_join_argv(
                self._limits.create(
                    spec.session_id, spec.resources.cpu_millis, spec.resources.memory_mb
                )
            )
        opened: list[int] = []
        info_read: int | None = None
        try:
            if sandboxed:
                assert plan.bwrap is not None
                home_fd = os.open(home, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
                opened.append(home_fd)
                run_fd = os.open(session_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
                opened.append(run_fd)
                init_fd = os.open(INIT_SCRIPT, os.O_RDONLY)
                opened.append(init_fd)
                passwd_fd = _memfd("passwd", passwd_text(account, rec.uid, rec.gid, shell).encode())
                opened.append(passwd_fd)
                group_fd = _memfd("group", group_text(account, rec.gid).encode())
                opened.append(group_fd)
                info_read, info_write = os.pipe()
                opened.append(info_write)
                fds = SandboxFds(home_fd, run_fd, init_fd, passwd_fd, group_fd, info_write)
                system = host_system_dirs()
                if plan.switches_uid:
                    assert plan.setpriv is not None
                    argv += uid_sandbox_argv(
                        plan.bwrap,
                        plan.setpriv,
                        rec.uid,
                        rec.gid,
                        fds,
                        system,
                        env,
                        network=spec.network,
                    )
                else:
                    argv += userns_sandbox_argv(plan.bwrap, fds, system, env, network=spec.network)
                env = root_stage_env(env)
                argv += tini_argv(plan.tini, SANDBOX_INIT, spec.local.command, subreaper=False)
                cwd = "/"
            else:
                argv += tini_argv(plan.tini, str(INIT_SCRIPT), spec.local.command, subreaper=True)
                cwd = str(session_dir)
            with (Path(rec.run_dir) / "session.log").open("ab") as logfile:
                os.chmod(logfile.fileno(), 0o600)
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=tuple(opened),
                )
        finally:
            for fd in opened:
                os.close(fd)
        rec.pid, rec.pid_start = proc.pid, processes.start_time(proc.pid)
        if info_read is not None:
            try:
                info = _read_info(info_read, self.start_timeout)
            except BackendError:
                proc.poll()
                raise BackendError(
                    f"the sandbox did not start: {tail(Path(rec.run_dir) / 'session.log')}"
                ) from None
            finally:
                os.close(info_read)
            rec.init_pid = int(info["child-pid"])
        else:
            rec.init_pid = proc.pid
        rec.init_start = processes.start_time(rec.init_pid)
        return proc
