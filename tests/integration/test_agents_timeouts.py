"""Every transitional state has a timeout path, exercised with real agents that freeze
(SIGSTOP), vanish (SIGKILL) or are slow (an Xvnc that takes seconds to come up): the session
leaves scheduled / starting / hibernating / waking / stopping for `failed` with a reason, and
commands are retried before the control plane gives up on them."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_agents_support import (
    Fleet,
    _needs_xvnc,  # noqa: F401 - fixture
    _no_xvnc_left_behind,  # noqa: F401 - fixture
    fleet,  # noqa: F401 - fixture
    session_pids,
    xvnc_pids,
)

from conftest import wait_for, wait_state

pytestmark = pytest.mark.xvnc


def slow_xvnc_env(tmp_path: Path, delay: float) -> dict[str, str]:
    """Environment for an agent whose Xvnc takes `delay` seconds before it starts serving.

    Unsandboxed: a sandbox sees only the host's /usr, never this test's PATH."""
    real = shutil.which("Xvnc") or "/usr/bin/Xvnc"
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir(parents=True, exist_ok=True)
    script = fakebin / "Xvnc"
    script.write_text(f'#!/bin/sh\nsleep {delay}\nexec {real} "$@"\n')
    script.chmod(0o755)
    return {
        "PATH": f"{fakebin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "STREAMSPACE_LOCAL_INSECURE_SHARED_USER": "true",
    }


def kinds(session: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in session["events"]]


def test_scheduled_times_out_when_the_agent_freezes(fleet: Callable[..., Fleet]) -> None:
    fl = fleet(starting_timeout_seconds=3)
    agent = fl.agent("c1")
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)
    owner = fl.admin

    fl.sigstop(agent)  # still "online" (fresh last_seen), but it will never answer
    sid = fl.create(owner)["id"]
    body = wait_state(owner, sid, "scheduled", timeout=10)
    assert body["agent_id"] == agent_id
    started = time.time()
    failed = wait_state(owner, sid, "failed", timeout=15)
    assert time.time() - started >= 1.5, "gave up long before starting_timeout_seconds"
    assert failed["failure_reason"] == "stuck scheduled for 3 s; giving up", failed
    assert failed["events"][-1]["kind"] == "timeout"
    assert "starting" not in kinds(failed)
    (cmd,) = fl.commands(sid)
    assert (cmd.action, cmd.status, cmd.error) == ("start", "timed_out", "session timed out")
    assert cmd.attempts == 1


def test_commands_are_retried_before_giving_up(fleet: Callable[..., Fleet]) -> None:
    fl = fleet(command_timeout_seconds=1, command_max_attempts=3, starting_timeout_seconds=60)
    agent = fl.agent("c1")
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)
    owner = fl.admin

    fl.sigstop(agent)
    sid = fl.create(owner)["id"]
    wait_state(owner, sid, "scheduled", timeout=10)

    def retried() -> bool:
        return any(c.attempts > 1 for c in fl.commands(sid))

    wait_for(retried, 5, what="a second attempt")
    failed = wait_state(owner, sid, "failed", timeout=15)
    reason = failed["failure_reason"]
    assert reason == f"agent {agent_id} did not complete start after 3 attempts", reason
    (cmd,) = fl.commands(sid)
    assert cmd.status == "timed_out" and cmd.attempts == 3, (cmd.status, cmd.attempts)
    assert cmd.error == reason
    assert cmd.completed_at is not None


def test_starting_times_out_when_the_display_never_comes_up(
    fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    fl = fleet(starting_timeout_seconds=2)
    agent = fl.agent("c1", env=slow_xvnc_env(tmp_path, 4))
    fl.wait_online(agent)
    owner = fl.admin

    sid = fl.create(owner)["id"]
    wait_state(owner, sid, "starting", timeout=10)  # the agent acked; the start hangs
    failed = wait_state(owner, sid, "failed", timeout=15)
    assert failed["failure_reason"] == "stuck starting for 2 s; giving up", failed
    assert failed["events"][-1]["kind"] == "timeout"
    (cmd,) = fl.commands(sid)
    assert (cmd.status, cmd.error) == ("timed_out", "session timed out")


def test_hibernating_waking_and_stopping_time_out_when_the_agent_is_gone(
    fleet: Callable[..., Fleet],
) -> None:
    fl = fleet(starting_timeout_seconds=3, stopping_timeout_seconds=3)
    agent = fl.agent("c1")
    fl.wait_online(agent)
    agent_id = fl.agent_id(agent)
    owner = fl.admin
    s_hib, s_wake, s_stop = (fl.create(owner)["id"] for _ in range(3))
    for sid in (s_hib, s_wake, s_stop):
        wait_state(owner, sid, "running", timeout=30)
    assert owner.post(f"/api/v1/sessions/{s_wake}/hibernate").status_code == 202
    wait_state(owner, s_wake, "hibernated")

    agent.kill()
    wait_for(lambda: not fl.cp.state.hub.is_connected(agent_id), 10, what="disconnect noticed")
    r = owner.post(f"/api/v1/sessions/{s_hib}/hibernate")
    assert r.status_code == 202 and r.json()["state"] == "hibernating", r.text
    r = owner.post(f"/api/v1/sessions/{s_wake}/wake")
    assert r.status_code == 202 and r.json()["state"] == "waking", r.text
    r = owner.delete(f"/api/v1/sessions/{s_stop}")
    assert r.status_code == 202 and r.json()["state"] == "stopping", r.text

    for sid, was in ((s_hib, "hibernating"), (s_wake, "waking"), (s_stop, "stopping")):
        failed = wait_state(owner, sid, "failed", timeout=15)
        assert failed["failure_reason"] == f"stuck {was} for 3 s; giving up", failed
        assert failed["events"][-1]["kind"] == "timeout"
        last_cmd = fl.commands(sid)[-1]
        assert last_cmd.status == "timed_out", (sid, last_cmd.action, last_cmd.status)
        assert last_cmd.attempts == 0, "nothing could be delivered to a dead agent"
        # A failed session can still be stopped (cleanup does it once the agent is back).
        assert "stop" in failed["allowed_actions"]


def test_late_start_result_after_a_timeout_stops_the_leftover(
    fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    """The start times out, then the agent finishes it after all: the session must not be
    left running on the host (nobody can reach it and it holds a slot the scheduler does not
    count). lifecycle._apply_result has a 'late start result; stopping the leftover' branch
    for exactly this."""
    fl = fleet(starting_timeout_seconds=2)
    agent = fl.agent("c1", env=slow_xvnc_env(tmp_path, 4))
    fl.wait_online(agent)
    owner = fl.admin
    sid = fl.create(owner)["id"]
    failed = wait_state(owner, sid, "failed", timeout=15)
    assert failed["failure_reason"] == "stuck starting for 2 s; giving up"

    # The agent finishes the start anyway and reports success.
    wait_for(
        lambda: "command_succeeded" in agent.log() and sid in agent.log(), 20, what="late start"
    )
    deadline = time.time() + 8
    while time.time() < deadline and (xvnc_pids(sid) or session_pids(sid)):
        time.sleep(0.3)
    body = fl.get(sid)
    left = sorted(set(xvnc_pids(sid) + session_pids(sid)))
    assert not left, (
        f"late successful start of a timed-out session left processes running: {left}; "
        f"events={[(e['kind'], e['message']) for e in body['events']]}"
    )
    assert "cleanup" in kinds(body)
