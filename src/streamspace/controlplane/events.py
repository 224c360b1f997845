"""Live updates for the UI: session changes fan out to the owner's (and admins') streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from streamspace.controlplane.peers import Peers


@dataclass(eq=False)
class Subscriber:
    user_id: str
    sees_all: bool
    queue: asyncio.Queue[dict[str, Any]]
    closed: bool = False

    def close(self, reason: str) -> None:
        """End the stream: what is queued is dropped and `revoked` is the last event."""
        self.closed = True
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                self.queue.get_nowait()
        self.queue.put_nowait({"type": "revoked", "reason": reason})


class EventBus:
    """In-process fan-out. A slow subscriber loses old events rather than growing memory;
    the UI re-fetches the list when it sees a `resync` event."""

    def __init__(self, *, peers: Peers, queue_size: int = 256) -> None:
        self._subs: set[Subscriber] = set()
        self._queue_size = queue_size
        self.peers = peers

    def publish(self, event: dict[str, Any], *, owner_id: str, local_only: bool = False) -> None:
        self.deliver(event, owner_id=owner_id)
        if not local_only:
            self.peers.publish_event(event, owner_id)

    def deliver(self, event: dict[str, Any], *, owner_id: str) -> None:
        for sub in list(self._subs):
            if sub.closed or not (sub.sees_all or sub.user_id == owner_id):
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    while True:
                        sub.queue.get_nowait()
                sub.queue.put_nowait({"type": "resync"})

    @contextlib.asynccontextmanager
    async def subscribe(self, user_id: str, sees_all: bool) -> AsyncIterator[Subscriber]:
        sub = Subscriber(user_id, sees_all, asyncio.Queue(self._queue_size))
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @property
    def watched(self) -> bool:
        """Whether an event published now can reach anyone (here or on another replica)."""
        return bool(self._subs) or self.peers.broadcasts
