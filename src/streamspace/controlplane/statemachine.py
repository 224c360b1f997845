"""The session state machine: the only place that decides which transitions are legal."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    STARTING = "starting"
    RUNNING = "running"
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    WAKING = "waking"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.PENDING: frozenset({S.SCHEDULED, S.FAILED, S.STOPPED}),
    S.SCHEDULED: frozenset({S.STARTING, S.RUNNING, S.FAILED, S.STOPPING}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING}),
    S.RUNNING: frozenset({S.HIBERNATING, S.STOPPING, S.FAILED}),
    S.HIBERNATING: frozenset({S.HIBERNATED, S.FAILED, S.STOPPING}),
    S.HIBERNATED: frozenset({S.WAKING, S.STOPPING, S.FAILED}),
    S.WAKING: frozenset({S.RUNNING, S.FAILED, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset({S.STOPPING, S.STOPPED}),
}

ACTIVE_STATES = frozenset(set(State) - {S.STOPPED, S.FAILED})
ON_AGENT_STATES = frozenset(
    {S.SCHEDULED, S.STARTING, S.RUNNING, S.HIBERNATING, S.HIBERNATED, S.WAKING}
)
TRANSITIONAL_STATES = frozenset({S.SCHEDULED, S.STARTING, S.HIBERNATING, S.WAKING, S.STOPPING})
"""Each has a completion path (an agent result, results.py) and a timeout path (timeouts.py)."""


class IllegalTransition(Exception):
    """An action that needs a transition the state machine does not allow (a 409 over HTTP,
    naming the current state and what is allowed instead)."""

    def __init__(self, current: str, action: str) -> None:
        self.current = current
        self.action = action
        self.allowed_actions = allowed_actions(current)
        super().__init__(f"cannot {action} a session that is {current}")


class ActionContended(Exception):
    """A session action found the session changed under it on every attempt (a storm of agent
    results, other requests): the caller may try again."""

    def __init__(self, action: str) -> None:
        self.action = action
        super().__init__(f"the session kept changing while {action} was applied; try again")


def can_transition(current: str, target: State) -> bool:
    return target in TRANSITIONS[State(current)]


def check_transition(current: str, target: State, action: str) -> None:
    """Raise IllegalTransition when `action` would need an illegal transition."""
    if not can_transition(current, target):
        raise IllegalTransition(current, action)


def allowed_actions(current: str) -> list[str]:
    nxt = TRANSITIONS[State(current)]
    actions = []
    if S.HIBERNATING in nxt:
        actions.append("hibernate")
    if S.WAKING in nxt:
        actions.append("wake")
    if S.STOPPING in nxt or S.STOPPED in nxt:
        actions.append("stop")
    if current == S.RUNNING:
        actions.append("connect")
    return actions
