"""Background loops and the lease that makes exactly one replica run the cluster-wide ones.

Per-replica work (flushing this replica's heartbeats and stream activity) runs everywhere;
cluster-wide work (placement, timeouts, idle culling) runs only on the lease holder. A holder
that dies stops renewing and another replica takes over once the lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from streamspace import logs
from streamspace.config import Settings
from streamspace.controlplane import metrics
from streamspace.controlplane.agentsocket import AgentEndpoint
from streamspace.controlplane.placement import Placement
from streamspace.controlplane.results import Results
from streamspace.controlplane.revocation import Revocations
from streamspace.controlplane.streams import StreamBroker
from streamspace.controlplane.timeouts import Timeouts
from streamspace.db.engine import Database
from streamspace.db.models import Lease

log = logs.get_logger("streamspace.loops")

LEASE_NAME = "background-loops"
LAG_PROBE_SECONDS = 0.05


class LeaderLease:
    def __init__(self, *, db: Database, replica_id: str, ttl_seconds: float = 15.0) -> None:
        self.db = db
        self.replica_id = replica_id
        self.ttl = ttl_seconds
        self.is_leader = False

    async def renew(self) -> bool:
        at = datetime.now(UTC)
        holder = self.replica_id
        expires = at + timedelta(seconds=self.ttl)
        try:
            async with self.db() as db:
                result = await db.execute(
                    update(Lease)
                    .where(Lease.name == LEASE_NAME)
                    .where((Lease.holder == holder) | (Lease.expires_at < at))
                    .values(holder=holder, expires_at=expires)
                )
                if result.rowcount == 0:  # type: ignore[attr-defined]
                    exists = await db.scalar(select(Lease.name).where(Lease.name == LEASE_NAME))
                    if exists is None:
                        db.add(Lease(name=LEASE_NAME, holder=holder, expires_at=expires))
                        await db.commit()
                        leader = True
                    else:
                        leader = False
                else:
                    await db.commit()
                    leader = True
        except IntegrityError:
            leader = False
        except Exception as exc:
            log.warning("lease_renew_failed", replica=holder, error=exc)
            leader = False
        if leader != self.is_leader:
            log.event("loop_leadership", replica=holder, leader=leader)
        self.is_leader = leader
        metrics.loop_leader.set(1 if leader else 0)
        return leader


class Loops:
    def __init__(
        self,
        *,
        settings: Settings,
        lease: LeaderLease,
        placement: Placement,
        results: Results,
        timeouts: Timeouts,
        agents: AgentEndpoint,
        streams: StreamBroker,
        revocations: Revocations,
    ) -> None:
        self.settings = settings
        self.lease = lease
        self.placement = placement
        self.results = results
        self.timeouts = timeouts
        self.agents = agents
        self.streams = streams
        self.revocations = revocations
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        s = self.settings
        self._spawn("lease", self.lease.renew, 5.0, leader_only=False)
        self._spawn("heartbeats", self.agents.flush_heartbeats, 2.0, leader_only=False)
        self._spawn("activity", self.streams.flush_activity, 5.0, leader_only=False)
        self._spawn(
            "revocation_recheck",
            self.revocations.recheck,
            s.connection_recheck_seconds,
            leader_only=False,
        )
        self._spawn("expire", self.timeouts.expire, s.loop_interval_seconds)
        self._spawn("cull", self.timeouts.cull, s.idle_check_interval_seconds)
        self._tasks.append(asyncio.create_task(self._placement_loop(), name="loop-placement"))
        self._tasks.append(asyncio.create_task(self.results.process(), name="loop-results"))
        self._tasks.append(asyncio.create_task(probe_event_loop_lag(), name="loop-lag-probe"))

    def _spawn(
        self,
        name: str,
        fn: Callable[[], Awaitable[object]],
        interval: float,
        leader_only: bool = True,
    ) -> None:
        async def run() -> None:
            while True:
                if not leader_only or self.lease.is_leader:
                    try:
                        await fn()
                        metrics.loop_runs_total.labels(name).inc()
                    except Exception as exc:
                        log.warning("loop_failed", loop=name, error=exc)
                await asyncio.sleep(interval)

        self._tasks.append(asyncio.create_task(run(), name=f"loop-{name}"))

    async def _placement_loop(self) -> None:
        placement = self.placement
        while True:
            await placement.wait_for_work(self.settings.loop_interval_seconds)
            if not self.lease.is_leader:
                continue
            try:
                placed = await placement.place_pending()
                metrics.loop_runs_total.labels("placement").inc()
                if placed:
                    metrics.placements_total.inc(placed)
                    placement.wake_placer()
            except Exception as exc:
                log.warning("loop_failed", loop="placement", error=exc)
                await asyncio.sleep(1)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


async def probe_event_loop_lag(interval: float = LAG_PROBE_SECONDS) -> None:
    """How late a timer fires is how long everything else on this replica waited for the loop:
    a slow request with a high lag was queued behind other work, one with a low lag was slow in
    the database or the network."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(interval)
        metrics.event_loop_lag_seconds.observe(max(0.0, time.perf_counter() - asked - interval))
