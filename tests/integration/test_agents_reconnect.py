"""Agent outages with real processes: a SIGKILLed agent's sessions keep running and are
adopted by the restarted agent; sessions that die behind the agent's back (while it runs, or
while it is down) become `failed` with a reason; a frozen agent turns stale, then offline."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

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


def the_xvnc(session_id: str, agent_state_dir: Path) -> int:
    """The session's Xvnc, found via /proc by its session marker; its RFB socket lives in the
    session's run dir."""
    assert (agent_state_dir / "run" / session_id / "vnc.sock").is_socket()
    pids = xvnc_pids(session_id)
    assert len(pids) == 1, pids
    environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
    assert f"STREAMSPACE_SESSION_ID={session_id}".encode() in environ
    return pids[0]


def test_agent_killed_mid_session_then_restarted(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    agent = fl.agent("c1")
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)
    owner = fl.admin
    sid = fl.create(owner)["id"]
    wait_state(owner, sid, "running")
    xvnc = the_xvnc(sid, agent.state_dir)

    agent.kill()
    wait_for(lambda: not fl.cp.state.hub.is_connected(agent_id), 10, what="disconnect noticed")
    # During the outage the session stays running (it does: Xvnc lives on without the agent).
    for _ in range(3):
        body = fl.get(sid)
        assert body["state"] == "running", body
        assert fl.agent_view(agent_id)["status"] == "stale"
        assert the_xvnc(sid, agent.state_dir) == xvnc
        time.sleep(0.5)
    r = owner.post(f"/api/v1/sessions/{sid}/connect")
    assert r.status_code == 200, "a running session accepts connect requests during an outage"

    again = fl.restart(agent)
    view = fl.wait_online(again)
    assert view["id"] == agent_id
    body = fl.get(sid)
    assert body["state"] == "running" and body["agent_id"] == agent_id, body
    assert the_xvnc(sid, agent.state_dir) == xvnc, "the restarted agent adopted the session"
    nonblank, _ = stream(fl.cp, owner, sid)
    assert nonblank, "the adopted session does not stream"

    # Now the display server dies behind the (restarted) agent's back.
    os.kill(xvnc, signal.SIGKILL)
    failed = wait_state(owner, sid, "failed", timeout=20)
    reason = failed["failure_reason"]
    assert "session ended on agent" in reason and "display server" in reason, reason
    # The control plane asks the agent to clean up what is left (the app and its reaper).
    wait_for(lambda: not session_pids(sid), 15, what="session processes gone")
    assert not (agent.state_dir / "run" / sid).exists() or not xvnc_pids(sid)


def test_session_dies_while_the_agent_is_down(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    agent = fl.agent("c1")
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)
    owner = fl.admin
    sid = fl.create(owner)["id"]
    wait_state(owner, sid, "running")
    xvnc = the_xvnc(sid, agent.state_dir)

    agent.kill()
    wait_for(lambda: not fl.cp.state.hub.is_connected(agent_id), 10, what="disconnect noticed")
    os.kill(xvnc, signal.SIGKILL)
    wait_for(lambda: not xvnc_pids(sid), 5, what="Xvnc gone")
    assert fl.get(sid)["state"] == "running", "nobody could have told the control plane yet"

    again = fl.restart(agent)
    fl.wait_online(again)
    failed = wait_state(owner, sid, "failed", timeout=20)
    reason = failed["failure_reason"]
    assert "reconnected" in reason and agent_id in reason, reason
    assert failed["events"][-1]["kind"] == "failed"
    wait_for(lambda: not session_pids(sid), 15, what="session processes gone")


def test_frozen_agent_turns_stale_then_offline(fleet: Callable[..., Fleet]) -> None:
    fl = fleet(
        agent_heartbeat_seconds=0.5, agent_stale_after_seconds=4, agent_offline_after_seconds=8
    )
    agent = fl.agent("c1")
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)

    def last_seen() -> datetime:
        return datetime.fromisoformat(fl.agent_view(agent_id)["last_seen"])

    first_seen = last_seen()
    wait_for(lambda: last_seen() > first_seen, 8, what="heartbeats flushed")
    assert fl.agent_view(agent_id)["status"] == "online"

    fl.sigstop(agent)
    frozen_at = time.time()

    def status(wanted: str) -> Callable[[], bool]:
        return lambda: fl.agent_view(agent_id)["status"] == wanted

    wait_for(status("stale"), 10, what="stale")
    assert time.time() - frozen_at >= 2, "turned stale too early"
    assert fl.cp.state.hub.is_connected(agent_id), "the socket itself is still open"

    # A stale agent gets no new sessions.
    owner = fl.admin
    sid = fl.create(owner)["id"]

    def queued() -> bool:
        return "1 offline" in fl.get(sid)["status_message"]

    wait_for(queued, 10, what="queue reason naming the offline agent")

    wait_for(status("offline"), 12, what="offline")
    assert time.time() - frozen_at >= 6, "turned offline too early"
    assert fl.get(sid)["state"] == "pending"

    # Thawed, it is online again and takes the queued session.
    fl.sigcont(agent)
    wait_for(status("online"), 15, what="online again")
    body = wait_state(owner, sid, "running", timeout=30)
    assert body["agent_id"] == agent_id
