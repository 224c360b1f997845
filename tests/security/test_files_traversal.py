"""Path traversal through the files API, replayed through the product (real control plane, real
local-backend agent running as root, sessions as their own uid): symlinks the session user plants
in their home (made as that uid), `..`, absolute paths, files of another uid and hard links to
files outside must never let the API read or write outside the home, or read what the session
user could not."""

from __future__ import annotations

import io
import os
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_support import assert_problem
from test_streams_support import Desk, desk

pytestmark = pytest.mark.xvnc


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(tmp_path_factory.mktemp("files-sec")) as it:
        yield it


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root-owned directory outside every home, with a secret in it."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("root's secret")
    (outside / "secret.txt").chmod(0o600)
    return outside


@pytest.fixture(scope="module")
def planted(d: Desk, victim: Path) -> tuple[httpx.Client, str, Path]:
    """A running session whose user planted links to `victim` in their home, as their uid."""
    c = d.user("mallory")
    sid = d.start_session(c)["id"]
    homes = [p for p in (d.root / "agent" / "homes").glob("*/xterm") if p.is_dir()]
    home = max(homes, key=lambda p: p.stat().st_mtime)
    st = home.stat()
    assert st.st_uid != 0, "the session must run as its own uid for this test"

    def as_user(*argv: str) -> None:
        subprocess.run(argv, check=True, cwd=home, user=st.st_uid, group=st.st_gid, extra_groups=[])

    as_user("ln", "-s", str(victim), "dir-link")
    as_user("ln", "-s", str(victim / "secret.txt"), "file-link")
    as_user("ln", "-s", "../../..", "up-link")
    as_user("mkdir", "-p", "Box")
    as_user("ln", "-s", str(victim), "Box/inner-link")
    as_user("ln", "-s", str(victim), "Uploads")  # the upload folder itself, swapped for a link
    return c, sid, home


def content(sid: str) -> str:
    return f"/api/v1/sessions/{sid}/files/content"


@pytest.mark.parametrize("path", ["dir-link", "dir-link/secret.txt", "file-link", "up-link/etc"])
def test_symlinks_are_not_followed_for_reads(
    planted: tuple[httpx.Client, str, Path], path: str
) -> None:
    c, sid, _ = planted
    r = c.get(content(sid), params={"path": path})
    assert_problem(r, 403, "link")
    assert "root's secret" not in r.text
    assert_problem(c.get(f"/api/v1/sessions/{sid}/files", params={"path": path}), 403)


@pytest.mark.parametrize("path", ["dir-link/new.txt", "Uploads/new.txt", "Box/inner-link/n"])
def test_symlinks_are_not_followed_for_writes(
    planted: tuple[httpx.Client, str, Path], victim: Path, path: str
) -> None:
    c, sid, _ = planted
    assert_problem(c.put(content(sid), params={"path": path}, content=b"pwned"), 403, "link")
    assert sorted(p.name for p in victim.iterdir()) == ["secret.txt"]


def test_upload_over_a_file_link_replaces_the_link_not_its_target(
    planted: tuple[httpx.Client, str, Path], victim: Path
) -> None:
    c, sid, home = planted
    r = c.put(content(sid), params={"path": "file-link"}, content=b"mine")
    assert r.status_code == 201, r.text
    assert (victim / "secret.txt").read_text() == "root's secret"
    assert not (home / "file-link").is_symlink()
    assert (home / "file-link").read_bytes() == b"mine"


def test_listing_shows_links_as_links(planted: tuple[httpx.Client, str, Path]) -> None:
    c, sid, _ = planted
    items = c.get(f"/api/v1/sessions/{sid}/files").json()["items"]
    kinds = {e["name"]: e["type"] for e in items}
    assert kinds["dir-link"] == "symlink" and kinds["up-link"] == "symlink"


def test_home_zip_leaves_links_out(planted: tuple[httpx.Client, str, Path]) -> None:
    c, sid, _ = planted
    r = c.get(content(sid), params={"path": ""})
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = zf.namelist()
        links = ("dir-link", "up-link", "Box/inner-link", "Uploads")
        assert not [n for n in names if n.startswith(links)]
        assert all(b"root's secret" not in zf.read(n) for n in names)


def test_files_the_session_user_cannot_read_stay_unreadable(
    planted: tuple[httpx.Client, str, Path], victim: Path
) -> None:
    """The agent is root; it must still act as the session's uid."""
    c, sid, home = planted
    private = home / "roots-file"
    private.write_text("root only")
    private.chmod(0o600)
    os.link(victim / "secret.txt", home / "hardlink")  # as if protected_hardlinks were off
    for path in ("roots-file", "hardlink"):
        assert_problem(c.get(content(sid), params={"path": path}), 403)
    # A directory the user cannot write in refuses uploads too.
    locked = home / "locked"
    locked.mkdir(mode=0o755)
    assert_problem(c.put(content(sid), params={"path": "locked/x"}, content=b"x"), 403)
    assert not (locked / "x").exists()


@pytest.mark.parametrize("path", ["../xterm", "/etc/passwd", "Box/../../x", "..", "~/x"])
def test_dotdot_and_absolute_paths_are_refused(
    planted: tuple[httpx.Client, str, Path], path: str
) -> None:
    c, sid, _ = planted
    assert_problem(c.get(content(sid), params={"path": path}), 400)
    assert_problem(c.put(content(sid), params={"path": path}, content=b"x"), 400)
