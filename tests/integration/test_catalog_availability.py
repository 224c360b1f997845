"""The catalog shows what can run, with real agents (local backend) behind a real control plane:
each template says whether an online agent can run it now and, if not, why; launching one no
agent can run is a 409 naming the reason instead of a session queued until it times out."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from test_agents_support import (
    FAST,
    Fleet,
    _needs_xvnc,  # noqa: F401 - fixture
    _no_xvnc_left_behind,  # noqa: F401 - fixture
    fleet,  # noqa: F401 - fixture
)

from conftest import wait_for, wait_state

pytestmark = pytest.mark.xvnc

MISSING = "gimp"
"""A template of the default catalog whose program this machine does not have."""


@pytest.fixture(autouse=True)
def _gimp_is_not_installed() -> None:
    if shutil.which(MISSING):
        pytest.skip(f"{MISSING} is installed here; the tests need a template no agent can run")


def catalog(c: httpx.Client, **params: str) -> dict[str, dict[str, Any]]:
    r = c.get("/api/v1/templates", params=params)
    assert r.status_code == 200, r.text
    return {t["name"]: t for t in r.json()}


def assert_unavailable(r: httpx.Response, *fragments: str) -> dict[str, Any]:
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    assert body["type"].endswith("/template-unavailable"), body
    for fragment in fragments:
        assert fragment in body["detail"] and fragment in body["unavailable_reason"], body
    return body


def test_the_catalog_says_what_the_online_agent_can_run_and_refuses_the_rest(
    fleet: Callable[..., Fleet],
) -> None:
    fl = fleet()
    fl.wait_online(fl.agent("c1"))
    wait_for(lambda: catalog(fl.admin)["xterm"]["available"], 10, what="xterm available")
    admin_view = catalog(fl.admin)
    assert admin_view["xterm"]["unavailable_reason"] is None
    gimp = admin_view[MISSING]
    assert gimp["available"] is False
    assert gimp["unavailable_reason"] == "no agent has `gimp` installed"
    one = fl.admin.get(f"/api/v1/templates/{MISSING}").json()
    assert (one["available"], one["unavailable_reason"]) == (False, gimp["unavailable_reason"])

    # Hidden from users by default; admins see it with the reason.
    user = fl.user()
    user_view = catalog(user)
    assert user_view["xterm"]["available"] is True
    assert MISSING not in user_view
    assert user.get(f"/api/v1/templates/{MISSING}").status_code == 404

    # Launching it is refused at once, with the reason; nothing is queued.
    body = assert_unavailable(
        user.post("/api/v1/sessions", json={"template": MISSING}), "no agent has `gimp` installed"
    )
    assert body["template"] == MISSING
    assert user.get("/api/v1/sessions").json()["total"] == 0
    running = fl.create(user)
    wait_state(user, running["id"], "running")


def test_with_no_agent_online_every_template_is_unavailable(fleet: Callable[..., Fleet]) -> None:
    fl = fleet(agent_offline_after_seconds=3)
    view = catalog(fl.admin)
    assert view and all(not t["available"] for t in view.values()), view
    assert {t["unavailable_reason"] for t in view.values()} == {
        "no agent online (none is enrolled)"
    }
    assert_unavailable(fl.admin.post("/api/v1/sessions", json={"template": "xterm"}), "no agent")

    # An agent that goes away takes its templates with it once it is offline (while it is
    # only stale, a reconnect may be under way: sessions would queue for it).
    agent = fl.agent("c1")
    fl.wait_online(agent)
    assert catalog(fl.admin)["xterm"]["available"]
    agent.terminate()
    wait_for(lambda: not catalog(fl.admin)["xterm"]["available"], 15, what="xterm gone")
    assert fl.agent_view(fl.agent_id(agent))["status"] == "offline"
    assert catalog(fl.admin)["xterm"]["unavailable_reason"] == "no agent online"
    assert_unavailable(
        fl.admin.post("/api/v1/sessions", json={"template": "xterm"}), "no agent online"
    )


def test_users_see_unavailable_templates_greyed_when_hiding_is_off(
    fleet: Callable[..., Fleet],
) -> None:
    fl = fleet(catalog_hide_unavailable=False)
    fl.wait_online(fl.agent("c1"))
    user = fl.user()
    view = catalog(user)
    assert view["xterm"]["available"] is True
    assert view[MISSING]["available"] is False
    assert view[MISSING]["unavailable_reason"] == "no agent has `gimp` installed"
    assert user.get(f"/api/v1/templates/{MISSING}").json()["available"] is False
    assert_unavailable(user.post("/api/v1/sessions", json={"template": MISSING}), "gimp")


def test_availability_is_for_the_cluster_the_request_names(fleet: Callable[..., Fleet]) -> None:
    fl = fleet()
    fl.wait_online(fl.agent("c1"))
    assert catalog(fl.admin, cluster_id="c1")["xterm"]["available"]
    elsewhere = catalog(fl.admin, cluster_id="c2")["xterm"]
    assert elsewhere["available"] is False
    assert elsewhere["unavailable_reason"] == (
        "no agent online in cluster c2; agents in other clusters can run it"
    )
    user = fl.user()
    assert "xterm" not in catalog(user, cluster_id="c2")
    assert_unavailable(
        user.post("/api/v1/sessions", json={"template": "xterm", "cluster_id": "c2"}),
        "no agent online in cluster c2",
    )
    placed = fl.create(user, cluster_id="c1")
    assert wait_state(user, placed["id"], "running")["cluster_id"] == "c1"


def test_a_full_agent_keeps_its_templates_available_and_a_draining_one_does_not(
    fleet: Callable[..., Fleet],
) -> None:
    """Busy is not unavailable: a session for a full agent's template queues. Only an agent
    that takes no session at all (draining) makes it unavailable."""
    fl = fleet()
    agent = fl.agent("c1", max_sessions=1)
    agent_id = fl.wait_online(agent)["id"]
    first = fl.create(fl.admin)
    wait_state(fl.admin, first["id"], "running")
    assert catalog(fl.admin)["xterm"]["available"]
    queued = fl.create(fl.admin)
    body = wait_for(
        lambda: (
            (s := fl.get(queued["id"]))["status_message"].startswith("waiting for capacity") and s
        ),
        10,
        what="the second session queued",
    )
    assert body["state"] == "pending" and "full (sessions)" in body["status_message"]

    r = fl.admin.post(f"/api/v1/agents/{agent_id}/drain")
    assert r.status_code == 200, r.text
    xterm = catalog(fl.admin)["xterm"]
    assert xterm["available"] is False
    assert xterm["unavailable_reason"] == "no agent takes new sessions: 1 draining"
    assert_unavailable(fl.admin.post("/api/v1/sessions", json={"template": "xterm"}), "draining")
    assert fl.admin.post(f"/api/v1/agents/{agent_id}/undrain").status_code == 200
    assert catalog(fl.admin)["xterm"]["available"]


def test_every_replica_answers_from_the_agents_rows(
    pg_url: str, make_control_plane: Any, fleet: Callable[..., Fleet]
) -> None:
    """The agent's socket is on one replica; another replica, holding no socket, says the same
    (availability is read from the database, not from this replica's connections)."""
    fl = fleet(database_url=pg_url)
    fl.wait_online(fl.agent("c1"))
    other = make_control_plane(database_url=pg_url, **FAST)
    with other.login() as admin:
        view = catalog(admin)
        assert view["xterm"]["available"] is True
        assert view[MISSING]["unavailable_reason"] == "no agent has `gimp` installed"
        assert_unavailable(admin.post("/api/v1/sessions", json={"template": MISSING}), "gimp")
