"""Heartbeats are written in batches, the latest per agent; templates ride on a heartbeat only
when they change, so a later beat without them must not drop them before the batch is written
(the catalog's availability reads them from the agent's row)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from streamspace import protocol
from streamspace.controlplane.agentsocket import AgentEndpoint


def beat(templates: list[str] | None = None, sessions: int = 0) -> protocol.Heartbeat:
    load = protocol.Load(sessions=sessions, cpu_millis=0, memory_mb=0)
    return protocol.Heartbeat(load=load, templates=templates)


def endpoint() -> AgentEndpoint:
    none: Any = None
    return AgentEndpoint(
        db=none,
        settings=none,
        replica_id="r",
        hub=none,
        results=none,
        placement=none,
        streams=none,
    )


def test_a_later_beat_without_templates_keeps_the_pending_ones() -> None:
    ep = endpoint()
    ep._beats["a"] = (datetime.now(UTC), beat(["xterm", "new"]))
    merged = ep._merged("a", beat(sessions=2))
    assert merged.templates == ["xterm", "new"] and merged.load.sessions == 2


def test_a_later_beat_with_templates_replaces_them_and_nothing_pending_changes_nothing() -> None:
    ep = endpoint()
    ep._beats["a"] = (datetime.now(UTC), beat(["xterm", "new"]))
    assert ep._merged("a", beat(["xterm"])).templates == ["xterm"]
    assert ep._merged("b", beat()).templates is None
