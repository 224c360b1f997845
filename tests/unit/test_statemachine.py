from __future__ import annotations

import itertools

import pytest

from streamspace.controlplane.problems import domain_problem
from streamspace.controlplane.statemachine import (
    TRANSITIONAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    State,
    allowed_actions,
    can_transition,
    check_transition,
)


def test_happy_path_is_legal() -> None:
    path = [
        State.PENDING,
        State.SCHEDULED,
        State.STARTING,
        State.RUNNING,
        State.HIBERNATING,
        State.HIBERNATED,
        State.WAKING,
        State.RUNNING,
        State.STOPPING,
        State.STOPPED,
    ]
    for a, b in itertools.pairwise(path):
        assert can_transition(a, b), f"{a} -> {b}"


def test_impossible_transition_is_409_with_current_state() -> None:
    with pytest.raises(IllegalTransition) as raised:
        check_transition("pending", State.HIBERNATING, "hibernate")
    problem = domain_problem(raised.value)  # what the API answers with
    assert problem.status == 409
    assert problem.extra["current_state"] == "pending"
    assert "cannot hibernate a session that is pending" in problem.detail


def test_stopped_is_terminal() -> None:
    assert TRANSITIONS[State.STOPPED] == frozenset()


def test_every_transitional_state_can_fail_or_finish() -> None:
    """Lesson 5: each transitional state has a way out to failed (the timeout path)."""
    for st in TRANSITIONAL_STATES:
        assert State.FAILED in TRANSITIONS[st], st


def test_allowed_actions() -> None:
    assert allowed_actions("running") == ["hibernate", "stop", "connect"]
    assert allowed_actions("hibernated") == ["wake", "stop"]
    assert allowed_actions("stopped") == []
