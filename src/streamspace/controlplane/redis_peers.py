"""Cross-replica routing over Redis: agent messages, UI events and stream tickets.

A replica holding an agent's socket subscribes to that agent's channel `ss:agent:<id>` for as
long as it holds it. Any replica reaches the agent by publishing there, with no lookup of who
holds it; Redis answers how many subscribers got the frame, so an agent held by nobody (or by a
replica that just died, whose subscriptions died with its connection) is noticed at once: the
command then stays pending in the database and is re-sent when the agent reconnects somewhere.
Events fan out on `ss:events`; revocations (a user signed out, disabled or deleted) on
`ss:revoke`, so every replica closes that user's viewer and event streams and forgets the user's
cached row; tickets live in Redis with a TTL and are consumed atomically with GETDEL, so a ticket
issued on one replica opens a stream on any other. See docs/scaling.md and docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from streamspace import logs, protocol
from streamspace.controlplane import metrics
from streamspace.controlplane.peers import Inbox, Ticket

log = logs.get_logger("streamspace.router")

EVENTS_CHANNEL = "ss:events"
PLACER_CHANNEL = "ss:placer"
REVOKE_CHANNEL = "ss:revoke"
TICKET_PREFIX = "ss:ticket:"


AGENT_PREFIX = "ss:agent:"


def agent_channel(agent_id: str) -> str:
    return AGENT_PREFIX + agent_id


class RedisPeers:
    """`peers.Peers` over Redis: pub/sub channels and keys with a TTL."""

    broadcasts = True

    def __init__(self, *, url: str, replica_id: str) -> None:
        self.replica_id = replica_id
        self.url = url
        pool = BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=5, socket_timeout=5, socket_connect_timeout=3
        )
        self.redis: Redis = Redis(connection_pool=pool)
        """A blocking pool: bursts wait for a connection instead of failing."""
        self._task: asyncio.Task[None] | None = None
        self._pubsub: PubSub | None = None
        self._subscriptions = asyncio.Lock()
        """Serialises (un)subscribing, so a quick disconnect + reconnect of one agent cannot
        end up unsubscribed while the agent is held here."""
        self.delivered = 0
        self.dropped = 0
        self._inbox: Inbox | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def bind(self, inbox: Inbox) -> None:
        """Where messages from other replicas go (without listening yet)."""
        self._inbox = inbox

    @property
    def inbox(self) -> Inbox:
        if self._inbox is None:
            raise RuntimeError("RedisPeers used before start(inbox)")
        return self._inbox

    def start(self, inbox: Inbox) -> None:
        self.bind(inbox)
        self._task = asyncio.create_task(self._listen(), name="redis-router")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _listen(self) -> None:
        """Subscribe and dispatch; after a Redis restart, subscribe again (with backoff) to the
        shared channels and to the channel of every agent held here."""
        delay = 0.2
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                async with self._subscriptions:
                    held = [agent_channel(a) for a in self.inbox.held_agents()]
                    await pubsub.subscribe(EVENTS_CHANNEL, PLACER_CHANNEL, REVOKE_CHANNEL, *held)
                    self._pubsub = pubsub
                log.event("router_subscribed", replica=self.replica_id, agents=len(held))
                delay = 0.2
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    await self._handle(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("router_disconnected", replica=self.replica_id, error=exc)
            finally:
                if self._pubsub is pubsub:
                    self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def agent_held(self, agent_id: str) -> None:
        """This replica now holds the agent's socket: frames for it are to come here."""
        async with self._subscriptions:
            if self._pubsub is None:  # not subscribed now: _listen includes it when it is
                return
            try:
                # Bounded: with Redis gone this would retry its reconnects for seconds while the
                # agent waits for its welcome; the listener's resubscription covers it anyway.
                await asyncio.wait_for(self._pubsub.subscribe(agent_channel(agent_id)), 2)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("router_subscribe_failed", agent_id=agent_id, error=exc)

    async def agent_released(self, agent_id: str) -> None:
        async with self._subscriptions:
            if self._pubsub is None or agent_id in self.inbox.held_agents():
                return
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self._pubsub.unsubscribe(agent_channel(agent_id)), 2)

    async def _handle(self, channel: bytes, data: bytes) -> None:
        name = channel.decode()
        if name == PLACER_CHANNEL:
            if data.decode() != self.replica_id:
                self.inbox.wake_placer()
            return
        try:
            body = json.loads(data)
        except ValueError:
            return
        if name == EVENTS_CHANNEL:
            if body.get("origin") != self.replica_id:
                self.inbox.deliver_event(body["event"], body["owner_id"])
            return
        if name == REVOKE_CHANNEL:
            if body.get("origin") != self.replica_id:
                self.inbox.apply_revocation(str(body["user_id"]), str(body["reason"]))
            return
        if not name.startswith(AGENT_PREFIX):
            return
        agent_id = name[len(AGENT_PREFIX) :]
        kind = body.get("kind")
        if kind == "to_agent":
            # Never wait here: this loop carries every agent's frames to this replica, and one
            # agent that stopped reading must not hold up the rest. Its command stays open in
            # the database and is sent again by the retry loop.
            offered = self.inbox.offer_frame(agent_id, body["frame"])
            if offered is None:
                return
            if not offered:
                self.dropped += 1
                log.warning("router_frame_dropped", agent_id=agent_id, reason="agent_queue_full")
                return
            self.delivered += 1
            if isinstance(published := body.get("published_at"), float):
                metrics.forward_seconds.observe(max(0.0, time.time() - published))
        elif kind == "disconnect_agent":
            await self.inbox.disconnect_agent(agent_id, body["code"], body["message"])

    # ---- agents ---------------------------------------------------------------------------

    async def send_many(self, items: list[tuple[str, Any]]) -> list[bool]:
        """Many frames in one pipelined round trip to Redis; True where a replica took one."""
        if not items:
            return []
        try:
            pipe = self.redis.pipeline(transaction=False)
            for agent_id, msg in items:
                pipe.publish(agent_channel(agent_id), _to_agent_payload(msg))
            counts = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("router_publish_failed", count=len(items), error=exc)
            return [False] * len(items)
        return [bool(receivers) for receivers in counts]

    async def disconnect_agent(self, agent_id: str, code: str, message: str) -> None:
        payload = json.dumps({"kind": "disconnect_agent", "code": code, "message": message})
        with contextlib.suppress(RedisError, OSError):
            await self.redis.publish(agent_channel(agent_id), payload)

    # ---- events ---------------------------------------------------------------------------

    def publish_event(self, event: dict[str, Any], owner_id: str) -> None:
        payload = json.dumps({"event": event, "owner_id": owner_id, "origin": self.replica_id})
        task = asyncio.create_task(self._publish(payload))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def publish_revocation(self, user_id: str, reason: str) -> None:
        payload = json.dumps({"user_id": user_id, "reason": reason, "origin": self.replica_id})
        task = asyncio.create_task(self._publish(payload, REVOKE_CHANNEL))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def wake_placers(self) -> None:
        """Tell the other replicas (the lease holder among them) that placement work arrived."""
        task = asyncio.create_task(self._publish(self.replica_id, PLACER_CHANNEL))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _publish(self, payload: str, channel: str = EVENTS_CHANNEL) -> None:
        try:
            await self.redis.publish(channel, payload)
        except (RedisError, OSError) as exc:
            log.warning("router_event_publish_failed", channel=channel, error=exc)

    # ---- tickets --------------------------------------------------------------------------

    async def put_ticket(self, ticket: str, value: Ticket, ttl_seconds: int) -> None:
        stored = {
            "session_id": value.session_id,
            "user_id": value.user_id,
            "expires_at": value.expires_at.isoformat(),
            "token_version": str(value.token_version),
            "purpose": value.purpose,
            "path": value.path,
        }
        await self.redis.set(TICKET_PREFIX + ticket, json.dumps(stored), ex=ttl_seconds)

    async def take_ticket(self, ticket: str) -> Ticket | None:
        raw = await self.redis.getdel(TICKET_PREFIX + ticket)
        if raw is None:
            return None
        stored: dict[str, str] = json.loads(raw)
        return Ticket(
            stored["session_id"],
            stored["user_id"],
            datetime.fromisoformat(stored["expires_at"]),
            int(stored.get("token_version", -1)),
            "download" if stored.get("purpose") == "download" else "stream",
            stored.get("path", ""),
        )


def _to_agent_payload(msg: Any) -> str:
    """A frame for the replica holding the agent; `published_at` feeds its forward histogram."""
    return json.dumps(
        {"kind": "to_agent", "frame": protocol.encode(msg), "published_at": time.time()}
    )
