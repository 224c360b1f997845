"""Persistent homes on the agent host, keyed by immutable user ids.

Layout (under the agent's state directory, itself 0700 and owned by the agent):
`homes/<user_id>/<template>`, both levels owned by the session uid and mode 0700, and
`homes/.layout` saying which layout this is. Version 1 keyed homes by user *name*, so a user
deleted and re-created under the same name inherited the old one's files; `migrate_legacy`
moves such homes to their owner's id once the control plane says which id a name belongs to
now. Homes of names no user has any more go to `homes/.orphaned/<name>` (kept, never
deleted: an admin decides).

Everything that walks a home runs as root on a tree the session user controls, so nothing here
follows symlinks: ownership is changed with lchown, sizes are taken by agent/homeusage.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from streamspace import logs
from streamspace.agent.backends.base import BackendError
from streamspace.agent.homeusage import HomeUsage

__all__ = [
    "LAYOUT_VERSION",
    "HomeStore",
]

log = logs.get_logger("streamspace.agent.local")

UidLookup = Callable[[str], tuple[int, int]]
"""user id -> (uid, gid) of the account its sessions run as."""

LAYOUT_VERSION = 2
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def check_name(kind: str, value: str) -> None:
    """Names become path components; refuse anything that could escape the state dir."""
    if not _NAME_RE.fullmatch(value) or value in (".", ".."):
        raise BackendError(f"invalid {kind} {value!r}: use letters, digits and . _ @ + -")


def _mkdir_owned(path: Path, uid: int, gid: int) -> None:
    """A real directory (never a symlink) owned by uid:gid with mode 0700."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise BackendError(f"{path} is not a directory")
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != 0o700:
        _chmod_dir(path, 0o700)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """lchown a whole tree (a migrated home written by the old root-run sessions), through
    directory descriptors, so no swapped-in symlink can redirect it (see tree_bytes)."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for _, dirnames, filenames, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def _chmod_dir(path: Path, mode: int) -> None:
    """chmod a directory without following a symlink (os.chmod cannot, on Linux)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


class HomeStore:
    """Paths, ownership, size accounting and layout migration of homes (blocking methods)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "homes"
        self.ephemeral = state_dir / "ephemeral"
        for path in (self.root, self.ephemeral):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)
        self.usage = HomeUsage(state_dir / "home-usage.json")
        if not (self.root / ".layout").exists() and self.layout() == LAYOUT_VERSION:
            (self.root / ".layout").write_text(f"{LAYOUT_VERSION}\n")

    # ---- paths ----------------------------------------------------------------------------

    def persistent(self, user_id: str, template: str) -> Path:
        check_name("user id", user_id)
        check_name("template", template)
        return self.root / user_id / template

    def scratch(self, session_id: str) -> Path:
        check_name("session id", session_id)
        return self.ephemeral / session_id

    def prepare(self, home: Path, uid: int, gid: int) -> None:
        """Create the home (and its per-user parent) owned by the session's uid."""
        if home.parent != self.ephemeral:
            _mkdir_owned(home.parent, uid, gid)
        _mkdir_owned(home, uid, gid)

    # ---- size accounting ------------------------------------------------------------------

    def measure(self, home: Path) -> int:
        """Measure and remember a home's size (done when its session stops or hibernates)."""
        return self.usage.measure(str(home), home)

    def check_limit(self, home: Path, limit_mb: int | None) -> None:
        self.usage.check(str(home), home, limit_mb)

    # ---- layout migration -----------------------------------------------------------------

    def layout(self) -> int:
        try:
            return int((self.root / ".layout").read_text().strip())
        except (OSError, ValueError):
            has_homes = any(p.name[0] != "." for p in self.root.iterdir() if p.is_dir())
            return 1 if has_homes else LAYOUT_VERSION

    def _migrated(self) -> set[str]:
        """Directories already in the new layout while a migration is under way."""
        try:
            return set(json.loads((self.root / ".migrated.json").read_text()))
        except (OSError, ValueError, TypeError):
            return set()

    def legacy_names(self) -> list[str]:
        """User names of version-1 homes still waiting for their owner's id."""
        if self.layout() >= LAYOUT_VERSION:
            return []
        done = self._migrated()
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and p.name[0] != "." and p.name not in done
        )

    def migrate_legacy(self, owners: dict[str, str], uid_for: UidLookup) -> dict[str, str]:
        """Move `homes/<name>/*` to `homes/<id>/*`; what went where (names -> new dirs).

        Progress is recorded home by home, so a migration cut short (a crash, a home that
        cannot move) resumes where it stopped and never takes a moved home for a user name."""
        moved: dict[str, str] = {}
        done = self._migrated()
        failed = False
        for name in self.legacy_names():
            try:
                target = self._migrate_one(name, owners.get(name), uid_for)
            except (OSError, BackendError) as exc:
                failed = True
                log.error("home_migration_failed", name=name, error=exc)
                continue
            moved[name] = str(target)
            if target.parent == self.root:
                done.add(target.name)
                tmp = self.root / ".migrated.tmp"
                tmp.write_text(json.dumps(sorted(done)))
                os.replace(tmp, self.root / ".migrated.json")
        if not failed:
            (self.root / ".layout").write_text(f"{LAYOUT_VERSION}\n")
            (self.root / ".migrated.json").unlink(missing_ok=True)
        return moved

    def _migrate_one(self, name: str, user_id: str | None, uid_for: UidLookup) -> Path:
        source = self.root / name
        if user_id is None:
            target = self.root / ".orphaned" / name
            target.parent.mkdir(mode=0o700, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{name}.{os.getpid()}")
            os.rename(source, target)
            log.warning("home_orphaned", name=name, kept_at=target)
            return target
        check_name("user id", user_id)
        uid, gid = uid_for(user_id)
        dest = self.root / user_id
        if dest.exists() and dest != source:
            for template_dir in sorted(source.iterdir()):
                target = dest / template_dir.name
                if target.exists():
                    target = dest / f"{template_dir.name}.from-{name}"
                os.rename(template_dir, target)
            shutil.rmtree(source, ignore_errors=True)
        else:
            os.rename(source, dest)
        chown_tree(dest, uid, gid)
        for path in (dest, *dest.iterdir()):
            if path.is_dir() and not path.is_symlink():
                _chmod_dir(path, 0o700)
        log.event("home_migrated", name=name, user_id=user_id, path=dest)
        return dest
