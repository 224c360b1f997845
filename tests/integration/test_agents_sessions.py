"""A real session end to end through a real agent process, on SQLite and PostgreSQL:
create -> placed -> running -> streamed through the control plane's tunnel (RFB over
WebSocket) -> typing changes the picture -> hibernate (Xvnc gone) -> wake -> stream again ->
stop (nothing of the session left on the host)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_agents_support import (
    Fleet,
    _needs_xvnc,  # noqa: F401 - fixture
    _no_xvnc_left_behind,  # noqa: F401 - fixture
    fleet,  # noqa: F401 - fixture
    session_pids,
    stream,
    xvnc_pids,
)

from conftest import wait_for, wait_state

pytestmark = pytest.mark.xvnc


def kinds(session: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in session["events"]]


def test_session_end_to_end(db_url: str, fleet: Callable[..., Fleet]) -> None:
    fl = fleet(database_url=db_url)
    agent = fl.agent("c1", name="edge-1")
    alice = fl.user()
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)

    created = fl.create(alice)
    sid = created["id"]
    assert created["state"] == "pending"
    assert created["owner"] == "alice" and created["template"] == "xterm"

    running = wait_state(alice, sid, "running", timeout=45)
    assert running["agent_id"] == agent_id
    assert running["cluster_id"] == "c1"
    assert running["failure_reason"] == "" and running["status_message"] == ""
    assert "connect" in running["allowed_actions"]
    assert running["started_at"] is not None
    placed = [e for e in running["events"] if e["kind"] == "placed"]
    assert len(placed) == 1, running["events"]
    assert placed[0]["message"].startswith("placed on agent edge-1 in cluster c1"), placed
    assert placed[0]["data"]["agent_id"] == agent_id
    assert placed[0]["data"]["cluster_id"] == "c1"
    assert kinds(running)[0] == "created" and kinds(running)[-1] == "running"
    assert len(xvnc_pids(sid)) == 1, "exactly one Xvnc for the session"

    nonblank, changed = stream(fl.cp, alice, sid, type_text="echo hello-streamspace\n")
    assert nonblank, "framebuffer through the tunnel is blank"
    assert changed, "typing through the tunnel did not change the framebuffer"

    # The agent's heartbeat reports the load.
    wait_for(lambda: fl.agent_view(agent_id)["load"]["sessions"] == 1, 10, what="heartbeat load 1")

    # Hibernate: compute released, the session is kept.
    r = alice.post(f"/api/v1/sessions/{sid}/hibernate")
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "hibernating"
    hib = wait_state(alice, sid, "hibernated", timeout=30)
    assert hib["agent_id"] == agent_id
    assert "wake" in hib["allowed_actions"] and "connect" not in hib["allowed_actions"]
    assert xvnc_pids(sid) == [] and session_pids(sid) == [], "hibernated session still runs"
    r = alice.post(f"/api/v1/sessions/{sid}/connect")
    assert r.status_code == 409, r.text

    # Wake: running and streamable again.
    r = alice.post(f"/api/v1/sessions/{sid}/wake")
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "waking"
    woke = wait_state(alice, sid, "running", timeout=45)
    assert woke["agent_id"] == agent_id
    assert len(xvnc_pids(sid)) == 1
    nonblank, _ = stream(fl.cp, alice, sid)
    assert nonblank, "framebuffer after wake is blank"

    # Stop: stopped, and nothing of the session is left.
    r = alice.delete(f"/api/v1/sessions/{sid}")
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "stopping"
    stopped = wait_state(alice, sid, "stopped", timeout=30)
    assert stopped["allowed_actions"] == []
    seen = kinds(stopped)
    for kind in (
        "created",
        "placed",
        "starting",
        "running",
        "hibernating",
        "hibernated",
        "waking",
        "stopping",
        "stopped",
    ):
        assert kind in seen, (kind, seen)
    wait_for(lambda: not xvnc_pids(sid) and not session_pids(sid), 10, what="no processes")
    assert not (agent.state_dir / "sessions" / f"{sid}.json").exists()
    wait_for(lambda: fl.agent_view(agent_id)["load"]["sessions"] == 0, 10, what="heartbeat load 0")
