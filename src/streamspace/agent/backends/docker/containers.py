"""This agent's containers on the engine and their sockets: which container is which session
(labels, or the `ss-<id>` name), what the inventory says of it, where its VNC socket lives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from docker.models.containers import Container

from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.docker.engine import Engine, labels_of, run_state, state_of
from streamspace.agent.backends.docker.spec import (
    AGENT_LABEL,
    CONTAINER_USER,
    OWNER_LABEL,
    PULSE_SOCKET_NAME,
    SESSION_ID_RE,
    SESSION_LABEL,
    TEMPLATE_LABEL,
    VNC_SOCKET_NAME,
)
from streamspace.protocol import Endpoint, InventoryItem


def session_of(attrs: dict[str, Any]) -> str:
    session_id = labels_of(attrs).get(SESSION_LABEL, "")
    if session_id:
        return session_id
    names = attrs.get("Names") or [attrs.get("Name") or ""]
    name = str(names[0]).lstrip("/")
    return name[3:] if name.startswith("ss-") else name


class Containers:
    """`run_root` (0700, in the agent's state dir) holds one socket directory per session."""

    def __init__(self, *, engine: Engine, agent_id: str, run_root: Path) -> None:
        self._engine = engine
        self._agent_id = agent_id
        self._run_root = run_root

    async def all(self) -> list[Container]:
        labels = [f"{AGENT_LABEL}={self._agent_id}"]
        result: list[Container] = await self._engine.call(self._engine.list_containers, labels)
        return result

    async def find(self, session_id: str) -> list[Container]:
        """This agent's containers for one session (normally zero or one), inspected."""
        labels = [f"{AGENT_LABEL}={self._agent_id}", f"{SESSION_LABEL}={session_id}"]
        listed: list[Container] = await self._engine.call(self._engine.list_containers, labels)
        return [c for c in listed if await self._engine.call(self._engine.reload, c)]

    def item(self, attrs: dict[str, Any], session_id: str | None = None) -> InventoryItem:
        labels = labels_of(attrs)
        state = run_state(state_of(attrs))
        sid = session_id or session_of(attrs)
        endpoint = (
            Endpoint(unix_path=str(self.socket(sid)))
            if state == "running" and SESSION_ID_RE.fullmatch(sid)
            else None
        )
        return InventoryItem(
            session_id=sid,
            state=state,
            endpoint=endpoint,
            user=labels.get(OWNER_LABEL),
            template=labels.get(TEMPLATE_LABEL),
        )

    def socket(self, session_id: str) -> Path:
        return self._run_root / session_id / VNC_SOCKET_NAME

    def audio_socket(self, session_id: str) -> Path:
        return self._run_root / session_id / PULSE_SOCKET_NAME

    def prepare_run_dir(self, session_id: str) -> Path:
        """The session's socket directory: a real directory owned by the container's uid."""
        uid, gid = (int(x) for x in CONTAINER_USER.split(":"))
        path = self._run_root / session_id
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        if path.is_symlink() or not path.is_dir():
            raise BackendError(f"{path} is not a directory")
        if os.geteuid() == 0:
            os.chown(path, uid, gid, follow_symlinks=False)
        path.chmod(0o700)
        return path

    async def remove_run_dir(self, session_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self._run_root / session_id, True)
