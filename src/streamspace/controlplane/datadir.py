"""The control plane's data directory: owner-only, like everything kept in it.

It holds the signing key (whoever reads it can forge any user's token), the SQLite database and
its WAL and shared-memory files (password and credential hashes), and the embedded agent's
credential. The directory is 0700 and the files 0600, tightened at start if an older version
left them readable (streamspace.private_files).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from streamspace.config import Settings
from streamspace.controlplane.security import random_secret
from streamspace.private_files import PRIVATE_FILE, private_dir, tighten

SECRET_FILE = "secret_key"


def prepare(data_dir: Path) -> None:
    private_dir(data_dir)
    tighten(data_dir / SECRET_FILE, PRIVATE_FILE)


def load_or_create_secret(settings: Settings) -> str:
    """STREAMSPACE_SECRET_KEY, or the key generated once into the data dir."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    secret = random_secret(48)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret)
        return secret
    return path.read_text().strip()  # another replica sharing the dir wrote it first
