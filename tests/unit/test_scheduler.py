from __future__ import annotations

from streamspace.controlplane import scheduler
from streamspace.controlplane.scheduler import AgentSnapshot, Request, place, reserve


def agent(
    aid: str,
    cluster: str = "c1",
    used: int = 0,
    max_sessions: int = 4,
    templates: tuple[str, ...] = ("xterm",),
    **kw: object,
) -> AgentSnapshot:
    base: dict[str, object] = dict(
        id=aid,
        name=aid,
        cluster_id=cluster,
        backend="local",
        online=True,
        draining=False,
        healthy=True,
        templates=frozenset(templates),
        max_sessions=max_sessions,
        cpu_millis=4000,
        memory_mb=4096,
        used_sessions=used,
    )
    base.update(kw)
    return AgentSnapshot(**base)  # type: ignore[arg-type]


REQ = Request("s1", "xterm", 500, 512)


def test_least_loaded_picks_emptiest_agent() -> None:
    d = place([agent("a", used=3), agent("b", used=1)], REQ)
    assert d.agent is not None and d.agent.id == "b"
    assert "least loaded" in d.reason and "cluster c1" in d.reason


def test_bin_packing_fills_the_busiest_agent_that_fits() -> None:
    d = place([agent("a", used=3), agent("b", used=1)], REQ, "bin_packing")
    assert d.agent is not None and d.agent.id == "a"


def test_cluster_constraint_is_honoured() -> None:
    req = Request("s1", "xterm", 500, 512, cluster_id="c2")
    d = place([agent("a", "c1"), agent("b", "c2", used=3)], req)
    assert d.agent is not None and d.agent.id == "b"
    assert "1 in another cluster" in d.reason


def test_no_capacity_explains_every_rejection() -> None:
    agents = [
        agent("full1", used=4),
        agent("full2", used=4),
        agent("other", cluster="c9"),
        agent("off", online=False),
        agent("drain", draining=True),
        agent("cannot", templates=("firefox",)),
    ]
    d = place(agents, Request("s", "xterm", 500, 512, cluster_id="c1"))
    assert d.agent is None
    assert "2 full (sessions)" in d.reason
    assert "1 in another cluster" in d.reason
    assert "1 offline" in d.reason and "1 draining" in d.reason
    assert "1 cannot run the template" in d.reason
    assert d.rejected["sessions"] == 2


def test_cpu_and_memory_limits() -> None:
    big = Request("s", "xterm", 3900, 100)
    d = place([agent("a", used_cpu_millis=200)], big)
    assert d.agent is None and "full (CPU)" in d.reason
    huge = Request("s", "xterm", 100, 4000)
    d = place([agent("a", used_memory_mb=200)], huge)
    assert d.agent is None and "full (memory)" in d.reason


def test_reserve_makes_the_batch_see_earlier_placements() -> None:
    agents = [agent("a", max_sessions=1), agent("b", max_sessions=1)]
    first = place(agents, REQ)
    assert first.agent is not None
    reserve(first.agent, REQ)
    second = place(agents, REQ)
    assert second.agent is not None and second.agent.id != first.agent.id
    reserve(second.agent, REQ)
    assert place(agents, REQ).agent is None


def test_no_agents_at_all() -> None:
    assert place([], REQ).reason == "no agent is enrolled"


def test_unhealthy_agent_skipped() -> None:
    d = place([agent("a", healthy=False)], REQ)
    assert d.agent is None and scheduler.REJECT_REASONS["unhealthy"] in d.reason
