"""The agent's enrolled identity on disk (`<state_dir>/agent.json`).

The credential is the only secret an agent holds, so the file is written owner-only (0600) and
replaced atomically: a crash mid-write must never leave a truncated file that would force a
re-enrolment (join tokens are single-use and short-lived). A file or state dir left readable by
an older version is tightened when it is loaded.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from streamspace.private_files import PRIVATE_DIR, PRIVATE_FILE, private_dir, tighten
from streamspace.protocol import BackendKind

STATE_FILE_NAME = "agent.json"


class StateError(Exception):
    """The state file exists but cannot be used; the message says how to recover."""


class AgentState(BaseModel):
    """What enrolment produced plus the context it was produced in (to detect moved configs)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    agent_id: str
    credential: str
    server: str
    cluster_id: str
    cluster_name: str
    region: str = ""
    backend: BackendKind
    name: str

    def __repr__(self) -> str:
        # Keep the credential out of logs and tracebacks.
        return f"AgentState(agent_id={self.agent_id!r}, server={self.server!r})"

    __str__ = __repr__


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE_NAME


def load_state(state_dir: Path) -> AgentState | None:
    """The stored identity, or None if this agent was never enrolled here."""
    path = state_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    tighten(path, PRIVATE_FILE)
    tighten(state_dir, PRIVATE_DIR)
    try:
        return AgentState.model_validate_json(raw)
    except ValidationError as exc:
        raise StateError(
            f"{path} is not a valid agent state file ({exc.error_count()} problem(s)); "
            "remove it and enrol again with a new join token"
        ) from exc


def save_state(state_dir: Path, state: AgentState) -> Path:
    """Write owner-only and atomically (temp file + rename) so the credential never leaks."""
    private_dir(state_dir)
    path = state_path(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = state.model_dump_json(indent=2).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, PRIVATE_FILE)  # a leftover tmp file kept its old mode; be explicit
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path
