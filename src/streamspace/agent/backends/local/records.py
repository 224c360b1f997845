"""What the local backend remembers about each session, one JSON file (0600) per session.

A record is written *before* the session's processes are spawned (state "starting") and again
with their pids right after, so an agent killed in the middle of a start finds the leftovers
on its next start and removes them instead of leaving a second display server behind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from streamspace import logs
from streamspace.agent.backends.local.homes import check_name
from streamspace.protocol import Endpoint, InventoryItem, IsolationMode

__all__ = ["RecordState", "RecordStore", "SessionRecord"]

log = logs.get_logger("streamspace.agent.local")

RecordState = Literal["starting", "running", "hibernated", "exited"]
_STATES = ("starting", "running", "hibernated", "exited")


@dataclass
class SessionRecord:
    session_id: str
    user: str
    user_id: str
    template: str
    state: RecordState
    home: str
    persistent_home: bool
    spec: dict[str, Any]
    mode: IsolationMode
    uid: int
    gid: int
    run_dir: str
    display: int | None = None
    pid: int | None = None
    """The process the agent spawned (the outer bwrap, or tini when unsandboxed)."""
    pid_start: float | None = None
    init_pid: int | None = None
    """PID 1 of the sandbox (tini); killing it ends every process of the session."""
    init_start: float | None = None
    reason: str = ""
    started_at: float | None = None
    updated_at: float = field(default_factory=time.time)

    @property
    def made_socket(self) -> Path:
        """Where Xvnc creates its socket: the runtime dir the session user can write."""
        return Path(self.run_dir) / "session" / "vnc.sock"

    @property
    def rfb_socket(self) -> Path:
        """Where the agent keeps it once the session is up: a directory only the agent uses."""
        return Path(self.run_dir) / "vnc.sock"

    @property
    def audio_socket(self) -> Path:
        """The session's PulseAudio socket (PULSE_SERVER), in the session user's runtime dir:
        opened only through `vnc.socket_handle`, which refuses anything but a socket of the
        session's uid."""
        return Path(self.run_dir) / "session" / "xdg" / "pulse" / "native"

    def endpoint(self) -> Endpoint | None:
        if self.state != "running":
            return None
        return Endpoint(unix_path=str(self.rfb_socket))

    def item(self) -> InventoryItem:
        state = "running" if self.state == "starting" else self.state
        return InventoryItem(
            session_id=self.session_id,
            state=state,
            endpoint=self.endpoint(),
            user=self.user,
            template=self.template,
        )

    def clear_processes(self) -> None:
        self.display = self.pid = self.pid_start = self.init_pid = self.init_start = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionRecord:
        names = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in data.items() if k in names})
        if rec.state not in _STATES:
            raise ValueError(f"unknown state {rec.state!r}")
        check_name("session id", rec.session_id)
        return rec


class RecordStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)

    def path(self, session_id: str) -> Path:
        return self.directory / f"{session_id}.json"

    def save(self, rec: SessionRecord) -> None:
        rec.updated_at = time.time()
        target = self.path(rec.session_id)
        tmp = target.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(rec), fh, indent=2, sort_keys=True)
        os.replace(tmp, target)

    def delete(self, session_id: str) -> None:
        self.path(session_id).unlink(missing_ok=True)

    def load_all(self) -> list[SessionRecord]:
        found: list[SessionRecord] = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(SessionRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("session_record_unreadable", path=path, error=exc)
            except Exception as exc:  # BackendError from a bad id: skip the file, keep going
                log.warning("session_record_refused", path=path, error=exc)
        return found
