"""Persistent homes: named volumes, handed only to the user and template their labels name, and
the one-time mapping of v1 volumes (named after user names) to the ids those names have now.

Volume labels cannot change, so the mapping is kept in the agent's state dir
(`legacy-volumes.json`); a v1 volume whose name no user has is recorded as orphaned
(`orphaned-volumes.json`) and never offered again. Nothing is deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import docker.errors

from streamspace import logs
from streamspace.agent.backends.base import BackendError
from streamspace.agent.backends.docker.engine import Engine
from streamspace.agent.backends.docker.spec import (
    CONTAINER_HOME,
    ID_RE,
    OWNER_ID_LABEL,
    OWNER_LABEL,
    TEMPLATE_LABEL,
    home_volume_for,
    legacy_home_volume_name,
    legacy_key,
)
from streamspace.agent.homeusage import HomeUsage
from streamspace.protocol import SessionSpec

log = logs.get_logger("streamspace.agent.docker")


def _write_state(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


class Homes:
    def __init__(self, *, engine: Engine, state_dir: Path, usage: HomeUsage) -> None:
        self._engine = engine
        self._usage = usage
        self._legacy_path = state_dir / "legacy-volumes.json"
        self._legacy: dict[str, str] = self._load_legacy()
        """Migrated v1 home volumes: "<user id>_<template>" -> the v1 volume name."""
        self._orphaned_path = state_dir / "orphaned-volumes.json"
        self._orphaned: set[str] = self._load_orphaned()
        """v1 home volumes whose owner name no user had when they were to be migrated."""

    def _load_legacy(self) -> dict[str, str]:
        try:
            data = json.loads(self._legacy_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _load_orphaned(self) -> set[str]:
        try:
            data = json.loads(self._orphaned_path.read_text())
        except (OSError, ValueError):
            return set()
        return {str(v) for v in data} if isinstance(data, list) else set()

    async def prepare(self, spec: SessionSpec) -> str | None:
        """The session's home volume, created or checked to be this user's and under its size
        limit; None without a persistent home."""
        volume = home_volume_for(spec, self._legacy)
        if volume is None:
            return None
        await self._engine.call(self._ensure_volume, volume, spec)
        where = await self._engine.call(self._volume_path, volume)
        if where is not None:
            await asyncio.to_thread(self._usage.check, volume, where, spec.home_limit_mb)
        return volume

    async def measure(self, attrs: dict[str, Any]) -> None:
        """Record the size of the home a container mounts, where the volume is on this host."""
        mounts = (attrs or {}).get("Mounts") or []
        for mount in mounts:
            if mount.get("Destination") == CONTAINER_HOME and mount.get("Name"):
                where = await self._engine.call(self._volume_path, mount["Name"])
                if where is not None:
                    await asyncio.to_thread(self._usage.measure, mount["Name"], where)

    async def home_dir(self, attrs: dict[str, Any]) -> Path | None:
        """The host directory of the home volume a container mounts, if on this host."""
        for mount in (attrs or {}).get("Mounts") or []:
            if mount.get("Destination") == CONTAINER_HOME and mount.get("Name"):
                where: Path | None = await self._engine.call(self._volume_path, mount["Name"])
                return where
        return None

    def _volume_path(self, name: str) -> Path | None:
        """The volume's directory if the agent can read it (the engine runs on this host)."""
        try:
            volume = self._engine.client().volumes.get(name)
        except docker.errors.NotFound:
            return None
        mountpoint = (volume.attrs or {}).get("Mountpoint")
        path = Path(mountpoint) if mountpoint else None
        return path if path is not None and os.access(path, os.R_OK | os.X_OK) else None

    def _ensure_volume(self, name: str, spec: SessionSpec) -> None:
        """Create the home volume, or check that the existing one is this user's for this
        template: a volume is never handed to someone its labels do not name."""
        volumes = self._engine.client().volumes
        try:
            volume = volumes.get(name)
        except docker.errors.NotFound:
            volumes.create(
                name,
                labels={
                    OWNER_LABEL: spec.user,
                    OWNER_ID_LABEL: spec.user_id,
                    TEMPLATE_LABEL: spec.template,
                },
            )
            return
        labels = (volume.attrs or {}).get("Labels") or {}
        legacy = self._legacy.get(legacy_key(spec.user_id, spec.template)) == name
        owner_ok = labels.get(OWNER_ID_LABEL) == spec.user_id or (
            legacy and OWNER_ID_LABEL not in labels
        )
        if not owner_ok or labels.get(TEMPLATE_LABEL) != spec.template:
            raise BackendError(
                f"home volume {name} exists but is not labelled for this user and template; "
                "refusing to mount someone else's files"
            )

    # ---- v1 home volumes ------------------------------------------------------------------

    def _legacy_volumes_sync(self) -> list[tuple[str, str, str]]:
        """(volume, owner name, template) of v1 home volumes not yet mapped to an id."""
        mapped = set(self._legacy.values()) | self._orphaned
        found = []
        for volume in self._engine.client().volumes.list(filters={"label": OWNER_LABEL}):
            labels = (volume.attrs or {}).get("Labels") or {}
            if OWNER_ID_LABEL in labels or volume.name in mapped:
                continue
            owner, template = labels.get(OWNER_LABEL, ""), labels.get(TEMPLATE_LABEL, "")
            if owner and template and volume.name == legacy_home_volume_name(owner, template):
                found.append((volume.name, owner, template))
        return found

    async def legacy_names(self) -> list[str]:
        try:
            found = await self._engine.call(self._legacy_volumes_sync)
        except BackendError:
            return []
        return sorted({owner for _, owner, _ in found})

    async def migrate(self, owners: dict[str, str]) -> dict[str, str]:
        """Map v1 volumes (named after user names) to the ids those names have now; volumes
        of names no user has stay where they are, unmounted, recorded as orphaned."""
        moved: dict[str, str] = {}
        orphaned: set[str] = set()
        for volume, owner, template in await self._engine.call(self._legacy_volumes_sync):
            user_id = owners.get(owner)
            if user_id is None:
                orphaned.add(volume)
                log.warning("home_volume_orphaned", volume=volume, owner=owner)
                continue
            if not ID_RE.fullmatch(user_id):
                log.warning("home_volume_bad_owner_id", volume=volume, owner=owner)
                continue
            self._legacy.setdefault(legacy_key(user_id, template), volume)
            moved[volume] = user_id
            log.event("home_volume_migrated", volume=volume, owner=owner, user_id=user_id)
        if moved:
            await asyncio.to_thread(_write_state, self._legacy_path, self._legacy)
        if orphaned:
            self._orphaned |= orphaned
            await asyncio.to_thread(_write_state, self._orphaned_path, sorted(self._orphaned))
        return moved
