"""Sessions as plain processes on the agent host: one TigerVNC Xvnc plus the template's app.

Design notes (the why behind the code):

* Processes are started with `subprocess.Popen` inside `asyncio.to_thread`, not with
  `asyncio.create_subprocess_exec`: asyncio's subprocess transport kills its child when the
  transport is closed or garbage-collected, which would take every session down with the agent
  (or with the event loop). Popen never kills on collection; exits are observed by a
  non-blocking `poll()` (which also reaps, so no zombies) from the monitor task and from
  `status()`/`inventory()`.
* Xvnc and the app each get their own session and process group (`start_new_session`): the
  app cannot join Xvnc's group because setpgid() refuses groups of another session. The app
  runs under a tiny per-session reaper (see `_REAPER`) so orphans it leaves are reaped in the
  session rather than by a host init that may not reap. Every process of a session carries
  `STREAMSPACE_SESSION_ID=<id>` in its environment; teardown finds them by that marker (and
  by process group), signals children before parents and escalates to SIGKILL, so
  double-forked or setsid() children cannot survive as orphans.
* Every running session is persisted in `state_dir/sessions/<id>.json` with pids, process start
  times (so a recycled pid is never mistaken for ours), display and port; a restarted agent
  re-reads them and keeps managing the sessions it did not spawn itself. Exits are noticed by
  `start_monitor()`'s poll loop (and by `status()`/`inventory()`), which then report through
  `on_exit(session_id, reason)` once and leave the session in state "exited" until stopped.
* Each display gets its own MIT-MAGIC-COOKIE so one user's app cannot connect to another
  user's X server on the same host. The RFB port has no authentication (SecurityTypes None)
  but listens on loopback only; the agent's tunnel is the one meant to reach it.
* With `sandbox=True` the app runs under bubblewrap: read-only system, private /tmp, pid, ipc,
  uts and (unless `sandbox_network=True`) network namespaces, and only its own home, runtime
  dir, Xauthority and display socket bound in. bwrap's parent is the reaper, not the agent, so
  `--die-with-parent` ties the sandbox to the session: sandboxed sessions survive an agent
  restart like the others.
* Reconcile: `remove_unknown(keep)` stops every held session whose id is not in `keep`.
* Resource limits (`SessionSpec.resources`) and `Display.vnc_port` are not applied: the port
  is allocated here, and CPU/memory limits need cgroups the local backend does not manage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

from streamspace.agent.backends.base import Backend, BackendError, rfb_answers
from streamspace.protocol import (
    CatalogEntry,
    Endpoint,
    InventoryItem,
    SessionRunState,
    SessionSpec,
)

__all__ = ["SESSION_ENV_MARKER", "ExitCallback", "LocalBackend"]

log = logging.getLogger("streamspace.agent.local")

SESSION_ENV_MARKER = "STREAMSPACE_SESSION_ID"
"""Environment variable carried by every process of a session; teardown hunts for it."""

ExitCallback = Callable[[str, str], Awaitable[None]]

_LOOPBACK = "127.0.0.1"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_RESERVED_ENV = frozenset({"DISPLAY", "XAUTHORITY", "HOME", "XDG_RUNTIME_DIR", SESSION_ENV_MARKER})
_X_UNIX_DIR = Path("/tmp/.X11-unix")
_RANGE = 1000
_START_ATTEMPTS = 3

RecordState = Literal["running", "hibernated", "exited"]

# The app's parent: a per-session init. As a child subreaper it inherits every orphan the app
# (or bwrap's pid-namespace layers) leaves behind and reaps it, so nothing ends up a zombie
# under a host init that may not reap. When the main process exits the session is over, as
# with a container: leftovers get SIGTERM, then SIGKILL after 2 s, and the reaper exits with
# the main process's code. It is bwrap's parent too, so --die-with-parent ties the sandbox to
# the session's process group rather than to the agent, and sessions survive agent restarts.
_REAPER = r"""
import ctypes, os, signal, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
argv = sys.argv[1:]
main = os.fork()
if main == 0:
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"streamspace: cannot run {argv[0]}: {exc}\n")
    os._exit(127)

