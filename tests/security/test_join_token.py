"""The join token need not be on the command line (issue 12, part 8).

`streamspace agent --join-token ssj_...` puts the token in the agent's argv, which every local
account reads with `ps` for as long as the agent runs, and the UI's enrol command said to do
just that. The token can now come from a file or from STREAMSPACE_JOIN_TOKEN; each way enrols
a real agent process, whose command line then holds no token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import AgentProcess, wait_for


def online(cp: Any) -> list[dict[str, Any]]:
    with cp.login() as admin:
        return [a for a in admin.get("/api/v1/agents").json() if a["status"] == "online"]


def cmdline(agent: AgentProcess) -> str:
    assert agent.proc is not None
    return Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.parametrize("how", ["file", "environment"])
def test_an_agent_enrols_with_a_token_that_ps_cannot_see(
    how: str, make_control_plane: Any, tmp_path: Path
) -> None:
    cp = make_control_plane(login_rate_per_minute=10_000)
    token = cp.join_token()
    if how == "file":
        path = tmp_path / "join-token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        agent = AgentProcess(
            cp.url, tmp_path / "agent", None, "jt", extra=["--join-token-file", str(path)]
        )
    else:
        agent = AgentProcess(
            cp.url, tmp_path / "agent", None, "jt", env={"STREAMSPACE_JOIN_TOKEN": token}
        )
    agent.start()
    try:
        wait_for(lambda: online(cp), 30, what=f"the agent to enrol with the token from its {how}")
        assert token not in cmdline(agent)
        assert (tmp_path / "agent" / "agent.json").exists()
        assert "join_token_on_command_line" not in agent.log()
    finally:
        agent.terminate()


def test_the_enrol_command_the_ui_shows_keeps_the_token_off_the_command_line(
    make_control_plane: Any,
) -> None:
    cp = make_control_plane()
    with cp.login() as admin:
        body = admin.post("/api/v1/agents/join-tokens", json={}).json()
    assert body["command"].startswith(f"STREAMSPACE_JOIN_TOKEN={body['token']} streamspace agent")
    assert "--join-token" not in body["command"]


def test_a_token_on_the_command_line_still_works_but_is_warned_about(
    make_control_plane: Any, tmp_path: Path
) -> None:
    cp = make_control_plane(login_rate_per_minute=10_000)
    agent = AgentProcess(cp.url, tmp_path / "agent", cp.join_token(), "jt").start()
    try:
        wait_for(lambda: online(cp), 30, what="the agent to enrol")
        wait_for(lambda: "join_token_on_command_line" in agent.log(), 10, what="the warning")
    finally:
        agent.terminate()


def test_a_missing_or_empty_token_file_is_refused_clearly(
    make_control_plane: Any, tmp_path: Path
) -> None:
    cp = make_control_plane()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, message in (
        (tmp_path / "nope", "cannot read the join token file"),
        (empty, "is empty"),
    ):
        agent = AgentProcess(
            cp.url, tmp_path / "agent", None, "jt", extra=["--join-token-file", str(path)]
        )
        agent.start()
        assert agent.proc is not None
        assert agent.proc.wait(30) == 1
        assert message in " ".join(agent.log().split()), agent.log()
        agent.log_path.unlink()
