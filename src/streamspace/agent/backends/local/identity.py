"""Unix identities for StreamSpace users: one uid/gid per user *id*, stable across restarts.

Keyed by the immutable user id, never the name: a user deleted and re-created under the same
name gets a new id, so a new uid and a new, empty home. The map lives in the agent's state
directory (`identities.json`, 0600) and only grows; a uid is never handed to a second user.
Uids already used by host accounts (passwd or group database) are skipped.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import threading
from pathlib import Path

from streamspace.agent.backends.base import BackendError

__all__ = ["DEFAULT_UID_RANGE", "IdentityMap", "parse_uid_range"]

DEFAULT_UID_RANGE = (200000, 265535)


def parse_uid_range(text: str) -> tuple[int, int]:
    """`FIRST-LAST` (inclusive), both above the host's system and regular user ranges."""
    first_s, sep, last_s = text.partition("-")
    try:
        first, last = int(first_s), int(last_s)
    except ValueError:
        first = last = -1
    if not sep or first < 1000 or last < first or last >= 2**32 - 2:
        raise ValueError(f"uid range must look like 200000-265535, got {text!r}")
    return first, last


def _taken_on_host(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


class IdentityMap:
    """user id -> uid (the gid is the same number: a private group per user)."""

    def __init__(self, path: Path, uid_range: tuple[int, int] = DEFAULT_UID_RANGE) -> None:
        self.path = path
        self.first, self.last = uid_range
        self._lock = threading.Lock()
        self._uids: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BackendError(f"identity map {self.path} is unreadable: {exc}") from exc
        users = data.get("users", {}) if isinstance(data, dict) else {}
        return {str(k): int(v) for k, v in users.items()}

    def known(self, user_id: str) -> int | None:
        return self._uids.get(user_id)

    def uid_for(self, user_id: str) -> int:
        """The user's uid, allocating (and persisting) the next free one on first use.

        Blocking file I/O: call it from a worker thread."""
        with self._lock:
            uid = self._uids.get(user_id)
            if uid is not None:
                return uid
            used = set(self._uids.values())
            start = max(used, default=self.first - 1) + 1
            candidates = [*range(start, self.last + 1), *range(self.first, start)]
            uid = next((u for u in candidates if u not in used and not _taken_on_host(u)), None)
            if uid is None:
                raise BackendError(
                    f"no free uid left in {self.first}-{self.last} for a new user; "
                    "widen STREAMSPACE_LOCAL_UID_RANGE"
                )
            self._uids[user_id] = uid
            self._save()
            return uid

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": 1, "users": self._uids}, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