def forward(signum, frame):
    try:
        os.kill(main, signum)
    except ProcessLookupError:
        pass

for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, forward)

def my_children():
    me, kids = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    raw = fh.read()
            except OSError:
                continue
            fields = raw[raw.rfind(b")") + 2 :].split()
            if int(fields[1]) == me and fields[0] != b"Z":
                kids.append(int(name))
    return kids

code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(code)
    if pid == main:
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
        break

deadline, sig = time.monotonic() + 2.0, signal.SIGTERM
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        break
    kids = my_children()
    if not kids:
        time.sleep(0.02)
        continue
    if time.monotonic() > deadline:
        sig = signal.SIGKILL
    for kid in kids:
        try:
            os.kill(kid, sig)
        except ProcessLookupError:
            pass
    sig = signal.SIGKILL if time.monotonic() > deadline else 0
    time.sleep(0.05)
sys.exit(code)
"""


# ---- persisted state ----------------------------------------------------------------------


@dataclass
class _Record:
    session_id: str
    user: str
    template: str
    state: RecordState
    home: str
    persistent_home: bool
    spec: dict[str, Any]
    sandbox: bool = False
    display: int | None = None
    port: int | None = None
    xvnc_pid: int | None = None
    xvnc_start: int | None = None
    app_pid: int | None = None
    app_start: int | None = None
    reason: str = ""
    started_at: float | None = None
    updated_at: float = field(default_factory=time.time)

    def endpoint(self) -> Endpoint | None:
        if self.state != "running" or self.port is None:
            return None
        return Endpoint(host=_LOOPBACK, port=self.port)

    def item(self) -> InventoryItem:
        return InventoryItem(
            session_id=self.session_id,
            state=self.state,
            endpoint=self.endpoint(),
            user=self.user,
            template=self.template,
        )

    def clear_processes(self) -> None:
        self.display = self.port = None
        self.xvnc_pid = self.xvnc_start = self.app_pid = self.app_start = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Record:
        names = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in data.items() if k in names})
        if rec.state not in ("running", "hibernated", "exited"):
            raise ValueError(f"unknown state {rec.state!r}")
        _check_name("session id", rec.session_id)
        return rec


@dataclass
class _Children:
    """Popen handles for processes this agent instance spawned (absent after a restart)."""

    xvnc: subprocess.Popen[bytes]
    display: int
    port: int
    app: subprocess.Popen[bytes] | None = None


# ---- /proc helpers (synchronous: called through asyncio.to_thread) -------------------------


class _Stat(NamedTuple):
    state: str
    ppid: int
    pgid: int
    starttime: int


def _proc_stat(pid: int | str) -> _Stat | None:
    """The /proc/<pid>/stat fields we need, or None if the process does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return _Stat(rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[19]))
    except (IndexError, ValueError):
        return None


def _alive(pid: int | None, starttime: int | None) -> bool:
    """True if pid runs and is the very process we recorded (zombies count as gone)."""
    if pid is None:
        return False
    stat = _proc_stat(pid)
    if stat is None or stat.state in ("Z", "X", "x"):
        return False
    return starttime is None or stat.starttime == starttime


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_our_xvnc(pid: int | None, starttime: int | None, display: int | None) -> bool:
    if not _alive(pid, starttime) or pid is None:
        return False
    argv = _cmdline(pid)
    return bool(argv) and Path(argv[0]).name == "Xvnc" and f":{display}" in argv


