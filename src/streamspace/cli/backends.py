"""The backend an agent runs sessions with, built from its name and the settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from streamspace.cli.base import err, fail
from streamspace.config import Settings


def build_backend(
    backend: str, settings: Settings, state_dir: Path, docker_host: str | None = None
) -> Any:
    """The one place a backend name becomes a backend; `agent --backend` and `up` both ask here."""
    be: Any
    if backend == "local":
        be = local_backend(settings, state_dir)
    elif backend == "docker":
        from streamspace.agent.backends.docker import DockerBackend

        be = DockerBackend(
            base_url=docker_host or os.environ.get("DOCKER_HOST"),
            agent_id=_backend_label_id(state_dir),
            state_dir=state_dir,
        )
    else:
        fail(f"unknown backend {backend!r}; use local or docker")
    return be


def local_backend(settings: Settings, state_dir: Path) -> Any:
    from streamspace.agent.backends.local import LocalBackend
    from streamspace.agent.backends.local.identity import parse_uid_range

    try:
        uid_range = parse_uid_range(settings.local_uid_range)
    except ValueError as exc:
        fail(f"STREAMSPACE_LOCAL_UID_RANGE: {exc}")
    if settings.local_insecure_shared_user:
        err.print(
            "[bold red]WARNING:[/] --insecure-shared-user: sessions run as this user, "
            "unsandboxed; anyone who can start a session can read everything this user can"
        )
    return LocalBackend(
        state_dir=state_dir,
        insecure_shared_user=settings.local_insecure_shared_user,
        uid_range=uid_range,
        enforce_limits=settings.local_enforce_limits,
    )


def _backend_label_id(state_dir: Path) -> str:
    """A stable id for labelling this agent's containers, made once per state dir.

    The agent id is only known after enrolment; containers must be findable across restarts
    from the first start on, so the label uses an id of the state dir itself.
    """
    import uuid

    from streamspace.private_files import create_private_file, private_dir

    path = state_dir / "backend-id"
    if path.exists():
        return path.read_text().strip()
    private_dir(state_dir)
    value = uuid.uuid4().hex
    create_private_file(path)
    path.write_text(value)
    return value
