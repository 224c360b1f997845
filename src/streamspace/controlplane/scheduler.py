"""Placement: filter agents that can take a session, then score the survivors.

Pure functions over snapshots so that a batch of placements costs one agents query and one
usage query, and every decision carries a human-readable explanation for session_events. The
catalog asks the same filters whether a template can run at all (`Placer.availability`), so
what it promises and what placement does cannot drift apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
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
    stale: bool = False
    """Not online, but heard from lately (a reconnect under way, a replica failing over): it
    gets no session now, yet the templates it reported stay available and sessions queue."""
    load: float = field(init=False, default=0.0)
    """Highest utilisation over the three dimensions, 0..1 (kept current by `reserve`)."""

    def __post_init__(self) -> None:
        self.refresh_load()

    @property
    def free_sessions(self) -> int:
        return self.max_sessions - self.used_sessions

    def refresh_load(self) -> None:
        self.load = max(
            self.used_sessions / self.max_sessions if self.max_sessions else 1.0,
            self.used_cpu_millis / self.cpu_millis if self.cpu_millis else 1.0,
            self.used_memory_mb / self.memory_mb if self.memory_mb else 1.0,
        )


@dataclass(frozen=True)
class Request:
    session_id: str
    template: str
    cpu_millis: int
    memory_mb: int
    cluster_id: str | None = None


@dataclass(frozen=True)
class TemplateNeeds:
    """What a template asks of an agent's host, only to name what is missing when no agent
    lists it: agents report just the names they can run (protocol.Hello.templates)."""

    name: str
    local_command: str | None = None
    """The program a local agent must find on its PATH; None: no local launch."""
    image: str | None = None
    """The image a docker or kubernetes agent must have; None: no image launch."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str | None = None
    """Why not, for admins and the 409 of a create; None when available."""


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


class Placer:
    """Placement over one snapshot of the fleet, for a batch of requests.

    Agents that can take nothing (offline, draining, unhealthy) are counted once; the rest are
    grouped by template and cluster so each request scans only agents that could run it.
    """

    def __init__(self, agents: list[AgentSnapshot], strategy: str = "least_loaded") -> None:
        self.strategy = strategy
        self.total = len(agents)
        self.static: Counter[str] = Counter()
        self.by_template: dict[str, list[AgentSnapshot]] = {}
        self.by_template_cluster: dict[tuple[str, str], list[AgentSnapshot]] = {}
        self.usable_agents: list[AgentSnapshot] = []
        self.unusable_agents: list[tuple[str, AgentSnapshot]] = []
        self.reconnecting: set[tuple[str, str]] = set()
        """(template, cluster) pairs a stale but otherwise usable agent reported."""
        for a in agents:
            why = unusable(a)
            if why:
                self.static[why] += 1
                self.unusable_agents.append((why, a))
                if a.stale and not a.draining and a.healthy:
                    self.reconnecting.update((t, a.cluster_id) for t in a.templates)
            else:
                self.usable_agents.append(a)
                for t in a.templates:
                    self.by_template.setdefault(t, []).append(a)
                    self.by_template_cluster.setdefault((t, a.cluster_id), []).append(a)
        self.usable = len(self.usable_agents)

    def place(self, req: Request) -> Decision:
        if self.total == 0:
            return Decision(None, "no agent is enrolled")
        rejected = Counter(self.static)
        runs_it = self.by_template.get(req.template, [])
        if len(runs_it) < self.usable:
            rejected["template"] = self.usable - len(runs_it)
        cands = runs_it
        if req.cluster_id:
            cands = self.by_template_cluster.get((req.template, req.cluster_id), [])
            if len(cands) < len(runs_it):
                rejected["cluster"] = len(runs_it) - len(cands)
        cpu, mem = req.cpu_millis, req.memory_mb
        sign = 1.0 if self.strategy == "least_loaded" else -1.0
        best: AgentSnapshot | None = None
        best_score = 2.0
        full_s = full_c = full_m = 0
        for a in cands:  # the hot loop of a placement batch: no allocations in here
            if a.used_sessions >= a.max_sessions:
                full_s += 1
            elif a.used_cpu_millis + cpu > a.cpu_millis:
                full_c += 1
            elif a.used_memory_mb + mem > a.memory_mb:
                full_m += 1
            else:
                score = sign * a.load
                if best is None or score < best_score or (score == best_score and a.id < best.id):
                    best, best_score = a, score
        for reason, n in (("sessions", full_s), ("cpu", full_c), ("memory", full_m)):
            if n:
                rejected[reason] = n
        return _decision(best, rejected, self.strategy, len(cands))

    def availability(self, needs: TemplateNeeds, cluster_id: str | None = None) -> Availability:
        """Whether an agent that takes sessions now (in `cluster_id`, if given) lists the
        template. A full agent counts: a session for it queues until capacity frees, as
        `place` would have it wait; so does one reconnecting (stale), which is back within
        seconds or offline soon. Only "none could take it now" is unavailable."""
        if cluster_id:
            runs_it = bool(self.by_template_cluster.get((needs.name, cluster_id)))
            runs_it = runs_it or (needs.name, cluster_id) in self.reconnecting
        else:
            runs_it = bool(self.by_template.get(needs.name))
            runs_it = runs_it or any(t == needs.name for t, _ in self.reconnecting)
        if runs_it:
            return Availability(True)
        return Availability(False, self._unavailable_reason(needs, cluster_id))

    def _unavailable_reason(self, needs: TemplateNeeds, cluster_id: str | None) -> str:
        where = f" in cluster {cluster_id}" if cluster_id else ""
        usable = [a for a in self.usable_agents if not cluster_id or a.cluster_id == cluster_id]
        idle = Counter(
            why for why, a in self.unusable_agents if not cluster_id or a.cluster_id == cluster_id
        )
        if not usable:
            if self.total == 0:
                return "no agent online (none is enrolled)"
            if set(idle) <= {"offline"}:
                reason = f"no agent online{where}"
            else:
                reason = f"no agent{where} takes new sessions: " + _counts(idle)
            if cluster_id and self.by_template.get(needs.name):
                reason += "; agents in other clusters can run it"
            return reason
        parts = _missing(needs, usable)
        could = Counter(
            why
            for why, a in self.unusable_agents
            if needs.name in a.templates and (not cluster_id or a.cluster_id == cluster_id)
        )
        if could:
            parts.append("agents that have it take no sessions now: " + _counts(could))
        if cluster_id and self.by_template.get(needs.name):
            parts.append("agents in other clusters can run it")
        return "; ".join(parts)


