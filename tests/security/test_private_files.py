"""The data dir keeps its secrets to its owner (issue 12, part 8).

Found in the probe: under the usual umask 022 `streamspace up` left the signing key's directory,
the SQLite database and its WAL/SHM files readable by every local account (0755/0644), so any
session user could copy every password hash and agent credential hash. Here the real product
runs under umask 022; everything it keeps must be owner-only, and a data dir left readable by
an older version must be tightened on the next start.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from conftest import wait_for
from product_support import Product


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secrets_of(data: Path) -> dict[Path, int]:
    """Every path that must be private, with the mode it must have."""
    db = data / "streamspace.db"
    return {
        data: 0o700,
        data / "secret_key": 0o600,
        db: 0o600,
        db.with_name(db.name + "-wal"): 0o600,
        db.with_name(db.name + "-shm"): 0o600,
        data / "agent": 0o700,
        data / "agent" / "agent.json": 0o600,
    }


def assert_private(data: Path) -> None:
    wrong = {
        str(p): oct(mode(p))
        for p, want in secrets_of(data).items()
        if not p.exists() or mode(p) != want
    }
    assert not wrong, f"not owner-only: {wrong}"


def start(data: Path) -> Product:
    with umask(0o022):
        p = Product(data).start()
    wait_for(lambda: (data / "streamspace.db-wal").exists(), 10, what="the SQLite WAL file")
    return p


def test_a_fresh_data_dir_is_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    p = start(data)
    try:
        assert_private(data)
    finally:
        p.stop()


def test_a_data_dir_left_readable_is_tightened_on_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    start(data).stop()
    for path in secrets_of(data):
        if path.exists():
            path.chmod(0o755 if path.is_dir() else 0o644)
    p = start(data)
    try:
        assert_private(data)
    finally:
        p.stop()
