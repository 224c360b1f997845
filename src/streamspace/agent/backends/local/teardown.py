"""Ending a session's processes, and adopting the sessions a previous agent left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time

from streamspace import logs
from streamspace.agent.backends.local import display as xdisplay
from streamspace.agent.backends.local import processes
from streamspace.agent.backends.local.limits import CgroupLimits
from streamspace.agent.backends.local.records import RecordStore, SessionRecord
from streamspace.agent.backends.local.table import LocalSessions

log = logs.get_logger("streamspace.agent.local")


class Reaper:
    def __init__(
        self, *, sessions: LocalSessions, limits: CgroupLimits | None, stop_timeout: float
    ) -> None:
        self._sessions = sessions
        self._limits = limits
        self.stop_timeout = stop_timeout

    async def teardown(self, rec: SessionRecord, *, remove_run_dir: bool = True) -> None:
        spawned = self._sessions.spawned.pop(rec.session_id, None)
        await asyncio.to_thread(self.kill, rec, spawned)
        if rec.display is not None and rec.mode == "insecure-shared-user":
            await asyncio.to_thread(xdisplay.cleanup_display, rec.display)
        if remove_run_dir:
            await asyncio.to_thread(shutil.rmtree, rec.run_dir, True)

    def kill(self, rec: SessionRecord, spawned: subprocess.Popen[bytes] | None) -> None:
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
                    spawned.poll()
                time.sleep(0.02)
            if processes.alive(rec.init_pid, rec.init_start):
                log.warning("session_kill_escalated", session_id=rec.session_id)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(rec.init_pid, signal.SIGKILL)
        if spawned is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spawned.wait(timeout=self.stop_timeout)
        elif processes.alive(rec.pid, rec.pid_start) and rec.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(rec.pid, signal.SIGKILL)
        if self._limits is not None:
            self._limits.kill(rec.session_id)
            self._limits.remove(rec.session_id)
        survivors = processes.kill_marked(rec.session_id, grace=1.0)
        if survivors:
            log.error("session_processes_survived", session_id=rec.session_id, pids=survivors)

    def adopt(self, store: RecordStore) -> None:
        """Take over the sessions recorded in the state dir (blocking, at construction). A
        start the previous agent died during is killed and marked exited: its half-made
        session must never become a second display server next to the one started again."""
        for rec in store.load_all():
            if rec.state == "starting":
                self.kill(rec, None)
                shutil.rmtree(rec.run_dir, ignore_errors=True)
                rec.state = "exited"
                rec.reason = "the agent restarted while the session was starting"
                rec.clear_processes()
                store.save(rec)
            self._sessions.records[rec.session_id] = rec
            log.event(
                "session_adopted", session_id=rec.session_id, state=rec.state, isolation=rec.mode
            )
