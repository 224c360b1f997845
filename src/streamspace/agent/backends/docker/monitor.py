"""Sessions whose container stopped without the agent asking (the app exited, out of memory,
someone removed it): found by polling, reported with the reason through a callback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from docker.models.containers import Container

from streamspace import logs
from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.docker.containers import Containers, session_of
from streamspace.agent.backends.docker.engine import RUNNING, Engine, state_of

log = logs.get_logger("streamspace.agent.docker")

LogsTail = Callable[[Container, int], Awaitable[str]]


class ExitMonitor:
    """Only sessions seen running are reported, and never while start/stop/hibernate holds the
    session's lock: those change its container on purpose."""

    def __init__(
        self,
        *,
        engine: Engine,
        containers: Containers,
        lock: Callable[[str], asyncio.Lock],
        logs_tail: LogsTail,
        notify: Callable[[str, str], Coroutine[Any, Any, None]],
        poll_interval: float,
    ) -> None:
        self._engine = engine
        self._containers = containers
        self._lock = lock
        self._logs_tail = logs_tail
        self._notify = notify
        self.poll_interval = poll_interval
        self._seen_running: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()

    def saw_running(self, session_id: str) -> None:
        self._seen_running.add(session_id)

    def forget(self, session_id: str) -> None:
        """The agent itself is stopping or hibernating the session: not an exit to report."""
        self._seen_running.discard(session_id)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="docker-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._callbacks:
            await asyncio.gather(*self._callbacks, return_exceptions=True)

    async def _loop(self) -> None:
        with contextlib.suppress(BackendError):
            await self._engine.refresh_images()
        while True:
            try:
                await self._check_all()
            except BackendError as exc:
                log.warning("monitor_engine_unreachable", error=exc)
            except Exception:
                log.exception("monitor_check_failed")
            await asyncio.sleep(self.poll_interval)

    async def _check_all(self) -> None:
        containers = {
            session_of(c.attrs): c for c in await self._containers.all() if session_of(c.attrs)
        }
        for session_id, container in containers.items():
            if state_of(container.attrs) in RUNNING and not self._lock(session_id).locked():
                self._seen_running.add(session_id)
        for session_id in list(self._seen_running):
            lock = self._lock(session_id)
            if lock.locked():
                continue  # start/stop/hibernate owns the session right now
            listed = containers.get(session_id)
            if listed is not None and state_of(listed.attrs) in RUNNING:
                continue
            async with lock:
                if session_id not in self._seen_running:
                    continue
                found = await self._containers.find(session_id)
                if found and state_of(found[0].attrs) in RUNNING:
                    continue
                self._seen_running.discard(session_id)
                reason = await self._exit_reason(found[0] if found else None)
            log.warning("session_exited", session_id=session_id, reason=reason)
            task = asyncio.create_task(self._notify(session_id, reason))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _exit_reason(self, container: Container | None) -> str:
        if container is None:
            return "session container was removed"
        try:
            if not await self._engine.call(self._engine.reload, container):
                return "session container was removed"
        except BackendError:
            return "session container state unavailable (engine unreachable)"
        state = container.attrs.get("State") or {}
        if state.get("OOMKilled"):
            return "app was killed: out of memory"
        reason = f"app exited with code {state.get('ExitCode')}"
        tail = await self._logs_tail(container, 3)
        return f"{reason}: {tail}" if tail and tail != "(no output)" else reason
