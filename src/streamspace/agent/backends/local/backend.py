"""Sessions as processes on the agent host: TigerVNC's Xvnc plus the template's app, each
session in its own sandbox under its owner's own Unix identity (see `sandbox` for the chain).

Design notes (the why behind the code):

* Processes are started with `subprocess.Popen` inside `asyncio.to_thread`, not with
  `asyncio.create_subprocess_exec`: asyncio's subprocess transport kills its child when the
  transport is closed or garbage-collected, which would take every session down with the agent.
  Sessions are meant to survive agent restarts: their processes run in their own session and
  process group, and a restarted agent re-reads the records (pids and start times) and keeps
  managing them.
* The VNC server listens on a Unix socket in the session's runtime directory, never on TCP. In
  the uid sandbox the socket is handed to the agent's user (mode 0600) once Xvnc made it, so
  only the agent can connect; other sessions cannot even see the directory.
* PID 1 of a sandbox is tini. Stopping a session sends it SIGTERM (the init script stops the
  app, then Xvnc); whatever is left after `stop_timeout` dies with SIGKILL to tini, which takes
  the whole PID namespace with it. Unsandboxed sessions have no PID namespace: leftovers are
  found by the environment marker and killed.
* Exits are noticed by the monitor's poll loop (started by `watch_exits`) and by
  status()/inventory(), reported once through the agent's callback, and the session stays
  "exited" until stopped.
* Homes are measured when a session stops or hibernates; a home over its owner's limit keeps
  its session from starting (see homes.HomeStore.check_limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from streamspace import logs
from streamspace.agent import vnc
from streamspace.agent.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    ExitCallback,
    VNCStream,
    rfb_answers,
)
from streamspace.agent.backends.local import display as xdisplay
from streamspace.agent.backends.local import processes
from streamspace.agent.backends.local.homes import HomeStore, check_name
from streamspace.agent.backends.local.identity import (
    DEFAULT_UID_RANGE,
    IdentityMap,
    parse_uid_range,
)
from streamspace.agent.backends.local.isolation import IsolationPlan, plan_isolation
from streamspace.agent.backends.local.limits import CgroupLimits, detect_limits
from streamspace.agent.backends.local.records import RecordStore, SessionRecord
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
from streamspace.protocol import (
    CatalogEntry,
    Endpoint,
    InventoryItem,
    Isolation,
    SessionRunState,
    SessionSpec,
)

__all__ = ["INIT_SCRIPT", "LocalBackend"]

log = logs.get_logger("streamspace.agent.local")

INIT_SCRIPT = Path(__file__).with_name("session-init.sh")
_REASON_RE = re.compile(r"^streamspace-init: reason=(.*)$", re.MULTILINE)
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_OPTIONAL_DIRS = ("/etc/alternatives", "/var/cache/fontconfig", "/usr/share/fonts")
_LOG_LIMIT = 4 * 1024 * 1024
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


def _take_socket(rec: SessionRecord) -> None:
    """Move Xvnc's socket out of the directory the session user can write, into the agent's
    own: from there on nobody can swap it for a symlink to some other socket on the host (the
    D-Bus system bus, a container engine) for the agent to connect to as root. What is moved
    must still be a socket of the session's own uid, not something planted before the move."""
    os.rename(rec.made_socket, rec.rfb_socket)
    st = os.lstat(rec.rfb_socket)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != rec.uid:
        os.unlink(rec.rfb_socket)
        raise BackendError("the session's VNC socket was replaced before it could be secured")


def _check_visible_in_sandbox(what: str, path: str) -> None:
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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - 8192, 0))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


