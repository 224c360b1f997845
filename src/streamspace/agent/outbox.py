"""What the agent sends and when: one writer per control connection, and a backlog so that
Results and session statuses survive a disconnect (at-least-once; the control plane
deduplicates by command_id)."""

from __future__ import annotations

import asyncio
from collections import deque

from websockets.asyncio.client import ClientConnection

from streamspace import protocol
from streamspace.protocol import (
    Ack,
    ErrorMessage,
    Heartbeat,
    Hello,
    Result,
    SessionProgress,
    SessionStatus,
    StreamFailed,
)

Outgoing = (
    Hello | Heartbeat | Ack | Result | SessionStatus | SessionProgress | StreamFailed | ErrorMessage
)
Reliable = Result | SessionStatus


class Wire:
    """One control connection, its outgoing queue and its single writer.

    Only `write_loop` calls `ws.send` for JSON, so frames never interleave and each frame carries
    exactly one message. `in_flight` lets the agent salvage a reliable message whose send was
    interrupted by a disconnect.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.in_flight: Outgoing | None = None

    def send(self, msg: Outgoing) -> None:
        self.queue.put_nowait(msg)

    async def write_loop(self) -> None:
        while True:
            msg = await self.queue.get()
            self.in_flight = msg
            await self.ws.send(protocol.encode(msg))
            self.in_flight = None

    def unsent(self) -> list[Outgoing]:
        items: list[Outgoing] = [self.in_flight] if self.in_flight is not None else []
        self.in_flight = None
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


class Outbox:
    """The live wire (set only between Welcome and disconnect: before Welcome nothing but Hello
    may be sent) and the reliable messages waiting for the next one."""

    def __init__(self) -> None:
        self._wire: Wire | None = None
        self._backlog: deque[Reliable] = deque()

    @property
    def connected(self) -> bool:
        return self._wire is not None

    def send(self, msg: Reliable) -> None:
        """Queue on the live wire, or keep it for the next one (flushed after Welcome)."""
        if self._wire is not None:
            self._wire.send(msg)
        else:
            self._backlog.append(msg)

    def send_if_connected(self, msg: Outgoing) -> None:
        """For messages that mean nothing on a later connection."""
        if self._wire is not None:
            self._wire.send(msg)

    def attach(self, wire: Wire) -> None:
        # Order matters: results produced while disconnected go out before anything new.
        while self._backlog:
            wire.send(self._backlog.popleft())
        self._wire = wire

    def detach(self, wire: Wire) -> bool:
        """Forget the wire and move its undelivered reliable messages back to the backlog;
        True if it was the live one."""
        live = self._wire is wire
        if live:
            self._wire = None
        salvage = [m for m in wire.unsent() if isinstance(m, Result | SessionStatus)]
        self._backlog.extendleft(reversed(salvage))
        return live

    def forget_wire(self) -> None:
        self._wire = None

    def clear(self) -> None:
        """Drop the backlog: it answers commands for an identity that no longer exists."""
        self._backlog.clear()
