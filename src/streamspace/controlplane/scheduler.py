"""Placement: filter agents that can take a session, then score the survivors.

Pure functions over snapshots so that a batch of placements costs one agents query and one
usage query, and every decision carries a human-readable explanation for session_events.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class AgentSnapshot:
    id: str
    name: str
    cluster_id: str
    backend: str
    online: bool
    draining: bool
    healthy: bool
    templates: frozenset[str]
    max_sessions: int
    cpu_millis: int
    memory_mb: int
    used_sessions: int = 0
    used_cpu_millis: int = 0
    used_memory_mb: int = 0

    @property
    def free_sessions(self) -> int:
        return self.max_sessions - self.used_sessions

    @property
    def load(self) -> float:
        """Highest utilisation over the three dimensions, 0..1."""
        parts = [
            self.used_sessions / self.max_sessions if self.max_sessions else 1.0,
            self.used_cpu_millis / self.cpu_millis if self.cpu_millis else 1.0,
            self.used_memory_mb / self.memory_mb if self.memory_mb else 1.0,
        ]
        return max(parts)


@dataclass(frozen=True)
class Request:
    session_id: str
    template: str
    cpu_millis: int
    memory_mb: int
    cluster_id: str | None = None


@dataclass
class Decision:
    agent: AgentSnapshot | None
    reason: str
    rejected: dict[str, int] = field(default_factory=dict)


REJECT_REASONS = {
    "offline": "offline",
    "draining": "draining",
    "unhealthy": "unhealthy",
    "cluster": "in another cluster",
    "template": "cannot run the template",
    "sessions": "full (sessions)",
    "cpu": "full (CPU)",
    "memory": "full (memory)",
}


def _reject(agent: AgentSnapshot, req: Request) -> str | None:
    if not agent.online:
        return "offline"
    if agent.draining:
        return "draining"
    if not agent.healthy:
        return "unhealthy"
    if req.cluster_id and agent.cluster_id != req.cluster_id:
        return "cluster"
    if req.template not in agent.templates:
        return "template"
    if agent.free_sessions < 1:
        return "sessions"
    if agent.used_cpu_millis + req.cpu_millis > agent.cpu_millis:
        return "cpu"
    if agent.used_memory_mb + req.memory_mb > agent.memory_mb:
        return "memory"
    return None


def place(agents: list[AgentSnapshot], req: Request, strategy: str = "least_loaded") -> Decision:
    """Choose an agent for `req`. `strategy` is least_loaded (spread) or bin_packing (fill)."""
    rejected: Counter[str] = Counter()
    best: AgentSnapshot | None = None
    best_key: tuple[float, str] | None = None
    for agent in agents:
        why = _reject(agent, req)
        if why is not None:
            rejected[why] += 1
            continue
        score = agent.load if strategy == "least_loaded" else -agent.load
        key = (score, agent.id)
        if best_key is None or key < best_key:
            best, best_key = agent, key
    if best is None:
        if not agents:
            return Decision(None, "no agent is enrolled")
        parts = [f"{n} {REJECT_REASONS[k]}" for k, n in sorted(rejected.items())]
        return Decision(None, "no agent can run it: " + ", ".join(parts), dict(rejected))
    reason = (
        f"placed on agent {best.name} in cluster {best.cluster_id} because it "
        f"{'is the least loaded' if strategy == 'least_loaded' else 'packs tightest'} "
        f"of {len(agents) - sum(rejected.values())} eligible "
        f"({best.used_sessions}/{best.max_sessions} sessions, "
        f"load {best.load:.0%})"
    )
    if rejected:
        reason += "; skipped " + ", ".join(
            f"{n} {REJECT_REASONS[k]}" for k, n in sorted(rejected.items())
        )
    return Decision(best, reason, dict(rejected))


def reserve(agent: AgentSnapshot, req: Request) -> None:
    """Count a placement against the snapshot so the next decision in the batch sees it."""
    agent.used_sessions += 1
    agent.used_cpu_millis += req.cpu_millis
    agent.used_memory_mb += req.memory_mb
