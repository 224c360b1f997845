"""Starting (and waking) a session: adopt it if it still runs, else check the host can run
it, record it, spawn it and wait until its display server answers RFB.

A start is all or nothing: whatever fails (or is cancelled) after the record was written tears
the half-made session down and deletes the record, so no second Xvnc is ever left behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

from streamspace import logs
from streamspace.agent import vnc
from streamspace.agent.backends.base import BackendError, rfb_answers
from streamspace.agent.backends.local import display as xdisplay
from streamspace.agent.backends.local.homes import HomeStore, check_name
from streamspace.agent.backends.local.identity import IdentityMap
from streamspace.agent.backends.local.isolation import IsolationPlan
from streamspace.agent.backends.local.logtail import exit_reason, tail
from streamspace.agent.backends.local.monitor import dead_reason
from streamspace.agent.backends.local.records import RecordStore, SessionRecord
from streamspace.agent.backends.local.sandbox import SANDBOX_DISPLAY
from streamspace.agent.backends.local.spawn import (
    Spawner,
    check_visible_in_sandbox,
    take_socket,
)
from streamspace.agent.backends.local.table import LocalSessions
from streamspace.agent.backends.local.teardown import Reaper
from streamspace.protocol import Endpoint, SessionSpec

log = logs.get_logger("streamspace.agent.local")


class Launcher:
    def __init__(
        self,
        *,
        sessions: LocalSessions,
        plan: IsolationPlan,
        homes: HomeStore,
        identities: IdentityMap,
        store: RecordStore,
        spawner: Spawner,
        reaper: Reaper,
        run_root: Path,
        display_base: int,
        start_timeout: float,
    ) -> None:
        self._sessions = sessions
        self._plan = plan
        self._homes = homes
        self._identities = identities
        self._store = store
        self._spawner = spawner
        self._reaper = reaper
        self._run_root = run_root
        self.display_base = display_base
        self.start_timeout = start_timeout
        self._alloc_lock = asyncio.Lock()
        self._reserved_displays: set[int] = set()

    def home_for(self, spec: SessionSpec) -> Path:
        check_name("session id", spec.session_id)
        if spec.persistent_home:
            return self._homes.persistent(spec.user_id, spec.template)
        return self._homes.scratch(spec.session_id)

    def run_dir(self, session_id: str) -> Path:
        return self._run_root / session_id

    def account(self, user_id: str) -> tuple[int, int]:
        """The uid/gid a user's sessions run as (blocking: may allocate and persist one)."""
        if self._plan.switches_uid:
            uid = self._identities.uid_for(user_id)
            return uid, uid
        return os.getuid(), os.getgid()

    async def ensure_running(self, spec: SessionSpec, action: str) -> Endpoint:
        session_id = spec.session_id
        home = self.home_for(spec)
        if spec.local is None:
            raise BackendError(f"template {spec.template!r} has no local launch command")
        async with self._sessions.lock(session_id):
            rec = self._sessions.records.get(session_id)
            if rec is not None and rec.state == "running":
                spawned = self._sessions.spawned.get(session_id)
                reason = await asyncio.to_thread(dead_reason, rec, spawned)
                endpoint = rec.endpoint()
                if reason is None and endpoint is not None:
                    return endpoint
                await self._reaper.teardown(rec)
            elif rec is not None and rec.state in ("exited", "starting"):
                await self._reaper.teardown(rec)
            started = time.monotonic()
            new = await self._launch(spec, home)
            self._sessions.stopped.discard(session_id)
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
        plan = self._plan
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
                await asyncio.to_thread(check_visible_in_sandbox, what, path)
        uid, gid = await asyncio.to_thread(self.account, spec.user_id)
        await asyncio.to_thread(self._homes.check_limit, home, spec.home_limit_mb)
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
        self._sessions.records[spec.session_id] = rec
        try:
            await asyncio.to_thread(self._spawner.prepare, rec, home)
            await asyncio.to_thread(self._store.save, rec)
            proc = await asyncio.to_thread(self._spawner.spawn, rec, spec, xvnc, home)
            self._sessions.spawned[spec.session_id] = proc
            await asyncio.to_thread(self._store.save, rec)
            await self._wait_ready(rec, proc)
            await asyncio.to_thread(take_socket, rec)
            rec.state = "running"
            rec.started_at = time.time()
            await asyncio.to_thread(self._store.save, rec)
            return rec
        except BaseException:
            await self._reaper.teardown(rec)
            self._sessions.records.pop(spec.session_id, None)
            await asyncio.to_thread(self._store.delete, spec.session_id)
            raise
        finally:
            self._reserved_displays.discard(display)

    async def _reserve_display(self) -> int:
        async with self._alloc_lock:
            taken = self._reserved_displays | {
                r.display for r in self._sessions.records.values() if r.display is not None
            }
            found = await asyncio.to_thread(xdisplay.free_display, self.display_base, taken)
            if found is None:
                raise BackendError("no free X display number on this host")
            self._reserved_displays.add(found)
            return found

    async def _wait_ready(self, rec: SessionRecord, proc: subprocess.Popen[bytes]) -> None:
        """Until Xvnc answers RFB on its socket; fails fast if the session ends first."""
        deadline = time.monotonic() + self.start_timeout
        log_path = Path(rec.run_dir) / "session.log"
        while True:
            if proc.poll() is not None:
                reason = await asyncio.to_thread(exit_reason, Path(rec.run_dir))
                last = await asyncio.to_thread(tail, log_path, 5)
                raise BackendError(f"the session ended during startup ({reason}): {last}")
            if await _rfb_answers(rec):
                return
            if time.monotonic() > deadline:
                last = await asyncio.to_thread(tail, log_path)
                raise BackendError(
                    f"the display server did not come up within {self.start_timeout:.0f}s: {last}"
                )
            await asyncio.sleep(0.05)


async def _rfb_answers(rec: SessionRecord) -> bool:
    try:
        with vnc.socket_handle(rec.made_socket, owner=rec.uid) as path:
            return await rfb_answers(unix_path=path)
    except OSError:  # not there (yet), or not a socket of the session's
        return False
