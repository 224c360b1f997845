"""Shared helpers for the test_agents_* modules (this module holds no tests).

`Fleet` owns everything one test starts against one control plane: real `streamspace agent`
subprocesses (each with its own state dir under tmp_path) and the sessions created through the
API. Its `cleanup()` stops every session through the API and waits for `stopped`, terminates
the agents, then scans /proc independently of any bookkeeping and fails loudly (after killing
them) if processes of the test are left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import XVNC_MISSING, AgentProcess, require, wait_for, wait_state
from streamspace_testing.rfb import RFBClient, WebSocketTransport

SESSION_MARKER = "STREAMSPACE_SESSION_ID"
TMP_PATHS: list[Path] = []
"""Every tmp_path a Fleet ran in, so module-level checks can scan for leftovers."""

FAST = {
    "loop_interval_seconds": 0.5,
    "agent_heartbeat_seconds": 1.0,
    "login_failures_before_delay": 10_000,
    "login_ip_failures_per_minute": 10_000,
}
"""Control plane settings every test in these modules wants."""


def flat(text: str) -> str:
    """Whitespace-normalised (the CLI's error printer wraps long lines)."""
    return " ".join(text.split())


# ---- /proc ------------------------------------------------------------------------------


def _stat_state(pid: str) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].split()[0].decode()


def _alive(pid: str) -> bool:
    st = _stat_state(pid)
    return st is not None and st not in ("Z", "X", "x")


