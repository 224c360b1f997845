"""Replacing or revoking an agent (issue 12, part 8).

Found in the probe: an agent enrolled again under a new identity left its old sessions
`running` in the database while the new identity stopped their processes; a revoked agent's
failed session, when stopped, hung in `stopping` for minutes waiting on an agent that could
never answer. Every test runs real `streamspace agent` processes with real Xvnc sessions.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
from test_agents_support import (
    Fleet,
    _no_xvnc_left_behind,  # noqa: F401 - fixture
    fleet,  # noqa: F401 - fixture
    kill_pids,
    xvnc_pids,
)

from conftest import AgentProcess, wait_for, wait_state

PASSWORD = "user-pass-123"


def running(client: httpx.Client, fl: Fleet | None = None) -> str:
    r = client.post("/api/v1/sessions", json={"template": "xterm"})
    assert r.status_code == 201, r.text
    sid = str(r.json()["id"])
    if fl is not None:
        fl.sessions.append(sid)
    wait_state(client, sid, "running", 60)
    return sid


def stop_is_immediate(client: httpx.Client, session_id: str) -> None:
    """A session no agent hosts any more is stopped at once, not left `stopping`."""
    r = client.delete(f"/api/v1/sessions/{session_id}")
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "stopped", r.json()


# ---- separate agents ----------------------------------------------------------------------


def test_a_revoked_agents_sessions_fail_with_the_reason_and_stop_at_once(
    fleet: Callable[..., Fleet],
) -> None:
    fl = fleet()
    agent = fl.agent("c1")
    alice = fl.user()
    fl.wait_online(agent)
    sid = running(alice, fl)
    agent_id = fl.agent_id(agent)

    assert fl.admin.post(f"/api/v1/agents/{agent_id}/revoke").status_code == 200
    body = wait_state(alice, sid, "failed", 10)
    assert "revoked" in body["failure_reason"], body
    stop_is_immediate(alice, sid)
    # A revoked agent can no longer be told anything: what it ran is left on its host.
    fl.wait_exit(agent, 20)
    kill_pids(xvnc_pids(sid))


def test_an_agent_enrolled_again_under_a_new_identity_ends_the_old_sessions(
    fleet: Callable[..., Fleet],
) -> None:
    fl = fleet()
    agent = fl.agent("c1", name="edge")
    alice = fl.user()
    fl.wait_online(agent)
    sid = running(alice, fl)
    old_id = fl.agent_id(agent)
    assert xvnc_pids(sid)

    # The operator wipes the identity (not the session state) and enrols the host again.
    agent.kill()
    (agent.state_dir / "agent.json").unlink()
    again = AgentProcess(fl.cp.url, agent.state_dir, fl.join_token(), "c1", name="edge")
    fl.agents.append(again)
    again.start()
    fl.wait_online(again)
    new_id = fl.agent_id(again)
    assert new_id != old_id

    body = wait_state(alice, sid, "failed", 20)
    assert f"agent {old_id} was replaced by agent {new_id}" in body["failure_reason"], body
    wait_for(lambda: not xvnc_pids(sid), 20, what="the new identity to stop the old session")
    stop_is_immediate(alice, sid)
    running(alice, fl)  # the new identity serves new sessions