def _untrusted_tail(path: Path, lines: int) -> str:
    """The tail of a file the session user controls: never follow a symlink planted there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        fh.seek(0, os.SEEK_END)
        fh.seek(max(fh.tell() - 4096, 0))
        data = fh.read()
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


def _exit_reason(run_dir: Path) -> str:
    """The init script's last reason line, with the app's last stderr line for app exits."""
    reasons = _REASON_RE.findall(_tail(run_dir / "session.log", lines=200))
    reason = str(reasons[-1]).strip()[:300] if reasons else "the session's processes exited"
    if reason.startswith("app "):
        last = _untrusted_tail(run_dir / "session" / "app.log", lines=1)[:300]
        if last:
            reason = f"{reason}: {last}"
    return reason


@dataclass
class _Spawned:
    """A session process this agent instance started (absent after an agent restart)."""

    proc: subprocess.Popen[bytes]


class LocalBackend(Backend):
    """Runs each session as Xvnc + app processes on this host (see the module docstring)."""

    kind = "local"

    def __init__(
        self,
        state_dir: Path,
        *,
        insecure_shared_user: bool = False,
        uid_range: tuple[int, int] = DEFAULT_UID_RANGE,
        enforce_limits: bool = True,
        display_base: int = 100,
        poll_interval: float = 1.0,
        start_timeout: float = 10.0,
        stop_timeout: float = 3.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.display_base = display_base
        self._on_exit: ExitCallback | None = None
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        self._run = self.state_dir / "run"
        self._run.mkdir(mode=0o700, exist_ok=True)
        self._run.chmod(0o700)
        self.homes = HomeStore(self.state_dir)
        self.identities = IdentityMap(self.state_dir / "identities.json", uid_range)
        self._store = RecordStore(self.state_dir / "sessions")
        self.plan: IsolationPlan = plan_isolation(insecure_shared_user, uid_range[0])
        self.limits: CgroupLimits | None = None
        self._limits_detail = "limits not enforced: disabled by configuration"
        if enforce_limits:
            self.limits, self._limits_detail = detect_limits()
        self._records: dict[str, SessionRecord] = {}
        self._spawned: dict[str, _Spawned] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._alloc_lock = asyncio.Lock()
        self._reserved_displays: set[int] = set()
        self._stopped: set[str] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        if not self.plan.sandboxed:
            log.warning(
                "local_backend_insecure",
                mode="insecure-shared-user",
                uid=os.getuid(),
                detail="sessions run as the agent's own user without a sandbox; "
                "they can read everything this user can",
            )
        elif self.plan.problem:
            log.error("local_backend_sandbox_unavailable", problem=self.plan.problem)
        self._load_records()

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        settings = options.settings
        try:
            uid_range = parse_uid_range(settings.local_uid_range)
        except ValueError as exc:
            raise BackendError(f"STREAMSPACE_LOCAL_UID_RANGE: {exc}") from None
        return cls(
            state_dir=options.state_dir,
            insecure_shared_user=settings.local_insecure_shared_user,
            uid_range=uid_range,
            enforce_limits=settings.local_enforce_limits,
        )

    # ---- Backend API --------------------------------------------------------------------

    async def start(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="start")

    async def wake(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="wake")

    async def stop(self, session_id: str) -> None:
        async with self._lock(session_id):
            rec = self._records.get(session_id)
            if rec is None:
                # No record, but a crashed start may still have left marked processes behind.
                await asyncio.to_thread(processes.kill_marked, session_id, self.stop_timeout)
                self._stopped.add(session_id)
                return
            await self._teardown(rec)
            if not rec.persistent_home:
                await asyncio.to_thread(shutil.rmtree, rec.home, True)
            else:
                await asyncio.to_thread(self.homes.measure, Path(rec.home))
            await asyncio.to_thread(self._store.delete, session_id)
            del self._records[session_id]
            self._stopped.add(session_id)
        log.event("session_stopped", session_id=session_id)

    async def hibernate(self, session_id: str) -> None:
        async with self._lock(session_id):
            rec = self._records.get(session_id)
            if rec is None:
                raise BackendError(f"session {session_id} is not known to this agent")
            if rec.state == "hibernated":
                return
            await self._teardown(rec)
            rec.state = "hibernated"
            rec.reason = ""
            rec.clear_processes()
            await asyncio.to_thread(self._store.save, rec)
            await asyncio.to_thread(self.homes.measure, Path(rec.home))
        log.event("session_hibernated", session_id=session_id, home=rec.home)

    async def status(self, session_id: str) -> InventoryItem:
        rec = self._records.get(session_id)
        if rec is None or rec.state == "starting":
            state: SessionRunState = "stopped" if session_id in self._stopped else "unknown"
            return InventoryItem(session_id=session_id, state=state)
        await self._check(session_id)
        return self._records.get(session_id, rec).item()

    async def inventory(self) -> list[InventoryItem]:
        for session_id in list(self._records):
            await self._check(session_id)
        return [
            rec.item()
            for rec in sorted(self._records.values(), key=lambda r: r.session_id)
            if rec.state != "starting"
        ]

    def runnable_templates(self, catalog: Iterable[CatalogEntry]) -> list[str]:
        if shutil.which("Xvnc") is None or self.plan.problem:
            return []
        return [
            entry.name
            for entry in catalog
            if entry.local is not None and shutil.which(entry.local.command[0]) is not None
        ]

    def isolation(self) -> Isolation:
        uid_range = f"{self.identities.first}-{self.identities.last}"
        details = {
            "uid-sandbox": f"each user has a uid of their own ({uid_range}), bubblewrap sandbox",
            "userns-sandbox": (
                f"the agent is not root: sessions share its uid {os.getuid()}, each in its own "
                "bubblewrap user namespace"
            ),
            "insecure-shared-user": (
                f"INSECURE: sessions run as the agent's user (uid {os.getuid()}) on the host, "
                "unsandboxed (--insecure-shared-user)"
            ),
        }
        detail = details.get(self.plan.mode, "")
        if self.plan.problem:
            detail = f"{detail}; cannot start sessions: {self.plan.problem}"
        detail = f"{detail}; {self._limits_detail}; home size measured on stop"
        return Isolation(
            mode=self.plan.mode, detail=detail[:512], limits_enforced=self.limits is not None
        )

    async def healthy(self) -> tuple[bool, str]:
        if shutil.which("Xvnc") is None:
            return False, "Xvnc (TigerVNC) is not installed on this host"
        if self.plan.problem:
            return False, self.plan.problem
        if not os.access(self.state_dir, os.W_OK):
            return False, f"state directory {self.state_dir} is not writable"
        return True, ""

    async def open_vnc(self, session_id: str, connect_timeout: float = 10.0) -> VNCStream:
        rec = self._records.get(session_id)
        if rec is None or rec.state != "running":
            raise BackendError(f"session {session_id} is not running on this agent")
        return await vnc.open_unix(rec.rfb_socket, connect_timeout, owner=rec.uid)

    async def close(self) -> None:
        """Stop watching; the sessions themselves keep running for the next agent."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if self._callbacks:
            # Give in-flight exit reports a moment to reach the control plane, not forever.
            _, pending = await asyncio.wait(self._callbacks, timeout=5.0)
            for task in pending:
                task.cancel()

    async def watch_exits(self, on_exit: ExitCallback) -> None:
        """Poll running sessions and report unexpected exits through `on_exit` (idempotent)."""
        self._on_exit = on_exit
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._monitor_loop(), name="local-monitor")

    async def remove_unknown(self, keep: set[str]) -> list[str]:
        """Also the sessions still starting, which the inventory leaves out."""
        removed = sorted(sid for sid in self._records if sid not in keep)
        for session_id in removed:
            await self.stop(session_id)
        return removed

    async def legacy_home_names(self) -> list[str]:
        """User names of homes from before homes were keyed by id (see homes.HomeStore)."""
        return await asyncio.to_thread(self.homes.legacy_names)

    async def migrate_homes(self, owners: dict[str, str]) -> dict[str, str]:
        """Move name-keyed homes to the ids the control plane says those names have now."""
        return await asyncio.to_thread(self.homes.migrate_legacy, owners, self._account)

    def home_for(self, spec: SessionSpec) -> Path:
        check_name("session id", spec.session_id)
        if spec.persistent_home:
            return self.homes.persistent(spec.user_id, spec.template)
        return self.homes.scratch(spec.session_id)

    def run_dir(self, session_id: str) -> Path:
        return self._run / session_id

    # ---- start ----------------------------------------------------------------------------

    def _account(self, user_id: str) -> tuple[int, int]:
        """The uid/gid a user's sessions run as (blocking: may allocate and persist one)."""
        if self.plan.switches_uid:
            uid = self.identities.uid_for(user_id)
            return uid, uid
        return os.getuid(), os.getgid()

    async def _ensure_running(self, spec: SessionSpec, action: str) -> Endpoint:
        session_id = spec.session_id
        home = self.home_for(spec)
        if spec.local is None:
            raise BackendError(f"template {spec.template!r} has no local launch command")
        async with self._lock(session_id):
            rec = self._records.get(session_id)
            if rec is not None and rec.state == "running":
                reason = await asyncio.to_thread(self._dead_reason, rec)
                endpoint = rec.endpoint()
                if reason is None and endpoint is not None:
                    return endpoint
                await self._teardown(rec)
            elif rec is not None and rec.state in ("exited", "starting"):
                await self._teardown(rec)
            started = time.monotonic()
            new = await self._launch(spec, home)
            self._stopped.discard(session_id)
        log.event(
            "session_started",
            session_id=session_id,
            action=action,
            user_id=spec.user_id,
            template=spec.template,
            isolation=new.mode,
            uid=new.uid,
            seconds=round(time.monotonic() - started, 3),
        )
        endpoint = new.endpoint()
        assert endpoint is not None
        return endpoint

    async def _launch(self, spec: SessionSpec, home: Path) -> SessionRecord:
        assert spec.local is not None
        plan = self.plan
        if plan.problem:
            raise BackendError(plan.problem)
        xvnc = shutil.which("Xvnc")
        if xvnc is None:
            raise BackendError("Xvnc (TigerVNC) is not installed on this host")
        env_path = spec.local.env.get("PATH") or os.environ.get("PATH") or "/usr/bin:/bin"
        exe = shutil.which(spec.local.command[0], path=env_path)
        if exe is None:
            raise BackendError(
                f"command {spec.local.command[0]!r} of template {spec.template!r} "
                "is not installed on this host"
            )
        if plan.sandboxed:
            for what, path in (("Xvnc", xvnc), (f"command {spec.local.command[0]!r}", exe)):
                await asyncio.to_thread(_check_visible_in_sandbox, what, path)
        uid, gid = await asyncio.to_thread(self._account, spec.user_id)
        await asyncio.to_thread(self.homes.check_limit, home, spec.home_limit_mb)
        run_dir = self.run_dir(spec.session_id)
        display = SANDBOX_DISPLAY
        if not plan.sandboxed:
            display = await self._reserve_display()
        rec = SessionRecord(
            session_id=spec.session_id,
            user=spec.user,
            user_id=spec.user_id,
            template=spec.template,
            state="starting",
            home=str(home),
            persistent_home=spec.persistent_home,
            spec=spec.model_dump(mode="json"),
            mode=plan.mode,
            uid=uid,
            gid=gid,
            run_dir=str(run_dir),
            display=display,
        )
        self._records[spec.session_id] = rec
        try:
            await asyncio.to_thread(self._prepare, rec, home)
            await asyncio.to_thread(self._store.save, rec)
            proc = await asyncio.to_thread(self._spawn, rec, spec, xvnc, home)
            self._spawned[spec.session_id] = _Spawned(proc)
            await asyncio.to_thread(self._store.save, rec)
            await self._wait_ready(rec, proc)
            await asyncio.to_thread(_take_socket, rec)
            rec.state = "running"
            rec.started_at = time.time()
            await asyncio.to_thread(self._store.save, rec)
            return rec
        except BaseException:
            await self._teardown(rec)
            self._records.pop(spec.session_id, None)
            await asyncio.to_thread(self._store.delete, spec.session_id)
            raise
        finally:
            self._reserved_displays.discard(display)

    async def _reserve_display(self) -> int:
        async with self._alloc_lock:
            taken = self._reserved_displays | {
                r.display for r in self._records.values() if r.display is not None
            }
            found = await asyncio.to_thread(xdisplay.free_display, self.display_base, taken)
            if found is None:
                raise BackendError("no free X display number on this host")
            self._reserved_displays.add(found)
            return found

    def _prepare(self, rec: SessionRecord, home: Path) -> None:
        """Home and runtime directories; the runtime one is made fresh on every start.

        `run/<id>` (agent only) holds the session log; `run/<id>/session` (the session's uid)
        holds the X cookie, the VNC socket and XDG_RUNTIME_DIR, and is what the sandbox sees
        as /run/streamspace. Files are written before the directory is handed over, so the
        session user never gets a chance to plant a symlink where the agent writes."""
        self.homes.prepare(home, rec.uid, rec.gid)
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

    def _spawn(
        self, rec: SessionRecord, spec: SessionSpec, xvnc: str, home: Path
    ) -> subprocess.Popen[bytes]:
        assert spec.local is not None
        plan = self.plan
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
        )
        argv: list[str] = []
        if self.limits is not None:
            argv += cgroup_join_argv(
                self.limits.create(
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
                    f"the sandbox did not start: {_tail(Path(rec.run_dir) / 'session.log')}"
                ) from None
            finally:
                os.close(info_read)
            rec.init_pid = int(info["child-pid"])
        else:
            rec.init_pid = proc.pid
        rec.init_start = processes.start_time(rec.init_pid)
        return proc

    async def _wait_ready(self, rec: SessionRecord, proc: subprocess.Popen[bytes]) -> None:
        """Until Xvnc answers RFB on its socket; fails fast if the session ends first."""
        deadline = time.monotonic() + self.start_timeout
        log_path = Path(rec.run_dir) / "session.log"
        while True:
            if proc.poll() is not None:
                reason = await asyncio.to_thread(_exit_reason, Path(rec.run_dir))
                tail = await asyncio.to_thread(_tail, log_path, 5)
                raise BackendError(f"the session ended during startup ({reason}): {tail}")
            if await self._rfb_answers(rec):
                return
            if time.monotonic() > deadline:
                tail = await asyncio.to_thread(_tail, log_path)
                raise BackendError(
                    f"the display server did not come up within {self.start_timeout:.0f}s: {tail}"
                )
            await asyncio.sleep(0.05)

    async def _rfb_answers(self, rec: SessionRecord) -> bool:
        try:
            with vnc.socket_handle(rec.made_socket, owner=rec.uid) as path:
                return await rfb_answers(unix_path=path)
        except OSError:  # not there (yet), or not a socket of the session's
            return False

    # ---- liveness & exit reporting ---------------------------------------------------------

    def _dead_reason(self, rec: SessionRecord) -> str | None:
        """Why a running session is no longer running, or None if it still is (sync)."""
        spawned = self._spawned.get(rec.session_id)
        if spawned is not None and spawned.proc.poll() is not None:
            return _exit_reason(Path(rec.run_dir))
        if not processes.alive(rec.init_pid, rec.init_start):
            return _exit_reason(Path(rec.run_dir))
        return None

    def _trim_log(self, rec: SessionRecord) -> None:
        """A session can write to its logs without bound; keep them from filling the disk."""
        for path in (Path(rec.run_dir) / "session.log", Path(rec.run_dir) / "session" / "app.log"):
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size > _LOG_LIMIT:
                        os.ftruncate(fd, 0)
                        log.warning("session_log_truncated", session_id=rec.session_id)
                finally:
                    os.close(fd)

    async def _check(self, session_id: str) -> None:
        """Turn a running session whose processes died into 'exited' and report it once."""
        rec = self._records.get(session_id)
        if rec is None or rec.state != "running":
            return
        lock = self._lock(session_id)
        if lock.locked():
            return  # start/stop/hibernate in progress owns the session right now
        async with lock:
            rec = self._records.get(session_id)
            if rec is None or rec.state != "running":
                return
            reason = await asyncio.to_thread(self._dead_reason, rec)
            if reason is None:
                await asyncio.to_thread(self._trim_log, rec)
                return
            await self._teardown(rec, remove_run_dir=False)
            rec.state = "exited"
            rec.reason = reason
            rec.clear_processes()
            await asyncio.to_thread(self._store.save, rec)
        log.warning("session_exited", session_id=session_id, reason=reason)
        if self._on_exit is not None:
            task = asyncio.create_task(self._notify(session_id, reason))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _notify(self, session_id: str, reason: str) -> None:
        assert self._on_exit is not None
        try:
            await self._on_exit(session_id, reason)
        except Exception:
            log.exception("on_exit_callback_failed", session_id=session_id)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for session_id in list(self._records):
                try:
                    await self._check(session_id)
                except Exception:
                    log.exception("monitor_check_failed", session_id=session_id)

    # ---- teardown -------------------------------------------------------------------------

    async def _teardown(self, rec: SessionRecord, *, remove_run_dir: bool = True) -> None:
        spawned = self._spawned.pop(rec.session_id, None)
        await asyncio.to_thread(self._kill, rec, spawned)
        if rec.display is not None and rec.mode == "insecure-shared-user":
            await asyncio.to_thread(xdisplay.cleanup_display, rec.display)
        if remove_run_dir:
            await asyncio.to_thread(shutil.rmtree, rec.run_dir, True)

    def _kill(self, rec: SessionRecord, spawned: _Spawned | None) -> None:
        """Stop the session's processes: SIGTERM to its init, then SIGKILL after a grace.

        In a sandbox, SIGKILL to PID 1 ends the whole PID namespace, so nothing survives even
        a session that hid from its process tree; cgroups (when enforced) are emptied too.
        Unsandboxed sessions are hunted by their environment marker instead."""
        init_alive = processes.alive(rec.init_pid, rec.init_start)
        if init_alive and rec.init_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(rec.init_pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            while time.monotonic() < deadline and processes.alive(rec.init_pid, rec.init_start):
                if spawned is not None:
                    spawned.proc.poll()
                time.sleep(0.02)
            if processes.alive(rec.init_pid, rec.init_start):
                log.warning("session_kill_escalated", session_id=rec.session_id)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(rec.init_pid, signal.SIGKILL)
        if spawned is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spawned.proc.wait(timeout=self.stop_timeout)
        elif processes.alive(rec.pid, rec.pid_start) and rec.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(rec.pid, signal.SIGKILL)
        if self.limits is not None:
            self.limits.kill(rec.session_id)
            self.limits.remove(rec.session_id)
        survivors = processes.kill_marked(rec.session_id, grace=1.0)
        if survivors:
            log.error("session_processes_survived", session_id=rec.session_id, pids=survivors)

    # ---- persistence ----------------------------------------------------------------------

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    def _load_records(self) -> None:
        for rec in self._store.load_all():
            if rec.state == "starting":
                # The agent died during this start: remove whatever it had spawned.
                self._kill(rec, None)
                shutil.rmtree(rec.run_dir, ignore_errors=True)
                rec.state = "exited"
                rec.reason = "the agent restarted while the session was starting"
                rec.clear_processes()
                self._store.save(rec)
            self._records[rec.session_id] = rec
            log.event(
                "session_adopted", session_id=rec.session_id, state=rec.state, isolation=rec.mode
            )
