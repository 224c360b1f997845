"""Cross-replica routing over Redis: agent messages, UI events and stream tickets.

Each replica subscribes to its own channel `ss:replica:<id>`. A replica that must reach an agent
held by another replica looks up `agents.connected_replica` and publishes the frame there; Redis
answers how many subscribers got it, so a dead replica is noticed at once (the command then stays
pending in the database and is re-sent when the agent reconnects somewhere). Events fan out on
`ss:events`; tickets live in Redis with a TTL and are consumed atomically with GETDEL, so a ticket
issued on one replica opens a stream on any other. See docs/scaling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from sqlalchemy import select

from streamspace import protocol
from streamspace.controlplane import metrics
from streamspace.db.models import Agent

if TYPE_CHECKING:
    from streamspace.controlplane.state import AppState

log = logging.getLogger("streamspace.router")

EVENTS_CHANNEL = "ss:events"
PLACER_CHANNEL = "ss:placer"
TICKET_PREFIX = "ss:ticket:"


def replica_channel(replica_id: str) -> str:
    return f"ss:replica:{replica_id}"


class RedisRouter:
    def __init__(self, state: AppState, url: str) -> None:
        self.state = state
        self.url = url
        pool = BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=5, socket_timeout=5, socket_connect_timeout=3
        )
        self.redis: Redis = Redis(connection_pool=pool)
        """A blocking pool: bursts wait for a connection instead of failing."""
        self._task: asyncio.Task[None] | None = None
        self._owner_cache: dict[str, tuple[float, str]] = {}
        self.forwarded = 0
        self.delivered = 0

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.state.hub.remote_send = self.send_to_agent
        self.state.hub.remote_disconnect = self.disconnect_agent
        self.state.hub.remote_send_many = self.send_many
        self.state.events.remote_publish = self.publish_event
        self.state.lifecycle.remote_wake = self.wake_placers
        self._task = asyncio.create_task(self._listen(), name="redis-router")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _listen(self) -> None:
        """Subscribe and dispatch; after a Redis restart, subscribe again (with backoff)."""
        delay = 0.2
        channels = (replica_channel(self.state.replica_id), EVENTS_CHANNEL, PLACER_CHANNEL)
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*channels)
                log.info("router_subscribed replica=%s", self.state.replica_id)
                delay = 0.2
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    await self._handle(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("router_disconnected replica=%s error=%r", self.state.replica_id, exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _handle(self, channel: bytes, data: bytes) -> None:
        if channel.decode() == PLACER_CHANNEL:
            if data.decode() != self.state.replica_id:
                self.state.lifecycle.wake_placer(local_only=True)
            return
        try:
            body = json.loads(data)
        except ValueError:
            return
        if channel.decode() == EVENTS_CHANNEL:
            if body.get("origin") != self.state.replica_id:
                self.state.events.deliver(body["event"], owner_id=body["owner_id"])
            return
        kind = body.get("kind")
        hub = self.state.hub
        if kind == "to_agent":
            conn = hub.connections.get(body["agent_id"])
            if conn is not None:
                await conn.queue.put(body["frame"])
                self.delivered += 1
                if isinstance(published := body.get("published_at"), float):
                    metrics.forward_seconds.observe(max(0.0, time.time() - published))
        elif kind == "disconnect_agent":
            await hub.disconnect(body["agent_id"], body["code"], body["message"], local_only=True)

    # ---- agents ---------------------------------------------------------------------------

    async def _holder(self, agent_id: str) -> str:
        cached = self._owner_cache.get(agent_id)
        if cached is not None and time.monotonic() - cached[0] < 1.0:
            return cached[1]
        async with self.state.db() as db:
            holder = await db.scalar(select(Agent.connected_replica).where(Agent.id == agent_id))
        holder = holder or ""
        self._owner_cache[agent_id] = (time.monotonic(), holder)
        return holder

    async def send_to_agent(self, agent_id: str, msg: Any) -> bool:
        """Deliver to the replica holding the agent; False if none got it."""
        holder = await self._holder(agent_id)
        if not holder or holder == self.state.replica_id:
            self._owner_cache.pop(agent_id, None)
            return False
        payload = _to_agent_payload(agent_id, msg)
        try:
            receivers = await self.redis.publish(replica_channel(holder), payload)
        except (RedisError, OSError) as exc:
            log.warning("router_publish_failed agent_id=%s error=%r", agent_id, exc)
            return False
        if not receivers:
            self._owner_cache.pop(agent_id, None)
            return False
        self.forwarded += 1
        return True

    async def send_many(self, items: list[tuple[str, Any]]) -> list[bool]:
        """Many frames in one holder lookup and one pipelined round trip to Redis."""
        agent_ids = {agent_id for agent_id, _ in items}
        async with self.state.db() as db:
            rows = await db.execute(
                select(Agent.id, Agent.connected_replica).where(Agent.id.in_(agent_ids))
            )
            holders = {agent_id: replica for agent_id, replica in rows.all()}
        targets: list[tuple[int, str, str]] = []
        for i, (agent_id, msg) in enumerate(items):
            holder = holders.get(agent_id) or ""
            if holder and holder != self.state.replica_id:
                targets.append((i, holder, _to_agent_payload(agent_id, msg)))
        results = [False] * len(items)
        if not targets:
            return results
        try:
            pipe = self.redis.pipeline(transaction=False)
            for _, holder, payload in targets:
                pipe.publish(replica_channel(holder), payload)
            counts = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("router_publish_failed count=%d error=%r", len(targets), exc)
            return results
        for (i, _, _), receivers in zip(targets, counts, strict=True):
            results[i] = bool(receivers)
        self.forwarded += sum(results)
        return results

    async def disconnect_agent(self, agent_id: str, code: str, message: str) -> None:
        holder = await self._holder(agent_id)
        if not holder or holder == self.state.replica_id:
            return
        payload = json.dumps(
            {"kind": "disconnect_agent", "agent_id": agent_id, "code": code, "message": message}
        )
        with contextlib.suppress(RedisError, OSError):
            await self.redis.publish(replica_channel(holder), payload)

    # ---- events ---------------------------------------------------------------------------

    def publish_event(self, event: dict[str, Any], owner_id: str) -> None:
        payload = json.dumps(
            {"event": event, "owner_id": owner_id, "origin": self.state.replica_id}
        )
        task = asyncio.create_task(self._publish(payload))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def wake_placers(self) -> None:
        """Tell the other replicas (the lease holder among them) that placement work arrived."""
        task = asyncio.create_task(self._publish(self.state.replica_id, PLACER_CHANNEL))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _publish(self, payload: str, channel: str = EVENTS_CHANNEL) -> None:
        try:
            await self.redis.publish(channel, payload)
        except (RedisError, OSError) as exc:
            log.warning("router_event_publish_failed error=%r", exc)

    # ---- tickets --------------------------------------------------------------------------

    async def put_ticket(self, ticket: str, value: dict[str, str], ttl_seconds: int) -> None:
        await self.redis.set(TICKET_PREFIX + ticket, json.dumps(value), ex=ttl_seconds)

    async def take_ticket(self, ticket: str) -> dict[str, str] | None:
        raw = await self.redis.getdel(TICKET_PREFIX + ticket)
        if raw is None:
            return None
        value: dict[str, str] = json.loads(raw)
        return value


def _to_agent_payload(agent_id: str, msg: Any) -> str:
    """A frame for the replica holding the agent; `published_at` feeds its forward histogram."""
    return json.dumps(
        {
            "kind": "to_agent",
            "agent_id": agent_id,
            "frame": protocol.encode(msg),
            "published_at": time.time(),
        }
    )
