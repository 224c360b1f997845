"""Owner-only files and directories: the credentials, keys and databases StreamSpace keeps.

Used by the control plane (data dir, signing key, SQLite files) and the agent (its state dir
and credential). A path left readable by an older version is tightened when it is next used; a
failure to do so is logged, not fatal (a volume may refuse chmod).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from streamspace import logs

log = logs.get_logger("streamspace.files")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def tighten(path: Path, mode: int) -> None:
    """chmod `path` to `mode` if it grants anything to group or others."""
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(mode)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("file_mode_not_tightened", path=path, error=exc)


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) owner-only, or tighten it."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    tighten(path, PRIVATE_DIR)


def create_private_file(path: Path) -> None:
    """Create an empty owner-only file unless it exists (then tighten it)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    tighten(path, PRIVATE_FILE)
