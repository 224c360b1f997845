"""The per-group clipboard policy, through the product to the session's VNC server: a group
that blocks copy out (or in) starts its members' sessions with Xvnc's `-SendCutText 0` (or
`-AcceptCutText 0`) and `-AllowOverride desktop`, so neither the viewer nor an X client inside
the session (vncconfig) can turn it back on; members of no such group keep both directions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from test_streams_support import Desk, desk

from vnc_support import xvnc_processes

pytestmark = pytest.mark.xvnc


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Desk]:
    with desk(tmp_path_factory.mktemp("clipboard")) as it:
        yield it


def xvnc_flags(session_id: str) -> dict[str, str]:
    (xvnc,) = xvnc_processes(session_id)
    args = xvnc.cmdline()
    return {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("-")}


def group(d: Desk, name: str, member: str, **policy: Any) -> str:
    r = d.admin.post("/api/v1/groups", json={"name": name, **policy})
    assert r.status_code == 201, r.text
    gid = str(r.json()["id"])
    assert d.admin.put(f"/api/v1/groups/{gid}/members/{member}").status_code == 200
    return gid


def test_a_group_that_blocks_copy_out_reaches_the_vnc_server(d: Desk) -> None:
    c: httpx.Client = d.user("quiet")
    group(d, "paste-only", "quiet", clipboard_out=False)
    group(d, "open-clip", "quiet", clipboard_in=True, clipboard_out=True)  # False still wins
    sid = d.start_session(c)["id"]
    flags = xvnc_flags(sid)
    assert (flags["-SendCutText"], flags["-AcceptCutText"]) == ("0", "1")
    assert flags["-AllowOverride"] == "desktop"  # vncconfig inside cannot re-enable it
    d.stop_session(sid)


def test_patching_the_group_applies_to_the_next_session(d: Desk) -> None:
    c = d.user("sealed")
    gid = group(d, "sealed-clip", "sealed", clipboard_in=False, clipboard_out=False)
    r = d.admin.get(f"/api/v1/groups/{gid}")
    assert (r.json()["clipboard_in"], r.json()["clipboard_out"]) == (False, False)
    sid = d.start_session(c)["id"]
    assert (xvnc_flags(sid)["-AcceptCutText"], xvnc_flags(sid)["-SendCutText"]) == ("0", "0")
    d.stop_session(sid)

    r = d.admin.patch(f"/api/v1/groups/{gid}", json={"clipboard_in": None})
    assert r.status_code == 200 and r.json()["clipboard_in"] is None  # no say: the setting
    sid = d.start_session(c)["id"]
    assert (xvnc_flags(sid)["-AcceptCutText"], xvnc_flags(sid)["-SendCutText"]) == ("1", "0")
    d.stop_session(sid)


def test_users_in_no_such_group_keep_both_directions(d: Desk) -> None:
    c = d.user("free")
    sid = d.start_session(c)["id"]
    flags = xvnc_flags(sid)
    assert (flags["-AcceptCutText"], flags["-SendCutText"]) == ("1", "1")
    d.stop_session(sid)


def test_bad_policy_values_are_422(d: Desk) -> None:
    r = d.admin.post("/api/v1/groups", json={"name": "bad-clip", "clipboard_in": "sometimes"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem")
    assert "clipboard_in" in r.text
