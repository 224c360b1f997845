"""Sessions whose pod ended without the agent asking (the app exited, out of memory, someone
deleted the pod): seen in the pod cache's events as they happen, reported through a callback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from streamspace import logs
from streamspace.agent.backends.kubernetes import podstate
from streamspace.agent.backends.kubernetes.objects import SESSION_ANNOTATION

log = logs.get_logger("streamspace.agent.kubernetes")


def session_of(obj: dict[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("annotations") or {}).get(SESSION_ANNOTATION, ""))


class PodExits:
    """Only sessions seen running are reported, never while start/stop/hibernate holds the
    session's lock, and never for a pod the agent deleted itself (`expect_gone`)."""

    def __init__(
        self,
        *,
        lock: Callable[[str], asyncio.Lock],
        notify: Callable[[str, str], Coroutine[Any, Any, None]],
    ) -> None:
        self._lock = lock
        self._notify = notify
        self.enabled = False
        self._seen_running: set[str] = set()
        self._expected_gone: set[str] = set()
        self._callbacks: set[asyncio.Task[None]] = set()

    def saw_running(self, session_id: str) -> None:
        self._seen_running.add(session_id)
        self._expected_gone.discard(session_id)

    def expect_gone(self, session_id: str) -> None:
        """The agent itself deletes the session's pod: not an exit to report."""
        self._seen_running.discard(session_id)
        self._expected_gone.add(session_id)

    def adopt(self, pods: list[dict[str, Any]]) -> None:
        """Sessions running when the monitor starts (an agent restart) are watched too."""
        for pod in pods:
            session_id = session_of(pod)
            if session_id and podstate.run_state(pod) == "running":
                self._seen_running.add(session_id)

    def on_event(self, kind: str, pod: dict[str, Any]) -> None:
        session_id = session_of(pod)
        if not self.enabled or not session_id or session_id in self._expected_gone:
            if kind == "DELETED":
                self._expected_gone.discard(session_id)
            return
        if self._lock(session_id).locked():
            return  # start/stop/hibernate owns the session right now
        if kind != "DELETED" and podstate.run_state(pod) == "running":
            if podstate.container_running(pod):
                self._seen_running.add(session_id)
            return
        if session_id not in self._seen_running:
            return
        self._seen_running.discard(session_id)
        if kind == "DELETED" or podstate.terminating(pod):
            reason = "session pod was deleted"
        else:
            reason = podstate.exit_reason(pod)
        log.warning("session_exited", session_id=session_id, reason=reason)
        task = asyncio.create_task(self._notify(session_id, reason))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def close(self) -> None:
        if self._callbacks:
            await asyncio.gather(*self._callbacks, return_exceptions=True)
