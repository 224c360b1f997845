"""Live thumbnails of running sessions, for the Sessions list.

Each list open in a browser asks for every running session's thumbnail every few seconds; the
agent takes one by opening an RFB connection of its own to the session and encoding a frame,
which costs the session's VNC server a full-screen update. So a replica keeps each session's
latest image for `thumbnail_cache_seconds` and lets concurrent requests for the same session
wait for the one capture under way instead of starting their own: ten tabs cost the agent what
one does. The cache is per replica (a few KiB per session, gone after the TTL); whichever
replica takes the request reaches the agent the way viewer streams do (see
StreamBroker.fetch_thumbnail). Access checks are the API's: this module only fetches.
"""

from __future__ import annotations

import asyncio
import time

from streamspace import logs
from streamspace.controlplane.streams import StreamBroker

log = logs.get_logger("streamspace.thumbnails")


class Thumbnails:
    def __init__(self, *, streams: StreamBroker, ttl_seconds: float) -> None:
        self.streams = streams
        self.ttl_seconds = ttl_seconds
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._taking: dict[str, asyncio.Task[bytes]] = {}
        self.captures = 0

    async def get(self, session_id: str, agent_id: str) -> bytes:
        """The session's screen as a JPEG at most `ttl_seconds` old; ConnectionError if the
        agent cannot give one."""
        now = time.monotonic()
        self._sweep(now)
        cached = self._cache.get(session_id)
        if cached is not None:
            return cached[1]
        task = self._taking.get(session_id)
        if task is None:
            task = asyncio.create_task(self._take(session_id, agent_id))
            self._taking[session_id] = task
            task.add_done_callback(_retrieve)
        # Shielded: a caller that goes away (tab closed) does not cancel the others' capture.
        return await asyncio.shield(task)

    async def _take(self, session_id: str, agent_id: str) -> bytes:
        try:
            image = await self.streams.fetch_thumbnail(session_id, agent_id)
        except ConnectionError as exc:
            log.warning("thumbnail_failed", session_id=session_id, agent_id=agent_id, error=exc)
            raise
        finally:
            self._taking.pop(session_id, None)
        self.captures += 1
        self._cache[session_id] = (time.monotonic() + self.ttl_seconds, image)
        return image

    def _sweep(self, now: float) -> None:
        for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[key]


def _retrieve(task: asyncio.Task[bytes]) -> None:
    """Mark the outcome seen: every waiter may have gone before a failed capture ended."""
    if not task.cancelled():
        task.exception()
