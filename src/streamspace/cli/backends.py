"""The backend an agent runs sessions with, built from its name and the settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from streamspace.cli.base import err, fail
from streamspace.config import Settings

if TYPE_CHECKING:
    from streamspace.agent.backends.base import Backend


def build_backend(
    backend: str, settings: Settings, state_dir: Path, docker_host: str | None = None
) -> Backend:
    """The one place a backend name becomes a backend; `agent --backend` and `up` both ask here.

    The agent's registry (agent/backends/registry.py) knows which names exist and how each is
    built; an unknown name or bad settings end the command with the registry's message.
    """
    from streamspace.agent.backends.base import BackendError, BackendOptions
    from streamspace.agent.backends.registry import create_backend

    options = BackendOptions(state_dir=state_dir, settings=settings, docker_host=docker_host)
    try:
        be = create_backend(backend, options)
    except BackendError as exc:
        fail(str(exc))
    if be.isolation().mode == "insecure-shared-user":
        err.print(
            "[bold red]WARNING:[/] --insecure-shared-user: sessions run as this user, "
            "unsandboxed; anyone who can start a session can read everything this user can"
        )
    return be
