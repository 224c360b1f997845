"""Home size accounting shared by the backends: measure when a session stops or hibernates,
refuse to start one whose home was over its limit.

No filesystem quota is used (homes live on whatever filesystem the host has), so a session can
grow its home past the limit while it runs; the limit bites at its next start. Walking a home
runs as the agent on a tree the session user controls, so symlinks are never followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from streamspace.agent.backends.base import BackendError

__all__ = ["HomeUsage", "tree_bytes"]


def tree_bytes(root: Path) -> int:
    """Disk usage of a tree (allocated blocks), symlinks never followed.

    fwalk descends through directory descriptors, so a directory the session swaps for a
    symlink while the walk runs (another session of the same home may be running) cannot send
    it elsewhere on the host."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        total += root.lstat().st_blocks * 512
    for _, dirnames, filenames, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(name, dir_fd=dir_fd).st_blocks * 512
    return total


class HomeUsage:
    """Last measured size of each home, by a key the backend chooses (path, volume name),
    kept in a 0600 JSON file. Blocking methods: call them in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        self._sizes: dict[str, int] = (
            {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}
        )

    def measure(self, key: str, root: Path) -> int:
        size = tree_bytes(root)
        with self._lock:
            self._sizes[key] = size
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(self._sizes, fh)
            os.replace(tmp, self.path)
        return size

    def last(self, key: str) -> int | None:
        return self._sizes.get(key)

    def check(self, key: str, root: Path, limit_mb: int | None) -> None:
        """Refuse a start whose home was over the limit when last measured. It is measured
        again first, so space freed since (by an admin, say) counts at once."""
        if limit_mb is None or key not in self._sizes:
            return
        limit = limit_mb * 1024 * 1024
        if self._sizes[key] <= limit:
            return
        used = self.measure(key, root)
        if used > limit:
            raise BackendError(
                f"the home of this app uses {used / 2**20:.0f} MiB, over your limit of "
                f"{limit_mb} MiB; free space in it (ask an admin) before starting it again"
            )
