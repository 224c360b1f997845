"""What the agent reads of a session's logs: the reason it ended, and a bound on their size.

`run/<id>/session.log` is the agent's own (the sandbox's stdout and stderr); the app's log is
in the session's runtime dir, which the session user can write, so it is read without ever
following a symlink planted there.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from streamspace import logs
from streamspace.agent.backends.local.records import SessionRecord

log = logs.get_logger("streamspace.agent.local")

_REASON_RE = re.compile(r"^streamspace-init: reason=(.*)$", re.MULTILINE)
_LOG_LIMIT = 4 * 1024 * 1024


def tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - 8192, 0))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


def untrusted_tail(path: Path, lines: int) -> str:
    """The tail of a file the session user controls: never follow a symlink planted there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        fh.seek(0, os.SEEK_END)
        fh.seek(max(fh.tell() - 4096, 0))
        data = fh.read()
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


def exit_reason(run_dir: Path) -> str:
    """The init script's last reason line, with the app's last stderr line for app exits."""
    reasons = _REASON_RE.findall(tail(run_dir / "session.log", lines=200))
    reason = str(reasons[-1]).strip()[:300] if reasons else "the session's processes exited"
    if reason.startswith("app "):
        last = untrusted_tail(run_dir / "session" / "app.log", lines=1)[:300]
        if last:
            reason = f"{reason}: {last}"
    return reason


def trim_logs(rec: SessionRecord) -> None:
    """A session can write to its logs without bound; keep them from filling the disk."""
    for path in (Path(rec.run_dir) / "session.log", Path(rec.run_dir) / "session" / "app.log"):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size > _LOG_LIMIT:
                    os.ftruncate(fd, 0)
                    log.warning("session_log_truncated", session_id=rec.session_id)
            finally:
                os.close(fd)
