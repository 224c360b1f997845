"""Sessions whose processes ended without the agent asking: noticed by a poll loop (and by
status()/inventory()), marked "exited" with the reason, and reported once."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

from streamspace import logs
from streamspace.agent.backends.base import ExitCallback
from streamspace.agent.backends.local import processes
from streamspace.agent.backends.local.logtail import exit_reason, trim_logs
from streamspace.agent.backends.local.records import RecordStore, SessionRecord
from streamspace.agent.backends.local.table import LocalSessions
from streamspace.agent.backends.local.teardown import Reaper

log = logs.get_logger("streamspace.agent.local")


def dead_reason(rec: SessionRecord, spawned: subprocess.Popen[bytes] | None) -> str | None:
    """Why a running session is no longer running, or None if it still is (blocking)."""
    if spawned is not None and spawned.poll() is not None:
        return exit_reason(Path(rec.run_dir))
    if not processes.alive(rec.init_pid, rec.init_start):
        return exit_reason(Path(rec.run_dir))
    return None


class ExitMonitor:
    def __init__(
        self,
        *,
        sessions: LocalSessions,
        store: RecordStore,
        reaper: Reaper,
        poll_interval: float,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._reaper = reaper
        self.poll_interval = poll_interval
        self._on_exit: ExitCallback | None = None
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()

    def watch(self, on_exit: ExitCallback) -> None:
        """Report exits through `on_exit` from now on, and poll for them (idempotent)."""
        self._on_exit = on_exit
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="local-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._callbacks:
            # Give in-flight exit reports a moment to reach the control plane, not forever.
            _, pending = await asyncio.wait(self._callbacks, timeout=5.0)
            for task in pending:
                task.cancel()

    async def check(self, session_id: str) -> None:
        """Turn a running session whose processes died into 'exited' and report it once."""
        rec = self._sessions.records.get(session_id)
        if rec is None or rec.state != "running":
            return
        lock = self._sessions.lock(session_id)
        if lock.locked():
            return  # start/stop/hibernate in progress owns the session right now
        async with lock:
            rec = self._sessions.records.get(session_id)
            if rec is None or rec.state != "running":
                return
            spawned = self._sessions.spawned.get(session_id)
            reason = await asyncio.to_thread(dead_reason, rec, spawned)
            if reason is None:
                await asyncio.to_thread(trim_logs, rec)
                return
            await self._reaper.teardown(rec, remove_run_dir=False)
            rec.state = "exited"
            rec.reason = reason
            rec.clear_processes()
            await asyncio.to_thread(self._store.save, rec)
        log.warning("session_exited", session_id=session_id, reason=reason)
        if self._on_exit is not None:
            task = asyncio.create_task(self._notify(self._on_exit, session_id, reason))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _notify(self, on_exit: ExitCallback, session_id: str, reason: str) -> None:
        try:
            await on_exit(session_id, reason)
        except Exception:
            log.exception("on_exit_callback_failed", session_id=session_id)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for session_id in list(self._sessions.records):
                try:
                    await self.check(session_id)
                except Exception:
                    log.exception("monitor_check_failed", session_id=session_id)
