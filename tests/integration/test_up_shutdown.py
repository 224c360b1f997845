"""Stopping `streamspace up` (Ctrl-C / SIGTERM) hibernates the embedded agent's sessions: no
Xvnc or app process of theirs is left, their homes stay, and after the next start they wake.
With `--keep-sessions` they keep running instead and the next start adopts them."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import XVNC_MISSING, require, wait_state
from product_support import Product
from vnc_support import session_pids

pytestmark = pytest.mark.xvnc


def start_xterm(p: Product) -> tuple[str, list[int]]:
    admin = p.login()
    r = admin.post("/api/v1/sessions", json={"template": "xterm"})
    assert r.status_code == 201, r.text
    sid = str(r.json()["id"])
    wait_state(admin, sid, "running")
    pids = session_pids(sid)
    assert pids, "the session runs no process"
    return sid, pids


def interrupt(p: Product, sig: int) -> None:
    assert p.proc is not None
    p.proc.send_signal(sig)
    p.proc.wait(90)


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_ctrl_c_hibernates_the_sessions_and_the_next_start_wakes_them(tmp_path: Path) -> None:
    require(XVNC_MISSING)
    data = tmp_path / "data"
    first = Product(data).start()
    try:
        sid, pids = start_xterm(first)
        home = next((data / "agent" / "homes").glob("*/xterm"))
        (home / "kept.txt").write_text("still here")
        interrupt(first, signal.SIGINT)
        assert "hibernating 1 session" in first.log()
        deadline = time.time() + 10
        while alive(pids) and time.time() < deadline:
            time.sleep(0.1)
        assert alive(pids) == [], "a process of the session outlived `streamspace up`"
    finally:
        first.stop()

    again = Product(data).start()
    try:
        admin = again.login()
        assert admin.get(f"/api/v1/sessions/{sid}").json()["state"] == "hibernated"
        assert admin.post(f"/api/v1/sessions/{sid}/wake").status_code == 202
        wait_state(admin, sid, "running")
        assert (home / "kept.txt").read_text() == "still here"
    finally:
        again.stop()


def test_keep_sessions_leaves_them_running_for_the_next_start(tmp_path: Path) -> None:
    require(XVNC_MISSING)
    data = tmp_path / "data"
    first = Product(data, args=["--keep-sessions"]).start()
    try:
        sid, pids = start_xterm(first)
        interrupt(first, signal.SIGTERM)
        assert alive(pids), "--keep-sessions stopped the session's processes"
    finally:
        first.stop()
    again = Product(data).start()
    try:
        admin = again.login()
        assert admin.get(f"/api/v1/sessions/{sid}").json()["state"] == "running"
        assert set(alive(pids)) <= set(session_pids(sid))  # adopted, not restarted
    finally:
        again.stop()
        assert alive(pids) == []
