"""The agent's parts that are plain bookkeeping, tested without a control plane: what survives a
disconnect and in which order, what the agent reports as its load, how reconnects back off."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from streamspace.agent.connection import Backoff
from streamspace.agent.outbox import Outbox, Wire
from streamspace.agent.sessions import SessionTable
from streamspace.protocol import Ack, Heartbeat, Load, Resources, Result, SessionSpec, SessionStatus


def _wire() -> Wire:
    return Wire(cast(Any, None))  # the queue only: nothing here writes to a socket


def _queued(wire: Wire) -> list[object]:
    items = []
    while not wire.queue.empty():
        items.append(wire.queue.get_nowait())
    return items


def test_results_made_while_disconnected_go_out_first_and_in_order() -> None:
    outbox = Outbox()
    first, second = Result(command_id="c1", ok=True), Result(command_id="c2", ok=False, error="x")
    outbox.send(first)
    outbox.send(second)
    assert not outbox.connected
    wire = _wire()
    outbox.attach(wire)
    assert outbox.connected
    outbox.send_if_connected(Ack(command_id="c3"))
    assert _queued(wire) == [first, second, Ack(command_id="c3")]


def test_a_disconnect_keeps_undelivered_reliable_messages_only() -> None:
    outbox = Outbox()
    wire = _wire()
    outbox.attach(wire)
    status = SessionStatus(session_id="s", state="exited", reason="gone")
    result = Result(command_id="c1", ok=True)
    wire.in_flight = result
    wire.send(Heartbeat(load=Load(sessions=0, cpu_millis=0, memory_mb=0), healthy=True))
    wire.send(status)
    assert outbox.detach(wire) is True
    assert outbox.detach(_wire()) is False
    next_wire = _wire()
    outbox.attach(next_wire)
    assert _queued(next_wire) == [result, status]


def test_nothing_but_reliable_messages_waits_for_a_connection() -> None:
    outbox = Outbox()
    outbox.send_if_connected(Ack(command_id="c1"))
    outbox.send(Result(command_id="c2", ok=True))
    outbox.clear()
    wire = _wire()
    outbox.attach(wire)
    assert _queued(wire) == []


def _spec(session_id: str, cpu: int, mem: int) -> SessionSpec:
    return SessionSpec(
        session_id=session_id,
        user_id="u1",
        user="alice",
        template="xterm",
        resources=Resources(cpu_millis=cpu, memory_mb=mem),
    )


def test_load_counts_adopted_sessions_without_their_resources() -> None:
    table = SessionTable()
    table.started("a", _spec("a", 500, 256))
    table.started("b", _spec("b", 1000, 512))
    table.reconcile(running={"a", "b", "adopted"}, keep={"a", "b", "adopted"})
    assert table.load() == Load(sessions=3, cpu_millis=1500, memory_mb=768)
    table.ended("b")
    assert table.load() == Load(sessions=2, cpu_millis=500, memory_mb=256)


async def test_reconcile_forgets_sessions_no_longer_running_unless_a_command_holds_them() -> None:
    table = SessionTable()
    table.started("idle", _spec("idle", 500, 256))
    table.started("busy", _spec("busy", 500, 256))
    async with table.turn("busy"):
        assert table.busy("busy") and not table.busy("idle")
        table.reconcile(running=set(), keep={"idle", "busy"})
        assert table.load().sessions == 1
    assert not table.busy("busy")


async def test_one_turn_per_session() -> None:
    table = SessionTable()
    order: list[str] = []

    async def work(name: str) -> None:
        async with table.turn("s"):
            order.append(f"{name}+")
            await asyncio.sleep(0.01)
            order.append(f"{name}-")

    await asyncio.gather(work("start"), work("stop"))
    assert order == ["start+", "start-", "stop+", "stop-"]


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0)
    delays = [backoff.next_delay() for _ in range(8)]
    for delay, base in zip(delays, [0.5, 1, 2, 4, 4, 4, 4, 4], strict=True):
        assert base / 2 <= delay <= base
    backoff.reset()
    assert backoff.next_delay() <= 0.5
