"""`FakePeers`: a `controlplane.peers.Peers` that records what a component asked of the other
replicas (this module holds no tests)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from streamspace.controlplane.peers import InProcessPeers, Ticket


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...]
    at: float
    """time.monotonic() when it was made."""


class FakePeers(InProcessPeers):
    """Tickets behave as on one replica; everything meant for other replicas is recorded.
    `reach` says which agents some other replica holds (their frames count as delivered)."""

    broadcasts = True

    def __init__(self, replica_id: str = "r1", reach: set[str] | None = None) -> None:
        super().__init__(replica_id)
        self.reach = reach or set()
        self.calls: list[Call] = []
        self.wakes: list[float] = []
        """When each wake_placers was sent (time.monotonic()), as a list that stays current."""

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append(Call(name, args, time.monotonic()))

    def called(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    async def send_many(self, items: list[tuple[str, Any]]) -> list[bool]:
        self._record("send_many", items)
        return [agent_id in self.reach for agent_id, _ in items]

    async def disconnect_agent(self, agent_id: str, code: str, message: str) -> None:
        self._record("disconnect_agent", agent_id, code, message)

    async def agent_held(self, agent_id: str) -> None:
        self._record("agent_held", agent_id)

    async def agent_released(self, agent_id: str) -> None:
        self._record("agent_released", agent_id)

    def publish_event(self, event: dict[str, Any], owner_id: str) -> None:
        self._record("publish_event", event, owner_id)

    def publish_revocation(self, user_id: str, reason: str) -> None:
        self._record("publish_revocation", user_id, reason)

    def wake_placers(self) -> None:
        self._record("wake_placers")
        self.wakes.append(self.calls[-1].at)

    async def put_ticket(self, ticket: str, value: Ticket, ttl_seconds: int) -> None:
        self._record("put_ticket", ticket, value, ttl_seconds)
        await super().put_ticket(ticket, value, ttl_seconds)
