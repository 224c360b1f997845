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

`LocalBackend` is the coordinator: the sessions it holds are a `table.LocalSessions`, shared
with its parts: `launcher` (start and wake, readiness), `spawn` (directories and the sandbox
process), `monitor` (exits), `teardown` (killing a session, adopting a previous agent's) and
`logtail` (what the agent reads of a session's logs).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from streamspace import logs
from streamspace.agent import vnc
from streamspace.agent.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    ExitCallback,
    HomeAccess,
    SoundServer,
    VNCStream,
)
from streamspace.agent.backends.local import processes
from streamspace.agent.backends.local.homes import HomeStore
from streamspace.agent.backends.local.identity import (
    DEFAULT_UID_RANGE,
    IdentityMap,
    parse_uid_range,
)
from streamspace.agent.backends.local.isolation import IsolationPlan, plan_isolation
from streamspace.agent.backends.local.launcher import Launcher
from streamspace.agent.backends.local.limits import CgroupLimits, detect_limits
from streamspace.agent.backends.local.monitor import ExitMonitor
from streamspace.agent.backends.local.records import RecordStore
from streamspace.agent.backends.local.spawn import INIT_SCRIPT, Spawner
from streamspace.agent.backends.local.table import LocalSessions
from streamspace.agent.backends.local.teardown import Reaper
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
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        run_root = self.state_dir / "run"
        run_root.mkdir(mode=0o700, exist_ok=True)
        run_root.chmod(0o700)
        self.homes = HomeStore(self.state_dir)
        self.identities = IdentityMap(self.state_dir / "identities.json", uid_range)
        self._store = RecordStore(self.state_dir / "sessions")
        self.plan: IsolationPlan = plan_isolation(insecure_shared_user, uid_range[0])
        self.limits: CgroupLimits | None = None
        self._limits_detail = "limits not enforced: disabled by configuration"
        if enforce_limits:
            self.limits, self._limits_detail = detect_limits()
        self._sessions = LocalSessions()
        self._reaper = Reaper(
            sessions=self._sessions, limits=self.limits, stop_timeout=stop_timeout
        )
        self._launcher = Launcher(
            sessions=self._sessions,
            plan=self.plan,
            homes=self.homes,
            identities=self.identities,
            store=self._store,
            spawner=Spawner(
                plan=self.plan, limits=self.limits, homes=self.homes, start_timeout=start_timeout
            ),
            reaper=self._reaper,
            run_root=run_root,
            display_base=display_base,
            start_timeout=start_timeout,
        )
        self._monitor = ExitMonitor(
            sessions=self._sessions,
            store=self._store,
            reaper=self._reaper,
            poll_interval=poll_interval,
        )
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
        self._reaper.adopt(self._store)

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

    @property
    def poll_interval(self) -> float:
        """Seconds between the exit monitor's checks; may be changed while it runs."""
        return self._monitor.poll_interval

    @poll_interval.setter
    def poll_interval(self, value: float) -> None:
        self._monitor.poll_interval = value

    # ---- Backend API --------------------------------------------------------------------

    async def start(self, spec: SessionSpec) -> Endpoint:
        return await self._launcher.ensure_running(spec, action="start")

    async def wake(self, spec: SessionSpec) -> Endpoint:
        return await self._launcher.ensure_running(spec, action="wake")

    async def stop(self, session_id: str) -> None:
        records = self._sessions.records
        async with self._sessions.lock(session_id):
            rec = records.get(session_id)
            if rec is None:
                # No record, but a crashed start may still have left marked processes behind.
                await asyncio.to_thread(
                    processes.kill_marked, session_id, self._reaper.stop_timeout
                )
                self._sessions.stopped.add(session_id)
                return
            await self._reaper.teardown(rec)
            if not rec.persistent_home:
                await asyncio.to_thread(shutil.rmtree, rec.home, True)
            else:
                await asyncio.to_thread(self.homes.measure, Path(rec.home))
            await asyncio.to_thread(self._store.delete, session_id)
            del records[session_id]
            self._sessions.stopped.add(session_id)
        log.event("session_stopped", session_id=session_id)

    async def hibernate(self, session_id: str) -> None:
        async with self._sessions.lock(session_id):
            rec = self._sessions.records.get(session_id)
            if rec is None:
                raise BackendError(f"session {session_id} is not known to this agent")
            if rec.state == "hibernated":
                return
            await self._reaper.teardown(rec)
            rec.state = "hibernated"
            rec.reason = ""
            rec.clear_processes()
            await asyncio.to_thread(self._store.save, rec)
            await asyncio.to_thread(self.homes.measure, Path(rec.home))
        log.event("session_hibernated", session_id=session_id, home=rec.home)

    async def status(self, session_id: str) -> InventoryItem:
        records = self._sessions.records
        rec = records.get(session_id)
        if rec is None or rec.state == "starting":
            stopped = session_id in self._sessions.stopped
            state: SessionRunState = "stopped" if stopped else "unknown"
            return InventoryItem(session_id=session_id, state=state)
        await self._monitor.check(session_id)
        return records.get(session_id, rec).item()

    async def inventory(self) -> list[InventoryItem]:
        records = self._sessions.records
        for session_id in list(records):
            await self._monitor.check(session_id)
        return [
            rec.item()
            for rec in sorted(records.values(), key=lambda r: r.session_id)
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
        rec = self._sessions.records.get(session_id)
        if rec is None or rec.state != "running":
            raise BackendError(f"session {session_id} is not running on this agent")
        return await vnc.open_unix(rec.rfb_socket, connect_timeout, owner=rec.uid)

    async def home_access(self, session_id: str) -> HomeAccess:
        """The home directory on this host, as the uid the session runs as (running or
        hibernated: the home outlives the processes)."""
        rec = self._sessions.records.get(session_id)
        if rec is None or rec.state not in ("running", "hibernated"):
            raise BackendError(f"session {session_id} is not on this agent")
        return HomeAccess(root=Path(rec.home), uid=rec.uid, gid=rec.gid)

    async def open_audio(self, session_id: str) -> SoundServer:
        rec = self._sessions.records.get(session_id)
        if rec is None or rec.state != "running":
            raise BackendError(f"session {session_id} is not running on this agent")
        try:
            fd = await asyncio.to_thread(vnc.checked_socket_fd, rec.audio_socket, rec.uid)
        except FileNotFoundError:
            raise BackendError(
                "the session has no sound server (is pulseaudio installed on the agent's host?)"
            ) from None
        except OSError as exc:
            raise BackendError(f"cannot reach the session's sound server: {exc}") from exc
        return SoundServer(socket_fd=fd)

    async def close(self) -> None:
        """Stop watching; the sessions themselves keep running for the next agent."""
        await self._monitor.close()

    async def watch_exits(self, on_exit: ExitCallback) -> None:
        """Poll running sessions and report unexpected exits through `on_exit` (idempotent)."""
        self._monitor.watch(on_exit)

    async def remove_unknown(self, keep: set[str]) -> list[str]:
        """Also the sessions still starting, which the inventory leaves out."""
        removed = sorted(sid for sid in self._sessions.records if sid not in keep)
        for session_id in removed:
            await self.stop(session_id)
        return removed

    async def legacy_home_names(self) -> list[str]:
        """User names of homes from before homes were keyed by id (see homes.HomeStore)."""
        return await asyncio.to_thread(self.homes.legacy_names)

    async def migrate_homes(self, owners: dict[str, str]) -> dict[str, str]:
        """Move name-keyed homes to the ids the control plane says those names have now."""
        return await asyncio.to_thread(self.homes.migrate_legacy, owners, self._launcher.account)

    def home_for(self, spec: SessionSpec) -> Path:
        return self._launcher.home_for(spec)

    def run_dir(self, session_id: str) -> Path:
        return self._launcher.run_dir(session_id)
