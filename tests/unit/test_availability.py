"""Whether a template can run now, and why not: the scheduler's filters, as the catalog and a
create ask them (`Placer.availability`)."""

from __future__ import annotations

import pytest
from test_scheduler import agent

from streamspace.controlplane.scheduler import Placer, Request, TemplateNeeds

XTERM = TemplateNeeds("xterm", local_command="xterm", image="streamspace/xterm:latest")
GIMP = TemplateNeeds("gimp", local_command="gimp", image="streamspace/gimp:latest")


def test_a_template_an_online_agent_lists_is_available() -> None:
    can = Placer([agent("a")]).availability(XTERM)
    assert can.available and can.reason is None


def test_a_full_agent_still_makes_it_available_and_placement_queues() -> None:
    """Busy is not unavailable: the session waits for capacity, as before."""
    placer = Placer([agent("a", used=4, max_sessions=4)])
    assert placer.availability(XTERM).available
    decision = placer.place(Request("s1", "xterm", 500, 512))
    assert decision.agent is None and "full (sessions)" in decision.reason


def test_no_agent_enrolled_or_online() -> None:
    assert Placer([]).availability(XTERM).reason == "no agent online (none is enrolled)"
    can = Placer([agent("a", online=False), agent("b", online=False)]).availability(XTERM)
    assert not can.available and can.reason == "no agent online"


def test_an_uninstalled_program_is_named() -> None:
    can = Placer([agent("a"), agent("b")]).availability(GIMP)
    assert not can.available and can.reason == "no agent has `gimp` installed"


def test_a_docker_agent_names_the_missing_image_and_a_mixed_fleet_names_both() -> None:
    docker = agent("d", backend="docker", templates=())
    can = Placer([docker]).availability(GIMP)
    assert can.reason == "agents with the docker backend have no image `streamspace/gimp:latest`"
    can = Placer([docker, agent("l")]).availability(GIMP)
    assert can.reason == (
        "agents with the docker backend have no image `streamspace/gimp:latest`; "
        "no agent with the local backend has `gimp` installed"
    )


def test_a_template_without_a_launch_for_the_backend_says_so() -> None:
    no_local = TemplateNeeds("web", image="streamspace/web:latest")
    assert Placer([agent("a")]).availability(no_local).reason == (
        "agents with the local backend cannot run it (it has no local launch)"
    )
    no_image = TemplateNeeds("tool", local_command="tool")
    assert Placer([agent("d", backend="docker", templates=())]).availability(no_image).reason == (
        "agents with the docker backend cannot run it (it has no image)"
    )


def test_a_local_agent_that_runs_nothing_points_at_its_health() -> None:
    can = Placer([agent("a", templates=())]).availability(XTERM)
    assert can.reason == "agents with the local backend can run no template now (see their health)"


@pytest.mark.parametrize(
    ("state", "expected"),
    [({"draining": True}, "1 draining"), ({"healthy": False}, "1 unhealthy")],
)
def test_an_agent_that_takes_no_sessions_makes_its_templates_unavailable(
    state: dict[str, bool], expected: str
) -> None:
    can = Placer([agent("a", **state)]).availability(XTERM)  # type: ignore[arg-type]
    assert not can.available and can.reason == f"no agent takes new sessions: {expected}"


def test_the_only_capable_agent_draining_is_named_beside_what_the_others_lack() -> None:
    can = Placer([agent("a", draining=True, templates=("gimp",)), agent("b")]).availability(GIMP)
    assert not can.available
    assert can.reason == (
        "no agent has `gimp` installed; agents that have it take no sessions now: 1 draining"
    )


def test_availability_is_per_cluster_when_one_is_named() -> None:
    placer = Placer([agent("a", "c1"), agent("b", "c2", templates=("gimp",))])
    assert placer.availability(GIMP).available
    assert placer.availability(GIMP, "c2").available
    c1 = placer.availability(GIMP, "c1")
    assert not c1.available
    assert c1.reason == "no agent has `gimp` installed; agents in other clusters can run it"
    nowhere = placer.availability(XTERM, "c9")
    assert not nowhere.available
    assert nowhere.reason == "no agent online in cluster c9; agents in other clusters can run it"


def test_a_reconnecting_agent_keeps_its_templates_available_until_it_is_offline() -> None:
    """Stale (its socket dropped a moment ago, a replica failing over): the session queues for
    its return, as placement would leave it waiting; offline, the template is unavailable."""
    placer = Placer([agent("a", online=False, stale=True)])
    assert placer.availability(XTERM).available
    assert placer.availability(XTERM, "c1").available
    assert not placer.availability(XTERM, "c2").available
    assert not placer.availability(GIMP).available
    assert placer.place(Request("s1", "xterm", 500, 512)).agent is None
    draining = Placer([agent("a", online=False, stale=True, draining=True)])
    assert not draining.availability(XTERM).available
    gone = Placer([agent("a", online=False)]).availability(XTERM)
    assert (gone.available, gone.reason) == (False, "no agent online")