def unusable(agent: AgentSnapshot) -> str | None:
    """Why an agent takes no session at all now (a REJECT_REASONS key), or None."""
    if not agent.online:
        return "offline"
    if agent.draining:
        return "draining"
    if not agent.healthy:
        return "unhealthy"
    return None


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {REJECT_REASONS[k]}" for k, n in sorted(counts.items()))


def _missing(needs: TemplateNeeds, usable: list[AgentSnapshot]) -> list[str]:
    """What each backend among `usable` (none of which lists the template) lacks for it."""
    backends = sorted({a.backend for a in usable})
    parts = []
    for backend in backends:
        agents = [a for a in usable if a.backend == backend]
        whom = "agent" if len(backends) == 1 else f"agent with the {backend} backend"
        if backend == "local":
            if needs.local_command is None:
                parts.append("agents with the local backend cannot run it (it has no local launch)")
            elif not any(a.templates for a in agents):
                parts.append(
                    "agents with the local backend can run no template now (see their health)"
                )
            else:
                parts.append(f"no {whom} has `{needs.local_command}` installed")
        elif needs.image is None:
            parts.append(f"agents with the {backend} backend cannot run it (it has no image)")
        else:
            parts.append(f"agents with the {backend} backend have no image `{needs.image}`")
    return parts


def place(agents: list[AgentSnapshot], req: Request, strategy: str = "least_loaded") -> Decision:
    """Choose an agent for `req`. `strategy` is least_loaded (spread) or bin_packing (fill)."""
    return Placer(agents, strategy).place(req)


def _decision(
    best: AgentSnapshot | None, rejected: Counter[str], strategy: str, considered: int
) -> Decision:
    if best is None:
        return Decision(None, "no agent can run it: " + _counts(rejected), dict(rejected))
    eligible = considered - sum(rejected[k] for k in ("sessions", "cpu", "memory"))
    reason = (
        f"placed on agent {best.name} in cluster {best.cluster_id} because it "
        f"{'is the least loaded' if strategy == 'least_loaded' else 'packs tightest'} "
        f"of {eligible} eligible "
        f"({best.used_sessions}/{best.max_sessions} sessions, "
        f"load {best.load:.0%})"
    )
    if rejected:
        reason += "; skipped " + _counts(rejected)
    return Decision(best, reason, dict(rejected))


def reserve(agent: AgentSnapshot, req: Request) -> None:
    """Count a placement against the snapshot so the next decision in the batch sees it."""
    agent.used_sessions += 1
    agent.used_cpu_millis += req.cpu_millis
    agent.used_memory_mb += req.memory_mb
    agent.refresh_load()
