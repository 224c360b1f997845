"""Looking at local sessions from the outside: their VNC sockets and processes.

Local sessions serve RFB on a Unix socket in the agent's state directory
(`run/<session>/vnc.sock`, moved there from the session's own runtime dir once Xvnc made it),
never on TCP. Tests connect there as root (the agent's user),
count the connections the session's Xvnc holds, and find every process of a session by its
environment marker, independently of the backend's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil

from streamspace.agent.backends.local import SESSION_ENV_MARKER
from streamspace_testing.rfb import RFBClient, TCPTransport


def vnc_socket(state_dir: Path, session_id: str) -> Path:
    return state_dir / "run" / session_id / "vnc.sock"


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A connectable name for a socket whose full path may exceed the 108-byte limit."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def open_direct(state_dir: Path, session_id: str) -> RFBClient:
    """An RFB client straight on the session's socket (bypassing the tunnel)."""
    with short_path(vnc_socket(state_dir, session_id)) as path:
        transport = await TCPTransport.connect_unix(path)
    return await RFBClient.over(transport)


def session_processes(session_id: str) -> list[psutil.Process]:
    """Live processes whose environment carries the session's marker."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(SESSION_ENV_MARKER) == session_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def session_pids(session_id: str) -> list[int]:
    return [p.pid for p in session_processes(session_id)]


def xvnc_processes(session_id: str) -> list[psutil.Process]:
    found = []
    for proc in session_processes(session_id):
        with contextlib.suppress(psutil.Error):
            if proc.name() == "Xvnc":
                found.append(proc)
    return found


def vnc_clients(session_id: str) -> int:
    """Connections the session's Xvnc has accepted on its RFB socket (listener excluded).

    An accepted Unix socket lives in its *client's* network namespace, and the session may have
    one of its own, so both namespaces' tables are read."""
    xvnc = xvnc_processes(session_id)
    if not xvnc:
        return 0
    pid = xvnc[0].pid
    inodes = _socket_inodes(pid)
    connected: set[str] = set()
    for table in (f"/proc/{pid}/net/unix", "/proc/self/net/unix"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if (
                len(parts) >= 8
                and parts[6] in inodes
                and parts[7].endswith("vnc.sock")
                and parts[5] == "03"
            ):
                connected.add(parts[6])
    return len(connected)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def tcp_listeners(pid: int) -> list[str]:
    """Local addresses of TCP sockets the process listens on, in its own network namespace."""
    inodes = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:
                    found.append(parts[1])
    return found


def in_session(session_id: str, *args: str, text: str | None = None) -> subprocess.Popen[bytes]:
    """Run an X client as the session's user on its display, in its mount namespace."""
    (xvnc,) = xvnc_processes(session_id)
    cmd = xvnc.cmdline()
    display = next(a for a in cmd if a.startswith(":"))
    auth = cmd[cmd.index("-auth") + 1]
    uid, gid = xvnc.uids().real, xvnc.gids().real
    proc = subprocess.Popen(
        ["nsenter", "-t", str(xvnc.pid), "-m", "--",
         "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
         "env", f"DISPLAY={display}", f"XAUTHORITY={auth}", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    if text is not None:
        assert proc.stdin is not None
        proc.stdin.write(text.encode())
        proc.stdin.close()
    return proc