def _session_processes(session_id: str, groups: Iterable[int]) -> dict[int, int]:
    """pid -> ppid of every live process carrying the session marker or in one of its groups."""
    needle = f"{SESSION_ENV_MARKER}={session_id}".encode()
    groups = set(groups)
    me = os.getpid()
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        stat = _proc_stat(entry.name)
        if stat is None or stat.state in ("Z", "X", "x"):
            continue
        member = stat.pgid in groups
        if not member:
            try:
                member = needle in Path(entry.path, "environ").read_bytes().split(b"\0")
            except OSError:
                continue
        if member:
            found[int(entry.name)] = stat.ppid
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def _port_free(port: int) -> bool:
    """Bind like Xvnc does (SO_REUSEADDR), so TIME_WAIT leftovers do not rule a port out."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_LOOPBACK, port))
        except OSError:
            return False
    return True


def _abstract_x_sockets() -> set[str]:
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {parts[-1] for line in lines if (parts := line.split()) and parts[-1].startswith("@")}


def _display_free(n: int, abstract: set[str]) -> bool:
    return not (
        Path(f"/tmp/.X{n}-lock").exists()
        or (_X_UNIX_DIR / f"X{n}").exists()
        or f"@/tmp/.X11-unix/X{n}" in abstract
    )


def _cleanup_display(display: int, xvnc_pid: int | None) -> None:
    """Remove the X lock and socket Xvnc left behind, but never another live server's."""
    lock = Path(f"/tmp/.X{display}-lock")
    sock = _X_UNIX_DIR / f"X{display}"
    try:
        owner: int | None = int(lock.read_text().strip())
    except FileNotFoundError:
        owner = -1
    except (OSError, ValueError):
        owner = None
    if owner == -1 or owner is None or owner == xvnc_pid or not _alive(owner, None):
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def _write_xauthority(path: Path, display: int, cookie: bytes) -> None:
    """One FamilyWild entry: the address is ignored so it works inside a uts namespace too."""

    def field_(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    entry = (
        struct.pack(">H", 0xFFFF)
        + field_(b"")
        + field_(str(display).encode())
        + field_(b"MIT-MAGIC-COOKIE-1")
        + field_(cookie)
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(entry)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - 4096, 0))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _unix_user() -> tuple[str, str]:
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return str(os.getuid()), "/bin/sh"
    return entry.pw_name, entry.pw_shell or "/bin/sh"


def _check_name(kind: str, value: str) -> None:
    """Names become path components; refuse anything that could escape state_dir."""
    if not _NAME_RE.fullmatch(value) or value in (".", ".."):
        raise BackendError(f"invalid {kind} {value!r}: use letters, digits and . _ @ + -")


# ---- the backend --------------------------------------------------------------------------


