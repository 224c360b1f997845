"""A new session's defaults, and what a refused create answers over HTTP."""

from __future__ import annotations

import pytest

from streamspace.config import Settings
from streamspace.controlplane.catalog import TemplateSpec
from streamspace.controlplane.creation import (
    CreateInFlight,
    NewSession,
    UnknownTemplate,
    created_message,
    new_session_row,
)
from streamspace.controlplane.problems import domain_problem
from streamspace.controlplane.quotas import QuotaExceeded
from streamspace.db.models import User

TEMPLATE = TemplateSpec.model_validate(
    {
        "name": "xterm",
        "display_name": "XTerm",
        "category": "Tools",
        "resources": {"cpu_millis": 500, "memory_mb": 512},
        "idle_timeout_seconds": 900,
        "launch": {"local": {"command": ["xterm"]}},
    }
)
SETTINGS = Settings(default_idle_timeout_seconds=1800, default_max_duration_seconds=7200)


def owner(idle: int | None = None) -> User:
    return User(id="u1", username="quinn", role="user", idle_timeout_seconds=idle)


def test_unset_resources_come_from_the_template() -> None:
    row = new_session_row(NewSession(template="xterm"), TEMPLATE, owner(), SETTINGS)
    assert (row.cpu_millis, row.memory_mb) == (500, 512)
    assert row.state == "pending" and row.owner_id == "u1" and row.template_name == "xterm"
    assert row.max_duration_seconds == 7200
    asked = NewSession(template="xterm", cpu_millis=250, memory_mb=2048, tags=["a"])
    row = new_session_row(asked, TEMPLATE, owner(), SETTINGS)
    assert (row.cpu_millis, row.memory_mb, row.tags) == (250, 2048, ["a"])


@pytest.mark.parametrize(
    ("asked", "user", "template", "expected"),
    [
        (120, 300, 900, 120),  # the request first
        (None, 300, 900, 300),  # then the owner's own setting
        (None, None, 900, 900),  # then the template
        (None, None, None, 1800),  # then the settings
    ],
)
def test_idle_timeout_precedence(
    asked: int | None, user: int | None, template: int | None, expected: int
) -> None:
    tpl = TEMPLATE.model_copy(update={"idle_timeout_seconds": template})
    request = NewSession(template="xterm", idle_timeout_seconds=asked)
    assert new_session_row(request, tpl, owner(user), SETTINGS).idle_timeout_seconds == expected


def test_created_message_names_the_cluster_only_when_asked() -> None:
    row = new_session_row(NewSession(template="xterm"), TEMPLATE, owner(), SETTINGS)
    assert created_message(row) == "requested xterm (500 mCPU, 512 MiB)"
    row = new_session_row(
        NewSession(template="xterm", cluster_id="eu"), TEMPLATE, owner(), SETTINGS
    )
    assert created_message(row) == "requested xterm (500 mCPU, 512 MiB) in cluster eu"


@pytest.mark.parametrize(
    ("refused", "detail"),
    [
        (
            QuotaExceeded("your quota", "sessions", 2, 2, 1),
            "your quota allows 2 active sessions and 2 are active; stop or delete one first",
        ),
        (
            QuotaExceeded("your quota", "cpu_millis", 1000, 600, 600),
            "your quota allows 1000 mCPU; 600 in use, this session asks for 600",
        ),
        (
            QuotaExceeded("group 'lab''s quota", "memory_mb", 2048, 512, 2000),
            "group 'lab''s quota allows 2048 MiB of memory; 512 in use, this session asks for 2000",
        ),
    ],
)
def test_quota_refusal_is_a_403_with_the_numbers(refused: QuotaExceeded, detail: str) -> None:
    problem = domain_problem(refused)
    assert (problem.status, problem.title, problem.kind) == (
        403,
        "Quota exceeded",
        "quota-exceeded",
    )
    assert problem.detail == detail


def test_unknown_template_is_a_422_and_a_racing_create_a_409() -> None:
    problem = domain_problem(UnknownTemplate("nope"))
    assert (problem.status, problem.kind) == (422, "invalid-request")
    assert problem.detail == "template: 'nope' does not exist"
    problem = domain_problem(CreateInFlight())
    assert (problem.status, problem.kind) == (409, "conflict")
    assert problem.detail == "a session with this Idempotency-Key is being created"
