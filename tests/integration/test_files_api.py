"""Files API against a real control plane and a real local-backend agent (Xvnc + xterm): upload
into ~/Uploads, list, download a file and a folder (zip), owner-only, bad paths, the upload size
limit, the home quota, the per-group policy and the audit trail (docs/files.md)."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import assert_problem
from test_streams_support import Desk, desk

pytestmark = pytest.mark.xvnc

LIMIT_MB = 4


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(tmp_path_factory.mktemp("files"), files_max_upload_mb=LIMIT_MB) as it:
        yield it


@pytest.fixture(scope="module")
def owner(d: Desk) -> tuple[httpx.Client, str]:
    c = d.user("filer")
    return c, d.start_session(c)["id"]


def files(sid: str) -> str:
    return f"/api/v1/sessions/{sid}/files"


def home_of(d: Desk, name: str = "xterm") -> Path:
    homes = [p for p in (d.root / "agent" / "homes").glob(f"*/{name}") if p.is_dir()]
    assert len(homes) >= 1, "no home on the agent's host"
    return max(homes, key=lambda p: p.stat().st_mtime)


def test_upload_list_download_round_trip(d: Desk, owner: tuple[httpx.Client, str]) -> None:
    c, sid = owner
    payload = os.urandom(3 * 1024 * 1024 + 17)
    r = c.put(f"{files(sid)}/content", params={"path": "Uploads/data.bin"}, content=payload)
    assert r.status_code == 201, r.text
    assert r.json()["size"] == len(payload)

    listed = c.get(files(sid), params={"path": "Uploads"})
    assert listed.status_code == 200, listed.text
    entry = next(e for e in listed.json()["items"] if e["name"] == "data.bin")
    assert (entry["type"], entry["size"], entry["path"]) == (
        "file",
        len(payload),
        "Uploads/data.bin",
    )
    assert not [e for e in listed.json()["items"] if ".upload-" in e["name"]]

    got = c.get(f"{files(sid)}/content", params={"path": "Uploads/data.bin"})
    assert got.status_code == 200
    assert got.content == payload
    assert "data.bin" in got.headers["content-disposition"]

    # Written as the session's user, not as the (root) agent.
    on_host = next(p for p in home_of(d).rglob("data.bin"))
    uploads_dir = on_host.parent
    sessions_uid = home_of(d).stat().st_uid
    assert on_host.stat().st_uid == sessions_uid
    assert uploads_dir.stat().st_uid == sessions_uid


def test_folder_downloads_as_zip(owner: tuple[httpx.Client, str]) -> None:
    c, sid = owner
    for name, body in (("Docs/a.txt", b"alpha"), ("Docs/sub/b.txt", b"beta" * 1000)):
        assert (
            c.put(f"{files(sid)}/content", params={"path": name}, content=body).status_code == 201
        )
    r = c.get(f"{files(sid)}/content", params={"path": "Docs"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert zf.read("a.txt") == b"alpha"
        assert zf.read("sub/b.txt") == b"beta" * 1000


def test_listing_is_sorted_and_paginated(owner: tuple[httpx.Client, str]) -> None:
    c, sid = owner
    for i in range(5):
        body = b"x" * (i + 1)
        c.put(f"{files(sid)}/content", params={"path": f"Many/f{i}"}, content=body)
    r = c.get(files(sid), params={"path": "Many", "sort": "size", "order": "desc", "limit": 2})
    page = r.json()
    assert [e["name"] for e in page["items"]] == ["f4", "f3"]
    assert (page["total"], page["next_offset"]) == (5, 2)


def test_another_user_gets_404(d: Desk, owner: tuple[httpx.Client, str]) -> None:
    _, sid = owner
    other = d.user("snoop")
    assert_problem(other.get(files(sid)), 404)
    assert_problem(other.get(f"{files(sid)}/content", params={"path": "Uploads/data.bin"}), 404)
    r = other.put(f"{files(sid)}/content", params={"path": "Uploads/x"}, content=b"x")
    assert_problem(r, 404)


@pytest.mark.parametrize(
    "path", ["../x", "Uploads/../../x", "/etc/passwd", "~root/.bashrc", "a\x00b"]
)
def test_bad_paths_are_refused(owner: tuple[httpx.Client, str], path: str) -> None:
    c, sid = owner
    assert_problem(c.get(files(sid), params={"path": path}), 400)
    assert_problem(c.get(f"{files(sid)}/content", params={"path": path}), 400)
    assert_problem(c.put(f"{files(sid)}/content", params={"path": path}, content=b"x"), 400)


def test_missing_file_is_404(owner: tuple[httpx.Client, str]) -> None:
    c, sid = owner
    assert_problem(c.get(f"{files(sid)}/content", params={"path": "nope.txt"}), 404)


def test_upload_size_limit_is_413(owner: tuple[httpx.Client, str]) -> None:
    c, sid = owner
    big = b"z" * (LIMIT_MB * 2**20 + 1)
    r = c.put(f"{files(sid)}/content", params={"path": "Uploads/big"}, content=big)
    assert_problem(r, 413, f"{LIMIT_MB} MiB")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(LIMIT_MB + 1):
            yield b"z" * 2**20

    r = c.put(f"{files(sid)}/content", params={"path": "Uploads/big"}, content=chunks())
    assert_problem(r, 413)
    names = [e["name"] for e in c.get(files(sid), params={"path": "Uploads"}).json()["items"]]
    assert "big" not in names and not [n for n in names if ".upload-" in n]


def test_home_quota_is_enforced(d: Desk) -> None:
    c = d.cp.create_user(
        "quotad",
        quota={"max_sessions": 2, "max_cpu_millis": 4000, "max_memory_mb": 4096, "max_home_mb": 1},
    )
    d.clients.append(c)
    sid = d.start_session(c)["id"]
    r = c.put(f"{files(sid)}/content", params={"path": "Uploads/q"}, content=b"q" * 2 * 2**20)
    body = assert_problem(r, 413, "home")
    assert body["type"].endswith("files-quota")
    d.stop_session(sid)


def _group(d: Desk, name: str, member: str, **policy: Any) -> str:
    r = d.admin.post("/api/v1/groups", json={"name": name, **policy})
    assert r.status_code == 201, r.text
    gid = str(r.json()["id"])
    assert d.admin.put(f"/api/v1/groups/{gid}/members/{member}").status_code == 200
    return gid


def test_group_policy_denies_with_403(d: Desk) -> None:
    c = d.user("policed")
    sid = d.start_session(c)["id"]
    open_gid = _group(d, "files-open", "policed", allow_upload=True, allow_download=True)
    closed_gid = _group(d, "no-uploads", "policed", allow_upload=False)
    r = d.admin.get(f"/api/v1/groups/{closed_gid}")
    assert (r.json()["allow_upload"], r.json()["allow_download"]) == (False, None)

    r = c.put(f"{files(sid)}/content", params={"path": "Uploads/p"}, content=b"p")
    assert_problem(r, 403, "upload")  # one group's False wins over another's True
    assert c.get(files(sid)).status_code == 200

    r = d.admin.patch(f"/api/v1/groups/{open_gid}", json={"allow_download": False})
    assert r.status_code == 200 and r.json()["allow_download"] is False
    assert r.json()["allow_upload"] is True  # fields left out stay
    assert_problem(c.get(f"{files(sid)}/content", params={"path": "Uploads"}), 403, "download")

    r = d.admin.patch(f"/api/v1/groups/{closed_gid}", json={"allow_upload": None})
    assert r.json()["allow_upload"] is None
    r = c.put(f"{files(sid)}/content", params={"path": "Uploads/p"}, content=b"p")
    assert r.status_code == 201, r.text

    audit = d.admin.get("/api/v1/audit", params={"action": "session.file_upload"}).json()
    codes = sorted(row["status_code"] for row in audit["items"] if row["actor"] == "policed")
    assert codes == [201, 403]
    d.stop_session(sid)


def test_a_download_link_works_once_without_credentials_for_its_path_only(
    d: Desk, owner: tuple[httpx.Client, str]
) -> None:
    """The viewer hands downloads to the browser's download manager with a single-use link;
    it must carry its user and path, and open nothing else."""
    c, sid = owner
    payload = os.urandom(1024 * 1024 + 3)
    r = c.put(f"{files(sid)}/content", params={"path": "Uploads/linked.bin"}, content=payload)
    assert r.status_code == 201, r.text
    base = f"http://127.0.0.1:{d.cp.port}"

    r = c.post(f"{files(sid)}/link", params={"path": "Uploads/linked.bin"})
    assert r.status_code == 201, r.text
    url = r.json()["url"]
    assert url.startswith(f"/api/v1/sessions/{sid}/files/download?ticket=")
    got = httpx.get(base + url)
    assert got.status_code == 200, got.text
    assert got.content == payload
    assert "attachment" in got.headers["content-disposition"]
    assert_problem(httpx.get(base + url), 403, "used")  # single use

    # The path is the link's: a query parameter cannot point it elsewhere.
    url = c.post(f"{files(sid)}/link", params={"path": "Uploads/linked.bin"}).json()["url"]
    got = httpx.get(base + url + "&path=Uploads")
    assert got.status_code == 200 and got.content == payload

    # A link for one session opens no other, and a viewer's ticket opens no download.
    url = c.post(f"{files(sid)}/link", params={"path": "Uploads/linked.bin"}).json()["url"]
    assert_problem(httpx.get(base + url.replace(sid, "another-session")), 403)
    viewer_ticket = d.connect(sid, c)["ticket"]
    assert_problem(
        httpx.get(f"{base}/api/v1/sessions/{sid}/files/download", params={"ticket": viewer_ticket}),
        403,
    )
    assert_problem(httpx.get(f"{base}/api/v1/sessions/{sid}/files/download"), 403)

    # Another user cannot ask for a link to it, and bad paths are refused up front.
    assert_problem(d.user("link-snoop").post(f"{files(sid)}/link", params={"path": ""}), 404)
    assert_problem(c.post(f"{files(sid)}/link", params={"path": "../etc"}), 400)


def test_a_download_link_cannot_open_a_viewer_stream(
    d: Desk, owner: tuple[httpx.Client, str]
) -> None:
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    c, sid = owner
    url = c.post(f"{files(sid)}/link", params={"path": ""}).json()["url"]
    ticket = url.rsplit("ticket=", 1)[1]

    async def attempt(ticket: str) -> str:
        try:
            async with connect(d.ws_url(ticket), open_timeout=20) as ws:
                banner = await ws.recv()
        except InvalidStatus as exc:
            return f"status {exc.response.status_code}"
        return "RFB" if isinstance(banner, bytes) and banner.startswith(b"RFB") else "other"

    assert asyncio.run(attempt(ticket)) == "status 403"
    # The same session, owner and socket with a viewer's ticket: it opens.
    assert asyncio.run(attempt(d.connect(sid, c)["ticket"])) == "RFB"


def test_a_download_link_dies_with_a_sign_out(d: Desk) -> None:
    c = d.user("link-leaver")
    sid = d.start_session(c)["id"]
    url = c.post(f"{files(sid)}/link", params={"path": ""}).json()["url"]
    r = c.post("/api/v1/auth/sessions/revoke-all")
    assert r.status_code in (200, 204), r.text
    got = httpx.get(f"http://127.0.0.1:{d.cp.port}{url}")
    assert_problem(got, 403, "signed out")
    d.admin.delete(f"/api/v1/sessions/{sid}")


def test_a_download_link_is_refused_when_downloads_are_off_for_the_group(d: Desk) -> None:
    c = d.user("link-policed")
    sid = d.start_session(c)["id"]
    _group(d, "no-downloads", "link-policed", allow_download=False)
    assert_problem(c.post(f"{files(sid)}/link", params={"path": ""}), 403, "download")
    d.stop_session(sid)
