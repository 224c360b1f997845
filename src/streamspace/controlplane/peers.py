"""What crosses replicas, as one small interface with one implementation per deployment shape.

A replica talks to the others for a handful of things only: a frame for an agent whose socket
another replica holds, closing such an agent's socket, a UI event, a revocation, a wake-up for
the placer on the lease holder, and stream tickets (issued on one replica, used on any). The
components that need one of these take a `Peers` and call it the same way whether there is one
replica (`InProcessPeers`: nobody else to tell, tickets in memory) or several
(`redis_peers.RedisPeers`). Which one runs is decided once, when the app is built
(`wiring.build_state`). What arrives from other replicas is handed to an `Inbox`, the local side
of the same operations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

TicketPurpose = Literal["stream", "download"]


@dataclass(frozen=True)
class Ticket:
    session_id: str
    user_id: str
    expires_at: datetime
    token_version: int
    """The user's token_version when the ticket was issued: a ticket issued before a sign-out
    opens nothing after it."""
    purpose: TicketPurpose = "stream"
    """What it opens: a viewer socket, or one file download (never the other)."""
    path: str = ""
    """For a download: the file or folder, relative to the home, fixed when it was issued."""


class Inbox(Protocol):
    """This replica's side of what other replicas ask for (see wiring.PeerInbox)."""

    def held_agents(self) -> Iterable[str]:
        """Agents whose socket this replica holds now."""
        ...

    def offer_frame(self, agent_id: str, frame: str) -> bool | None:
        """Queue an encoded frame for a held agent without waiting: None if the agent is not
        held here, False if its queue is full."""
        ...

    async def disconnect_agent(self, agent_id: str, code: str, message: str) -> None: ...

    def deliver_event(self, event: dict[str, Any], owner_id: str) -> None: ...

    def apply_revocation(self, user_id: str, reason: str) -> None: ...

    def wake_placer(self) -> None: ...


class Peers(Protocol):
    replica_id: str

    @property
    def broadcasts(self) -> bool:
        """True when an event published here can reach watchers on other replicas."""
        ...

    def start(self, inbox: Inbox) -> None: ...

    async def close(self) -> None: ...

    async def send_many(self, items: list[tuple[str, Any]]) -> list[bool]:
        """Frames for agents this replica does not hold; True where another replica took one."""
        ...

    async def disconnect_agent(self, agent_id: str, code: str, message: str) -> None:
        """Close an agent's socket held by another replica."""
        ...

    async def agent_held(self, agent_id: str) -> None:
        """This replica now holds the agent's socket: frames for it are to come here."""
        ...

    async def agent_released(self, agent_id: str) -> None: ...

    def publish_event(self, event: dict[str, Any], owner_id: str) -> None: ...

    def publish_revocation(self, user_id: str, reason: str) -> None: ...

    def wake_placers(self) -> None:
        """Tell the other replicas (the lease holder among them) that placement work arrived."""
        ...

    async def put_ticket(self, ticket: str, value: Ticket, ttl_seconds: int) -> None: ...

    async def take_ticket(self, ticket: str) -> Ticket | None:
        """Single use: the ticket is gone after this, found or not."""
        ...


class InProcessPeers:
    """One replica: there is nobody else to tell, and tickets live in this process."""

    broadcasts = False

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self._tickets: dict[str, Ticket] = {}

    def start(self, inbox: Inbox) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send_many(self, items: list[tuple[str, Any]]) -> list[bool]:
        return [False] * len(items)

    async def disconnect_agent(self, agent_id: str, code: str, message: str) -> None:
        pass

    async def agent_held(self, agent_id: str) -> None:
        pass

    async def agent_released(self, agent_id: str) -> None:
        pass

    def publish_event(self, event: dict[str, Any], owner_id: str) -> None:
        pass

    def publish_revocation(self, user_id: str, reason: str) -> None:
        pass

    def wake_placers(self) -> None:
        pass

    async def put_ticket(self, ticket: str, value: Ticket, ttl_seconds: int) -> None:
        """Issuing one sweeps the expired ones out of memory."""
        at = datetime.now(UTC)
        for key in [k for k, t in self._tickets.items() if t.expires_at <= at]:
            del self._tickets[key]
        self._tickets[ticket] = value

    async def take_ticket(self, ticket: str) -> Ticket | None:
        return self._tickets.pop(ticket, None)
