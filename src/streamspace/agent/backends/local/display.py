"""X display numbers and cookies (blocking helpers, called in threads).

Sandboxed sessions each have a private /tmp, so all of them use display :1 and nothing here
is needed for them but the cookie. Unsandboxed sessions share the host's /tmp/.X11-unix and
need a display number no other X server holds.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import psutil

__all__ = ["cleanup_display", "free_display", "write_xauthority"]

_X_UNIX_DIR = Path("/tmp/.X11-unix")
_RANGE = 1000


def write_xauthority(path: Path, display: int, cookie: bytes) -> None:
    """One FamilyWild entry: the address is ignored, so it works inside a UTS namespace."""

    def field(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    entry = (
        struct.pack(">H", 0xFFFF)
        + field(b"")
        + field(str(display).encode())
        + field(b"MIT-MAGIC-COOKIE-1")
        + field(cookie)
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(entry)


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


def free_display(base: int, taken: Iterable[int]) -> int | None:
    """The first display number from `base` no X server on the host uses."""
    exclude = set(taken)
    abstract = _abstract_x_sockets()
    return next(
        (n for n in range(base, base + _RANGE) if n not in exclude and _display_free(n, abstract)),
        None,
    )


def cleanup_display(display: int) -> None:
    """Remove the lock and socket an unsandboxed Xvnc left, unless a live server holds them."""
    lock = Path(f"/tmp/.X{display}-lock")
    try:
        owner = int(lock.read_text().strip())
    except (OSError, ValueError):
        owner = None
    if owner is not None and psutil.pid_exists(owner):
        with contextlib.suppress(psutil.Error):
            if psutil.Process(owner).status() != psutil.STATUS_ZOMBIE:
                return
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()
    with contextlib.suppress(FileNotFoundError):
        (_X_UNIX_DIR / f"X{display}").unlink()
