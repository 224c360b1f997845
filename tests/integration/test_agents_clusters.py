"""Placement across clusters with real agents: requested cluster, full agents skipped, a queue
that explains itself and drains when capacity frees up, and a queue timeout with a reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from test_agents_support import (
    Fleet,
    _needs_xvnc,  # noqa: F401 - fixture
    _no_xvnc_left_behind,  # noqa: F401 - fixture
    fleet,  # noqa: F401 - fixture
)

from conftest import wait_for, wait_state

pytestmark = pytest.mark.xvnc


def placed_event(session: dict[str, Any]) -> str:
    msgs = [e["message"] for e in session["events"] if e["kind"] == "placed"]
    assert len(msgs) == 1, session["events"]
    return str(msgs[0])


def queue_reason(fl: Fleet, session_id: str) -> dict[str, Any] | None:
    body = fl.get(session_id)
    return body if body["status_message"].startswith("waiting for capacity") else None


def test_cluster_placement_full_agents_and_the_queue(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    a1 = fl.agent("c1", name="small", max_sessions=1)
    a2 = fl.agent("c2", name="big", max_sessions=2)
    fl.wait_online(a1)
    fl.wait_online(a2)
    id1, id2 = fl.agent_id(a1), fl.agent_id(a2)
    owner = fl.admin

    # Pinned to c2: lands on c2's agent although c1's is emptier.
    s_c2 = fl.create(owner, cluster_id="c2")
    body = wait_state(owner, s_c2["id"], "running")
    assert body["requested_cluster_id"] == "c2"
    assert (body["cluster_id"], body["agent_id"]) == ("c2", id2)
    assert "in cluster c2" in placed_event(body)
    assert "1 in another cluster" in placed_event(body)

    # Unconstrained: the least loaded agent (c1, 0/1) takes it.
    s_fill = fl.create(owner)
    body = wait_state(owner, s_fill["id"], "running")
    assert (body["cluster_id"], body["agent_id"]) == ("c1", id1)

    # c1 is full now: the next one is placed on c2 and says it skipped the full agent.
    s_skip = fl.create(owner)
    body = wait_state(owner, s_skip["id"], "running")
    assert (body["cluster_id"], body["agent_id"]) == ("c2", id2)
    assert "skipped 1 full (sessions)" in placed_event(body), placed_event(body)

    # Everything is full: the next one waits and says why.
    s_queued = fl.create(owner)

    def explained() -> dict[str, Any] | None:
        b = fl.get(s_queued["id"])
        return b if "full (sessions)" in b["status_message"] else None

    body = wait_for(explained, 10, what="a queue reason")
    assert body["state"] == "pending" and body["agent_id"] is None
    assert body["status_message"] == (
        "waiting for capacity: no agent can run it: 2 full (sessions)"
    ), body["status_message"]
    queued = [e for e in body["events"] if e["kind"] == "queued"]
    assert queued and "2 full (sessions)" in queued[-1]["message"]
    pinned_full = fl.create(owner, cluster_id="c1")
    body = wait_for(lambda: queue_reason(fl, pinned_full["id"]), 10, what="a queue reason")
    assert "1 full (sessions)" in body["status_message"]
    assert "1 in another cluster" in body["status_message"]

    # Freeing a slot on c1 places the oldest queued session (creation order) there.
    r = owner.delete(f"/api/v1/sessions/{s_fill['id']}")
    assert r.status_code == 202, r.text
    wait_state(owner, s_fill["id"], "stopped")
    body = wait_state(owner, s_queued["id"], "running", timeout=30)
    assert (body["cluster_id"], body["agent_id"]) == ("c1", id1)
    assert body["status_message"] == ""
    assert fl.get(pinned_full["id"])["state"] == "pending"

    # Freeing c2 does not help the c1-pinned one.
    r = owner.delete(f"/api/v1/sessions/{s_skip['id']}")
    assert r.status_code == 202
    wait_state(owner, s_skip["id"], "stopped")
    assert fl.get(pinned_full["id"])["state"] == "pending"


def test_session_for_a_cluster_without_agents_times_out(fleet: Callable[..., Fleet]) -> None:
    """The cluster's only agent, full, goes away once the session is queued for it (creating a
    session for a cluster with no agent at all is refused at once: test_catalog_availability).
    """
    fl = fleet(queue_timeout_seconds=3)
    agent = fl.agent("c1")
    fl.wait_online(agent)
    leaving = fl.agent("nowhere", max_sessions=0)
    fl.wait_online(leaving)
    owner = fl.admin
    s = fl.create(owner, cluster_id="nowhere")
    body = wait_for(lambda: queue_reason(fl, s["id"]), 10, what="a queue reason")
    assert body["state"] == "pending"
    assert "1 in another cluster" in body["status_message"], body
    leaving.terminate()

    failed = wait_state(owner, s["id"], "failed", timeout=15)
    reason = failed["failure_reason"]
    assert "no agent could take it within 3 s" in reason, reason
    assert "1 in another cluster" in reason, reason
    assert failed["agent_id"] is None and failed["cluster_id"] is None
    assert failed["events"][-1]["kind"] == "timeout"
    assert failed["status_message"] == reason