def _cmdline(pid: str) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def _environ(pid: str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _pids() -> list[str]:
    return [n for n in os.listdir("/proc") if n.isdigit() and int(n) != os.getpid()]


def xvnc_pids(needle: str) -> list[int]:
    """Live Xvnc processes of a session (by its environment marker) or whose command line
    mentions `needle` (a path)."""
    marker = f"{SESSION_MARKER}={needle}".encode()
    found = []
    for pid in _pids():
        argv = _cmdline(pid)
        xvnc = argv and Path(argv[0]).name == "Xvnc"
        mentioned = any(needle in a for a in argv) or marker in _environ(pid)
        if xvnc and mentioned and _alive(pid):
            found.append(int(pid))
    return found


def session_pids(session_id: str) -> list[int]:
    """Live processes carrying the session's marker in their environment (Xvnc, reaper, app)."""
    needle = f"{SESSION_MARKER}={session_id}".encode()
    return [int(p) for p in _pids() if needle in _environ(p) and _alive(p)]


def leftovers(paths: list[Path], session_ids: list[str]) -> dict[int, str]:
    """pid -> cmdline of live processes that belong to these test dirs or sessions."""
    markers = {f"{SESSION_MARKER}={s}".encode() for s in session_ids}
    found: dict[int, str] = {}
    for pid in _pids():
        argv = _cmdline(pid)
        if not argv:
            continue
        line = " ".join(argv)
        mine = any(str(p) in line for p in paths) or bool(markers & set(_environ(pid)))
        if mine and _alive(pid):
            found[int(pid)] = line[:200]
    return found


def leftover_xvnc(paths: list[Path]) -> dict[int, str]:
    return {
        pid: line
        for pid, line in leftovers(paths, []).items()
        if Path(line.split(" ", 1)[0]).name == "Xvnc"
    }


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# ---- streaming --------------------------------------------------------------------------


async def _stream_check(url: str, type_text: str | None) -> tuple[bool, bool]:
    transport = await WebSocketTransport.connect(url)
    rfb = RFBClient(transport)
    try:
        async with asyncio.timeout(15):
            await rfb.handshake()
        await rfb.request_update(False, timeout=10)
        nonblank = await rfb.wait_for(lambda c: c.framebuffer_nonblank(), timeout=10)
        changed = False
        if type_text is not None:
            digest = rfb.framebuffer_digest()
            await rfb.type_text(type_text)
            changed = await rfb.wait_for_change(digest, timeout=5)
        return nonblank, changed
    finally:
        await rfb.close()


def stream(
    cp: Any, client: httpx.Client, session_id: str, type_text: str | None = None
) -> tuple[bool, bool]:
    """Connect through the control plane's tunnel: (framebuffer non-blank, typing changed it)."""
    r = client.post(f"/api/v1/sessions/{session_id}/connect")
    assert r.status_code == 200, r.text
    body = r.json()
    url = f"ws://127.0.0.1:{cp.port}{body['ws_path']}?ticket={body['ticket']}"
    return asyncio.run(_stream_check(url, type_text))


# ---- the fleet --------------------------------------------------------------------------


class Fleet:
    def __init__(self, cp: Any, tmp_path: Path) -> None:
        self.cp = cp
        self.tmp = tmp_path
        self.admin = cp.login()
        self.agents: list[AgentProcess] = []
        self.sessions: list[str] = []
        self.clients: list[httpx.Client] = [self.admin]
        self.sigstopped: set[int] = set()
        TMP_PATHS.append(tmp_path)

    # agents

    def join_token(self) -> str:
        r = self.admin.post("/api/v1/agents/join-tokens", json={})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def agent(
        self,
        cluster_id: str,
        *,
        name: str | None = None,
        max_sessions: int = 10,
        token: str | bool | None = True,
        start: bool = True,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        name = name or f"agent-{cluster_id}-{len(self.agents)}"
        join = self.join_token() if token is True else (token or None)
        proc = AgentProcess(
            self.cp.url,
            self.tmp / name,
            join,  # type: ignore[arg-type]
            cluster_id,
            max_sessions=max_sessions,
            name=name,
            env=env,
        )
        self.agents.append(proc)
        if start:
            proc.start()
        return proc

    def restart(self, agent: AgentProcess) -> AgentProcess:
        """Start the same agent again: same state dir, no join token."""
        agent.kill()
        fresh = AgentProcess(
            self.cp.url,
            agent.state_dir,
            None,
            agent.args[agent.args.index("--cluster-id") + 1],
            max_sessions=int(agent.args[agent.args.index("--max-sessions") + 1]),
            name=agent.args[agent.args.index("--name") + 1],
            env=agent.env,
        )
        self.agents.append(fresh)
        return fresh.start()

    @staticmethod
    def agent_id(agent: AgentProcess) -> str:
        data = json.loads((agent.state_dir / "agent.json").read_text())
        return str(data["agent_id"])

    def agent_view(self, agent_id: str) -> dict[str, Any]:
        r = self.admin.get(f"/api/v1/agents/{agent_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def wait_online(self, agent: AgentProcess, timeout: float = 30) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if agent.proc is not None and agent.proc.poll() is not None:
                raise AssertionError(f"agent exited ({agent.proc.returncode}):\n{agent.log()}")
            if not (agent.state_dir / "agent.json").exists():
                return None
            view = self.agent_view(self.agent_id(agent))
            return view if view["status"] == "online" else None

        result: dict[str, Any] = wait_for(check, timeout, what=f"agent {agent.state_dir.name}")
        return result

    def wait_exit(self, agent: AgentProcess, timeout: float = 30) -> int:
        assert agent.proc is not None
        try:
            return agent.proc.wait(timeout)
        except Exception:
            raise AssertionError(f"agent did not exit:\n{agent.log()}") from None

    def sigstop(self, agent: AgentProcess) -> None:
        assert agent.proc is not None
        self.sigstopped.add(agent.proc.pid)
        os.kill(agent.proc.pid, signal.SIGSTOP)

    def sigcont(self, agent: AgentProcess) -> None:
        assert agent.proc is not None
        self.sigstopped.discard(agent.proc.pid)
        os.kill(agent.proc.pid, signal.SIGCONT)

    # sessions

    def user(
        self, username: str = "alice", role: str = "user", password: str = "user-pass-123"
    ) -> httpx.Client:
        r = self.admin.post(
            "/api/v1/users", json={"username": username, "password": password, "role": role}
        )
        assert r.status_code == 201, r.text
        client: httpx.Client = self.cp.login(username, password)
        self.clients.append(client)
        return client

    def create(self, client: httpx.Client, **body: Any) -> dict[str, Any]:
        r = client.post("/api/v1/sessions", json={"template": "xterm", **body})
        assert r.status_code == 201, r.text
        session: dict[str, Any] = r.json()
        self.sessions.append(session["id"])
        return session

    def get(self, session_id: str) -> dict[str, Any]:
        r = self.admin.get(f"/api/v1/sessions/{session_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def commands(self, session_id: str) -> list[Any]:
        from sqlalchemy import select

        from streamspace.db.models import AgentCommand

        async def q() -> list[Any]:
            async with self.cp.state.db() as db:
                rows = (
                    await db.scalars(
                        select(AgentCommand)
                        .where(AgentCommand.session_id == session_id)
                        .order_by(AgentCommand.created_at)
                    )
                ).all()
                return list(rows)

        result: list[Any] = self.cp.run(q())
        return result

    # cleanup

    def _agent_for(self, agent_id: str | None) -> AgentProcess | None:
        for agent in reversed(self.agents):
            try:
                if agent_id and self.agent_id(agent) == agent_id:
                    return agent
            except OSError:
                continue
        return None

    def _alive_agent(self, agent_id: str | None) -> bool:
        agent = self._agent_for(agent_id)
        return agent is not None and agent.proc is not None and agent.proc.poll() is None

    def cleanup(self) -> None:
        problems: list[str] = []
        for pid in list(self.sigstopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.sigstopped.clear()
        try:
            self._stop_sessions(problems)
        except Exception as exc:  # still terminate agents and scan
            problems.append(f"stopping sessions crashed: {exc!r}")
        for agent in self.agents:
            agent.terminate()
        deadline = time.time() + 5
        left = leftovers([self.tmp], self.sessions)
        while left and time.time() < deadline:
            time.sleep(0.2)
            left = leftovers([self.tmp], self.sessions)
        if left:
            kill_pids(list(left))
            problems.append(f"processes left behind (now killed): {left}")
        for client in self.clients:
            client.close()
        if problems:
            raise AssertionError("cleanup problems:\n" + "\n".join(problems))

    def _stop_sessions(self, problems: list[str]) -> None:
        pending = []
        for sid in self.sessions:
            s = self.get(sid)
            if s["state"] == "stopped":
                continue
            if s["state"] != "stopping":
                if s["agent_id"] and not self._alive_agent(s["agent_id"]):
                    self._revive(s["agent_id"])
                r = self.admin.delete(f"/api/v1/sessions/{sid}")
                if r.status_code != 202:
                    problems.append(f"DELETE {sid}: {r.status_code} {r.text}")
                    continue
            pending.append(sid)
        for sid in pending:
            s = self.get(sid)
            if s["state"] == "stopping" and not self._alive_agent(s["agent_id"]):
                self._revive(s["agent_id"])
            try:
                wait_state(self.admin, sid, {"stopped"}, timeout=30)
            except AssertionError as exc:
                problems.append(str(exc))

    def _revive(self, agent_id: str | None) -> None:
        """Restart a dead agent so the sessions it still hosts can be stopped through the API."""
        agent = self._agent_for(agent_id)
        if agent is None or not (agent.state_dir / "agent.json").exists():
            return
        fresh = self.restart(agent)
        with_timeout = time.time() + 20
        while time.time() < with_timeout:
            if fresh.proc is not None and fresh.proc.poll() is not None:
                return  # refused (revoked / rotated): the /proc scan will catch leftovers
            if self.cp.state.hub.is_connected(agent_id):
                return
            time.sleep(0.2)


def make_fleet(cp: Any, tmp_path: Path, fleets: list[Fleet]) -> Fleet:
    fleet = Fleet(cp, tmp_path / f"fleet{len(fleets)}")
    fleets.append(fleet)
    return fleet


def module_xvnc_check(start: int) -> Callable[[], None]:
    """Returns a check that no Xvnc of any tmp_path registered since `start` is left."""

    def check() -> None:
        paths = TMP_PATHS[start:]
        if not paths:
            return
        left = leftover_xvnc(paths)
        if left:
            kill_pids(list(left))
        assert not left, f"Xvnc processes left behind by this module (now killed): {left}"

    return check


# ---- fixtures shared by the test_agents_* modules (import them by name) ----


@pytest.fixture(scope="module", autouse=True)
def _no_xvnc_left_behind() -> Iterator[None]:
    check = module_xvnc_check(len(TMP_PATHS))
    yield
    check()


@pytest.fixture(autouse=True)
def _needs_xvnc() -> None:
    require(XVNC_MISSING)


@pytest.fixture
def fleet(make_control_plane: Any, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(**settings: Any) -> Fleet:
        return make_fleet(make_control_plane(**{**FAST, **settings}), tmp_path, fleets)

    yield make
    for f in fleets:
        f.cleanup()