class LocalBackend(Backend):
    """Runs each session as Xvnc + app processes on this host (see the module docstring)."""

    kind = "local"

    def __init__(
        self,
        state_dir: Path,
        sandbox: bool = False,
        display_base: int = 100,
        port_base: int = 15900,
        *,
        on_exit: ExitCallback | None = None,
        poll_interval: float = 1.0,
        sandbox_network: bool = False,
        start_timeout: float = 10.0,
        stop_timeout: float = 3.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.sandbox = sandbox
        self.sandbox_network = sandbox_network
        self.display_base = display_base
        self.port_base = port_base
        self.on_exit = on_exit
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._homes = self.state_dir / "homes"
        self._ephemeral = self.state_dir / "ephemeral"
        self._run = self.state_dir / "run"
        self._sessions = self.state_dir / "sessions"
        for directory in (self.state_dir, self._homes, self._ephemeral, self._run, self._sessions):
            _mkdir_private(directory)
        self._records: dict[str, _Record] = {}
        self._children: dict[str, _Children] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._alloc_lock = asyncio.Lock()
        self._reserved_displays: set[int] = set()
        self._reserved_ports: set[int] = set()
        self._stopped: set[str] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        self._load_records()

    # ---- Backend API --------------------------------------------------------------------

    async def start(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="start")

    async def wake(self, spec: SessionSpec) -> Endpoint:
        return await self._ensure_running(spec, action="wake")

    async def stop(self, session_id: str) -> None:
        async with self._lock(session_id):
            rec = self._records.get(session_id)
            children = self._children.pop(session_id, None)
            if rec is None:
                # No record, but a crashed start may still have left marked processes behind.
                await self._kill(session_id, None, children)
                self._stopped.add(session_id)
                return
            await self._teardown(rec, children)
            if not rec.persistent_home:
                await asyncio.to_thread(shutil.rmtree, rec.home, True)
            await asyncio.to_thread(self._record_path(session_id).unlink, True)
            del self._records[session_id]
            self._stopped.add(session_id)
        log.info("session_stopped session_id=%s", session_id)

    async def hibernate(self, session_id: str) -> None:
        async with self._lock(session_id):
            rec = self._records.get(session_id)
            if rec is None:
                raise BackendError(f"session {session_id} is not known to this agent")
            if rec.state == "hibernated":
                return
            await self._teardown(rec, self._children.pop(session_id, None))
            rec.state = "hibernated"
            rec.reason = ""
            rec.clear_processes()
            await self._save(rec)
        log.info("session_hibernated session_id=%s home=%s", session_id, rec.home)

    async def status(self, session_id: str) -> InventoryItem:
        rec = self._records.get(session_id)
        if rec is None:
            state: SessionRunState = "stopped" if session_id in self._stopped else "unknown"
            return InventoryItem(session_id=session_id, state=state)
        await self._check(session_id)
        return self._records.get(session_id, rec).item()

    async def inventory(self) -> list[InventoryItem]:
        for session_id in list(self._records):
            await self._check(session_id)
        return [rec.item() for rec in sorted(self._records.values(), key=lambda r: r.session_id)]

    def runnable_templates(self, catalog: Iterable[CatalogEntry]) -> list[str]:
        if shutil.which("Xvnc") is None or (self.sandbox and shutil.which("bwrap") is None):
            return []
        return [
            entry.name
            for entry in catalog
            if entry.local is not None and shutil.which(entry.local.command[0]) is not None
        ]

    async def healthy(self) -> tuple[bool, str]:
        if shutil.which("Xvnc") is None:
            return False, "Xvnc (TigerVNC) is not installed on this host"
        if self.sandbox and shutil.which("bwrap") is None:
            return False, "sandboxing is enabled but bwrap (bubblewrap) is not installed"
        if not os.access(self.state_dir, os.W_OK):
            return False, f"state directory {self.state_dir} is not writable"
        return True, ""

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

    # ---- extras used by the agent --------------------------------------------------------

    async def start_monitor(self, on_exit: ExitCallback | None = None) -> None:
        """Poll running sessions and report unexpected exits through `on_exit` (idempotent)."""
        if on_exit is not None:
            self.on_exit = on_exit
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._monitor_loop(), name="local-monitor")

    async def remove_unknown(self, keep: set[str]) -> list[str]:
        """Stop every session (running, hibernated or exited) whose id is not in keep."""
        removed = [sid for sid in list(self._records) if sid not in keep]
        for session_id in removed:
            await self.stop(session_id)
        return removed

    def home_for(self, spec: SessionSpec) -> Path:
        _check_name("user", spec.user)
        _check_name("template", spec.template)
        _check_name("session id", spec.session_id)
        if spec.persistent_home:
            return self._homes / spec.user / spec.template
        return self._ephemeral / spec.session_id

    def run_dir(self, session_id: str) -> Path:
        return self._run / session_id

    # ---- start ----------------------------------------------------------------------------

    async def _ensure_running(self, spec: SessionSpec, action: str) -> Endpoint:
        session_id = spec.session_id
        home = self.home_for(spec)
        if spec.local is None:
            raise BackendError(f"template {spec.template!r} has no local launch command")
        async with self._lock(session_id):
            rec = self._records.get(session_id)
            if rec is not None and rec.state == "running":
                reason = await asyncio.to_thread(
                    self._dead_reason, rec, self._children.get(session_id)
                )
                endpoint = rec.endpoint()
                if reason is None and endpoint is not None:
                    return endpoint
                await self._teardown(rec, self._children.pop(session_id, None))
            elif rec is not None and rec.state == "exited":
                await self._teardown(rec, self._children.pop(session_id, None))
            started = time.monotonic()
            new = await self._launch(spec, home)
            self._records[session_id] = new
            self._stopped.discard(session_id)
            await self._save(new)
        log.info(
            "session_started session_id=%s action=%s user=%s template=%s display=:%s port=%s "
            "sandbox=%s seconds=%.3f",
            session_id,
            action,
            spec.user,
            spec.template,
            new.display,
            new.port,
            self.sandbox,
            time.monotonic() - started,
        )
        endpoint = new.endpoint()
        assert endpoint is not None
        return endpoint

    async def _launch(self, spec: SessionSpec, home: Path) -> _Record:
        assert spec.local is not None
        xvnc = shutil.which("Xvnc")
        if xvnc is None:
            raise BackendError("Xvnc (TigerVNC) is not installed on this host")
        if self.sandbox and shutil.which("bwrap") is None:
            raise BackendError("sandboxing is enabled but bwrap (bubblewrap) is not installed")
        env_path = spec.local.env.get("PATH") or os.environ.get("PATH") or _DEFAULT_PATH
        exe = shutil.which(spec.local.command[0], path=env_path)
        if exe is None:
            raise BackendError(
                f"command {spec.local.command[0]!r} of template {spec.template!r} "
                "is not installed on this host"
            )
        run_dir = self.run_dir(spec.session_id)
        await asyncio.to_thread(self._prepare_dirs, home, run_dir)
        children: _Children | None = None
        try:
            children = await self._start_xvnc(spec, xvnc, run_dir)
            display, port = children.display, children.port
            children.app = await asyncio.to_thread(
                self._spawn_app, spec, exe, home, run_dir, display
            )
            self._children[spec.session_id] = children
            xvnc_stat = _proc_stat(children.xvnc.pid)
            app_stat = _proc_stat(children.app.pid)
            return _Record(
                session_id=spec.session_id,
                user=spec.user,
                template=spec.template,
                state="running",
                home=str(home),
                persistent_home=spec.persistent_home,
                spec=spec.model_dump(mode="json"),
                sandbox=self.sandbox,
                display=display,
                port=port,
                xvnc_pid=children.xvnc.pid,
                xvnc_start=xvnc_stat.starttime if xvnc_stat else None,
                app_pid=children.app.pid,
                app_start=app_stat.starttime if app_stat else None,
                started_at=time.time(),
            )
        except BaseException:
            self._children.pop(spec.session_id, None)
            await self._kill(spec.session_id, None, children)
            if children is not None:
                await asyncio.to_thread(_cleanup_display, children.display, children.xvnc.pid)
            await asyncio.to_thread(shutil.rmtree, run_dir, True)
            raise
        finally:
            if children is not None:
                self._release(children.display, children.port)

    def _prepare_dirs(self, home: Path, run_dir: Path) -> None:
        for parent in reversed(home.relative_to(self.state_dir).parents):
            if parent != Path("."):
                _mkdir_private(self.state_dir / parent)
        _mkdir_private(home)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        _mkdir_private(run_dir)
        _mkdir_private(run_dir / "xdg")

    async def _start_xvnc(self, spec: SessionSpec, xvnc: str, run_dir: Path) -> _Children:
        """Start Xvnc on a free display/port, retrying if another server races us to them."""
        last_error = ""
        for attempt in range(1, _START_ATTEMPTS + 1):
            # Reserve under the lock, then wait for readiness without it so concurrent starts
            # overlap; the reservation keeps others off this display/port until the record
            # exists (released by _launch).
            async with self._alloc_lock:
                displays = self._reserved_displays | {
                    r.display for r in self._records.values() if r.display is not None
                }
                ports = self._reserved_ports | {
                    r.port for r in self._records.values() if r.port is not None
                }
                display, port = await asyncio.to_thread(self._allocate, displays, ports)
                self._reserved_displays.add(display)
                self._reserved_ports.add(port)
            try:
                proc = await asyncio.to_thread(self._spawn_xvnc, spec, xvnc, run_dir, display, port)
                children = _Children(xvnc=proc, display=display, port=port)
                try:
                    ready = await self._wait_ready(proc, display, port, run_dir)
                except BaseException:
                    await self._kill(spec.session_id, None, children)
                    await asyncio.to_thread(_cleanup_display, display, proc.pid)
                    raise
            except BaseException:
                self._release(display, port)
                raise
            if ready:
                log.debug(
                    "xvnc_ready session_id=%s display=:%s port=%s pid=%s",
                    spec.session_id,
                    display,
                    port,
                    proc.pid,
                )
                return children
            self._release(display, port)
            tail = await asyncio.to_thread(_tail, run_dir / "xvnc.log")
            last_error = f"Xvnc exited with code {proc.returncode}: {tail}"
            await asyncio.to_thread(_cleanup_display, display, proc.pid)
            log.warning(
                "xvnc_start_failed session_id=%s attempt=%s display=:%s port=%s code=%s",
                spec.session_id,
                attempt,
                display,
                port,
                proc.returncode,
            )
        raise BackendError(f"could not start the display server for {spec.template}: {last_error}")

    def _release(self, display: int, port: int) -> None:
        self._reserved_displays.discard(display)
        self._reserved_ports.discard(port)

    def _allocate(self, used_displays: set[int], used_ports: set[int]) -> tuple[int, int]:
        """First free display and port (runs in a thread: the exclusions are snapshots)."""
        abstract = _abstract_x_sockets()
        display = next(
            (
                n
                for n in range(self.display_base, self.display_base + _RANGE)
                if n not in used_displays and _display_free(n, abstract)
            ),
            None,
        )
        if display is None:
            raise BackendError("no free X display number on this host")
        listening = _listening_ports()
        port = next(
            (
                p
                for p in range(self.port_base, min(self.port_base + _RANGE, 65536))
                if p not in used_ports and p not in listening and _port_free(p)
            ),
            None,
        )
        if port is None:
            raise BackendError("no free TCP port for the session's VNC server")
        return display, port

    def _spawn_xvnc(
        self, spec: SessionSpec, xvnc: str, run_dir: Path, display: int, port: int
    ) -> subprocess.Popen[bytes]:
        xauth = run_dir / "Xauthority"
        _write_xauthority(xauth, display, secrets.token_bytes(16))
        argv = [
            xvnc,
            f":{display}",
            "-geometry",
            f"{spec.display.width}x{spec.display.height}",
            "-depth",
            str(spec.display.depth),
            "-rfbport",
            str(port),
            "-localhost",
            "-interface",
            _LOOPBACK,
            "-SecurityTypes",
            "None",
            "-UseBlacklist",
            "0",
            "-AlwaysShared",
            "-nolisten",
            "tcp",
            "-auth",
            str(xauth),
            "-desktop",
            f"{spec.template} ({spec.user})",
        ]
        env = {
            "PATH": os.environ.get("PATH", _DEFAULT_PATH),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(run_dir),
            SESSION_ENV_MARKER: spec.session_id,
        }
        with (run_dir / "xvnc.log").open("ab") as logfile:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=run_dir,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )

    async def _wait_ready(
        self, proc: subprocess.Popen[bytes], display: int, port: int, run_dir: Path
    ) -> bool:
        """True once Xvnc answers RFB and its X socket exists; False if it exited first."""
        deadline = time.monotonic() + self.start_timeout
        socket_path = _X_UNIX_DIR / f"X{display}"
        while True:
            if proc.poll() is not None:
                return False
            if await self._rfb_answers(port) and socket_path.exists():
                return proc.poll() is None
            if time.monotonic() > deadline:
                tail = await asyncio.to_thread(_tail, run_dir / "xvnc.log")
                raise BackendError(
                    f"the display server did not come up within {self.start_timeout:.0f}s: {tail}"
                )
            await asyncio.sleep(0.05)

    @staticmethod
    async def _rfb_answers(port: int) -> bool:
        return await rfb_answers(port, _LOOPBACK)

    def _app_env(
        self, spec: SessionSpec, home: Path, run_dir: Path, display: int
    ) -> dict[str, str]:
        assert spec.local is not None
        user, shell = _unix_user()
        env = {
            "PATH": os.environ.get("PATH", _DEFAULT_PATH),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "USER": user,
            "LOGNAME": user,
            "SHELL": shell,
            "TERM": "xterm",
            "STREAMSPACE_USER": spec.user,
            "STREAMSPACE_TEMPLATE": spec.template,
        }
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        env.update({k: v for k, v in spec.local.env.items() if k not in _RESERVED_ENV})
        env.update(
            {
                "HOME": str(home),
                "DISPLAY": f":{display}",
                "XAUTHORITY": str(run_dir / "Xauthority"),
                "XDG_RUNTIME_DIR": str(run_dir / "xdg"),
                SESSION_ENV_MARKER: spec.session_id,
            }
        )
        return env

    def _sandbox_argv(self, home: Path, run_dir: Path, display: int) -> list[str]:
        args = [
            shutil.which("bwrap") or "bwrap",
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "streamspace",
        ]
        if not self.sandbox_network:
            args.append("--unshare-net")
        args += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        x_socket = str(_X_UNIX_DIR / f"X{display}")
        xauth = str(run_dir / "Xauthority")
        args += ["--ro-bind", "/etc", "/etc"]
        args += ["--ro-bind-try", "/var/cache/fontconfig", "/var/cache/fontconfig"]
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm"]
        # A private /tmp holding only this session's X socket: other displays stay unreachable.
        args += ["--tmpfs", "/tmp", "--dir", str(_X_UNIX_DIR), "--bind", x_socket, x_socket]
        for writable in (str(home), str(run_dir / "xdg")):
            args += ["--bind", writable, writable]
        args += ["--ro-bind", xauth, xauth, "--chdir", str(home)]
        return args

    def _spawn_app(
        self, spec: SessionSpec, exe: str, home: Path, run_dir: Path, display: int
    ) -> subprocess.Popen[bytes]:
        assert spec.local is not None
        argv = [exe, *spec.local.command[1:]]
        if self.sandbox:
            argv = [*self._sandbox_argv(home, run_dir, display), "--", *argv]
        argv = [sys.executable, "-I", "-S", "-c", _REAPER, *argv]
        env = self._app_env(spec, home, run_dir, display)
        with (
            (run_dir / "app.stdout.log").open("ab") as out,
            (run_dir / "app.stderr.log").open("ab") as err,
        ):
            return subprocess.Popen(
                argv,
                env=env,
                cwd=home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )

    # ---- liveness & exit reporting ---------------------------------------------------------

    def _dead_reason(self, rec: _Record, children: _Children | None) -> str | None:
        """Why a running session is no longer running, or None if it still is (sync)."""
        if children is not None:
            code = children.xvnc.poll()
            if code is not None:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                return f"display server {how}"
            if children.app is not None:
                code = children.app.poll()
                if code is not None:
                    return self._app_exit_reason(rec, f"code {code}")
            return None
        if not _is_our_xvnc(rec.xvnc_pid, rec.xvnc_start, rec.display):
            return "display server exited"
        if not _alive(rec.app_pid, rec.app_start):
            return self._app_exit_reason(rec, "unknown code")
        return None

    def _app_exit_reason(self, rec: _Record, code: str) -> str:
        tail = _tail(self.run_dir(rec.session_id) / "app.stderr.log", lines=3)
        reason = f"app exited with {code}"
        return f"{reason}: {tail}" if tail else reason

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
            children = self._children.get(session_id)
            reason = await asyncio.to_thread(self._dead_reason, rec, children)
            if reason is None:
                return
            self._children.pop(session_id, None)
            await self._teardown(rec, children, remove_run_dir=False)
            rec.state = "exited"
            rec.reason = reason
            rec.clear_processes()
            await self._save(rec)
        log.warning("session_exited session_id=%s reason=%r", session_id, reason)
        if self.on_exit is not None:
            task = asyncio.create_task(self._notify(session_id, reason))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _notify(self, session_id: str, reason: str) -> None:
        assert self.on_exit is not None
        try:
            await self.on_exit(session_id, reason)
        except Exception:
            log.exception("on_exit_callback_failed session_id=%s", session_id)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for session_id in list(self._records):
                try:
                    await self._check(session_id)
                except Exception:
                    log.exception("monitor_check_failed session_id=%s", session_id)

    # ---- teardown -------------------------------------------------------------------------

    async def _teardown(
        self, rec: _Record, children: _Children | None, *, remove_run_dir: bool = True
    ) -> None:
        await self._kill(rec.session_id, rec, children)
        if rec.display is not None:
            await asyncio.to_thread(_cleanup_display, rec.display, rec.xvnc_pid)
        if remove_run_dir:
            await asyncio.to_thread(shutil.rmtree, self.run_dir(rec.session_id), True)

    async def _kill(self, session_id: str, rec: _Record | None, children: _Children | None) -> None:
        """Terminate every process of the session, children before their parents.

        Signalling leaves first lets each parent reap its own children (the reaper and the
        sandbox's bwrap layers unwind by themselves), so nothing is orphaned to an init that
        might not reap. Xvnc goes last so apps can still save state with their display up. A
        parent whose children ignore SIGTERM is signalled after a short patience, and whatever
        survives `stop_timeout` gets SIGKILL.
        """
        own = [] if children is None else [p for p in (children.app, children.xvnc) if p]
        xvnc_pid = children.xvnc.pid if children else rec.xvnc_pid if rec else None

        def leaders() -> list[int]:
            """Group leaders verified to be ours; only their groups may be signalled whole."""
            pids = [p.pid for p in own if p.poll() is None]
            if children is None and rec is not None:
                pids += [
                    pid
                    for pid, start in ((rec.app_pid, rec.app_start), (rec.xvnc_pid, rec.xvnc_start))
                    if pid is not None and _alive(pid, start)
                ]
            return pids

        def snapshot() -> dict[int, int]:
            for proc in own:
                proc.poll()  # reap our direct children as soon as they exit
            return _session_processes(session_id, leaders())

        signaled: set[int] = set()
        last_signal = 0.0
        deadline = time.monotonic() + self.stop_timeout
        while tree := await asyncio.to_thread(snapshot):
            now = time.monotonic()
            if now >= deadline:
                break
            kids: dict[int, set[int]] = {pid: set() for pid in tree}
            for pid, ppid in tree.items():
                if ppid in kids:
                    kids[ppid].add(pid)
            if xvnc_pid in kids:
                kids[xvnc_pid] |= set(tree) - {xvnc_pid}
            patient = now - last_signal < 0.3
            batch = [
                pid
                for pid in tree
                if pid not in signaled
                and (not kids[pid] or (not patient and kids[pid] <= signaled))
            ]
            for pid in batch:
                _signal(pid, signal.SIGTERM)
            if batch:
                signaled.update(batch)
                last_signal = now
            await asyncio.sleep(0.05)
        else:
            return

        log.warning("session_kill_escalated session_id=%s", session_id)
        deadline = time.monotonic() + 2.0
        while tree := await asyncio.to_thread(snapshot):
            if time.monotonic() >= deadline:
                log.error("session_processes_survived session_id=%s pids=%s", session_id, tree)
                return
            for pgid in await asyncio.to_thread(leaders):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            for pid in tree:
                _signal(pid, signal.SIGKILL)
            await asyncio.sleep(0.05)

    # ---- persistence ----------------------------------------------------------------------

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    def _record_path(self, session_id: str) -> Path:
        return self._sessions / f"{session_id}.json"

    async def _save(self, rec: _Record) -> None:
        rec.updated_at = time.time()
        await asyncio.to_thread(_write_json_atomic, self._record_path(rec.session_id), asdict(rec))

    def _load_records(self) -> None:
        for path in sorted(self._sessions.glob("*.json")):
            try:
                rec = _Record.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, BackendError) as exc:
                log.warning("session_record_unreadable path=%s error=%s", path, exc)
                continue
            self._records[rec.session_id] = rec
            log.info(
                "session_adopted session_id=%s state=%s display=:%s port=%s",
                rec.session_id,
                rec.state,
                rec.display,
                rec.port,
            )
