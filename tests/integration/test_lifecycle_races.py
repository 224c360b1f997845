"""Results that race user actions: the session must end where the agent says it is.

Replayed on a real control plane and database, with the rows as the race leaves them (the race
itself needs two transactions interleaved at one statement, so it is set up, not waited for).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from conftest import ControlPlane
from streamspace import protocol
from streamspace.db.models import Agent, AgentCommand, SessionEvent, User
from streamspace.db.models import Session as SessionRow


def test_a_stop_overtaken_by_the_hibernate_result_still_ends_stopped(tmp_path: Path) -> None:
    """Disable (hibernate) then stop: the results loop read the row while it was hibernating
    and wrote `hibernated` over the `stopping` the stop had committed meanwhile; the agent
    then stopped the session. Before, its stop result was ignored and the session stayed
    hibernated for good while nothing ran on the agent."""
    cp = ControlPlane(tmp_path / "cp").start()
    try:

        async def race() -> tuple[str, list[tuple[str, str]]]:
            async with cp.state.db() as db:
                owner = await db.scalar(select(User).where(User.username == "admin"))
                assert owner is not None
                agent = Agent(
                    name="a",
                    cluster_id="c",
                    cluster_name="C",
                    backend="local",
                    credential_hash="x",
                )
                db.add(agent)
                await db.flush()
                session = SessionRow(
                    owner_id=owner.id,
                    template_name="xterm",
                    state="hibernated",
                    agent_id=agent.id,
                    cpu_millis=500,
                    memory_mb=512,
                    idle_timeout_seconds=60,
                    max_duration_seconds=600,
                )
                db.add(session)
                await db.flush()
                stop = AgentCommand(
                    agent_id=agent.id, session_id=session.id, action="stop", status="acked"
                )
                db.add(stop)
                await db.commit()
                ids: dict[str, Any] = {"agent": agent.id, "session": session.id, "cmd": stop.id}
            await cp.state.lifecycle.results.on_results(
                [(ids["agent"], protocol.Result(command_id=ids["cmd"], ok=True))]
            )
            async with cp.state.db() as db:
                row = await db.get(SessionRow, ids["session"])
                assert row is not None
                events = (
                    await db.scalars(
                        select(SessionEvent)
                        .where(SessionEvent.session_id == row.id)
                        .order_by(SessionEvent.at)
                    )
                ).all()
                return row.state, [(e.kind, e.message) for e in events]

        state, events = cp.run(race())
        assert state == "stopped"
        assert ("stopping", "stop requested while hibernating") in events
        assert events[-1][0] == "stopped"
    finally:
        cp.stop()
