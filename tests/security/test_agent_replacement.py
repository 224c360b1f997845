"""Replacing or revoking an agent (issue 12, part 8).

Found in the probe: revoking or rotating the credential of `streamspace up`'s own agent stopped
the whole product, and it would not start again (the stored credential was refused at every
start); an agent enrolled again under a new identity left its old sessions `running` in the
database while the new identity stopped their processes; a revoked agent's failed session, when
stopped, hung in `stopping` for minutes waiting on an agent that could never answer. Every test
runs real agents (`streamspace agent` processes, or `streamspace up`) with real Xvnc sessions.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from revocation_support import open_viewer
from test_agents_support import (
    Fleet,
    _no_xvnc_left_behind,  # noqa: F401 - fixture
    fleet,  # noqa: F401 - fixture
    kill_pids,
    xvnc_pids,
)

from conftest import XVNC_MISSING, AgentProcess, require, wait_for, wait_state
from product_support import Product
from streamspace import protocol

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


# ---- the embedded agent of `streamspace up` -----------------------------------------------


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Product]:
    require(XVNC_MISSING)
    p = Product(tmp_path / "data")
    try:
        p.start()
        yield p
    finally:
        p.stop()
        kill_pids(xvnc_pids(str(tmp_path)))


def agents(admin: httpx.Client) -> list[dict[str, Any]]:
    r = admin.get("/api/v1/agents", params={"include_revoked": "true"})
    assert r.status_code == 200, r.text
    return list(r.json())


def online_agent(admin: httpx.Client, other_than: str = "") -> str:
    def find() -> str:
        return next(
            (a["id"] for a in agents(admin) if a["status"] == "online" and a["id"] != other_than),
            "",
        )

    return str(wait_for(find, 30, what="an agent of streamspace up online"))


def stream_works(p: Product, c: httpx.Client, session_id: str) -> None:
    ticket = c.post(f"/api/v1/sessions/{session_id}/connect").json()

    async def view() -> None:
        viewer = await open_viewer(p.url, ticket["ws_path"], ticket["ticket"])
        await viewer.rfb.close()

    asyncio.run(view())


def test_revoking_the_embedded_agent_enrols_it_again_and_up_keeps_working(up: Product) -> None:
    admin = up.login()
    assert admin.post("/api/v1/users", json={"username": "ann", "password": PASSWORD})
    ann = up.login("ann", PASSWORD)
    old_sid = running(ann)
    old_id = online_agent(admin)

    r = admin.post(f"/api/v1/agents/{old_id}/revoke")
    assert r.status_code == 200, r.text
    new_id = online_agent(admin, other_than=old_id)
    assert up.proc is not None and up.proc.poll() is None, up.log()[-2000:]
    body = wait_state(ann, old_sid, "failed", 10)
    assert "revoked" in body["failure_reason"], body
    wait_for(lambda: not xvnc_pids(old_sid), 20, what="the old identity's Xvnc to be stopped")
    stop_is_immediate(ann, old_sid)

    sid = running(ann)
    stream_works(up, ann, sid)
    state = json.loads((up.data_dir / "agent" / "agent.json").read_text())
    assert state["agent_id"] == new_id
    r = admin.get("/api/v1/audit", params={"action": "agent.reenrol"})
    assert [e["resource_id"] for e in r.json()["items"]] == [old_id]


def test_rotating_the_embedded_agents_credential_keeps_it_and_its_sessions(up: Product) -> None:
    admin = up.login()
    sid = running(admin)
    agent_id = online_agent(admin)
    old_credential = json.loads((up.data_dir / "agent" / "agent.json").read_text())["credential"]

    r = admin.post(f"/api/v1/agents/{agent_id}/rotate-credential")
    assert r.status_code == 200, r.text
    new_credential = r.json()["credential"]
    path = up.data_dir / "agent" / "agent.json"
    wait_for(
        lambda: json.loads(path.read_text())["credential"] == new_credential,
        10,
        what="agent.json to hold the rotated credential",
    )
    assert path.stat().st_mode & 0o077 == 0
    assert online_agent(admin) == agent_id
    assert [a["id"] for a in agents(admin)] == [agent_id]  # no second identity
    assert admin.get(f"/api/v1/sessions/{sid}").json()["state"] == "running"
    stream_works(up, admin, sid)

    # The old credential is dead, the new one works.
    for credential, status in ((old_credential, 401), (new_credential, 200)):
        catalog = httpx.get(
            up.url + protocol.AGENT_CATALOG_PATH,
            headers={"Authorization": f"Bearer {credential}"},
            timeout=10,
        )
        assert catalog.status_code == status, catalog.text


def test_up_starts_again_after_its_agent_was_revoked_while_it_was_down(up: Product) -> None:
    admin = up.login()
    old_id = online_agent(admin)
    admin.close()
    up.stop()
    with sqlite3.connect(up.data_dir / "streamspace.db") as db:
        db.execute("UPDATE agents SET revoked = 1 WHERE id = ?", (old_id,))
    up.start()  # waits for an agent online: the re-enrolled one
    admin = up.login()
    new_id = online_agent(admin, other_than=old_id)
    assert new_id != old_id
    running(admin)
