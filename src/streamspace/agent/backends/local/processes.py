"""Process inspection through psutil (blocking: call through asyncio.to_thread).

A process is "ours" only if both its pid and its start time match what was recorded, so a
recycled pid is never mistaken for a session's; zombies count as gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

from streamspace.agent.backends.local.sandbox import SESSION_ENV_MARKER

__all__ = ["alive", "kill_marked", "marked_processes", "start_time"]


def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def alive(pid: int | None, started: float | None) -> bool:
    """Without a start time a pid cannot be told from a recycled one: it counts as gone."""
    if pid is None or started is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        return proc.create_time() == started
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def marked_processes(session_id: str) -> list[int]:
    """Live processes whose environment carries the session's marker."""
    found: list[int] = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(SESSION_ENV_MARKER) == session_id:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_marked(session_id: str, grace: float) -> list[int]:
    """SIGTERM every marked process, SIGKILL what survives `grace` seconds; survivors' pids."""
    pids = marked_processes(session_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = marked_processes(session_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        time.sleep(0.1)
    return marked_processes(session_id)
