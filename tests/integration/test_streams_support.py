"""Shared helpers for the test_streams_* modules (this module holds no tests).

A "desk" is one real control plane (in-thread uvicorn) plus one real `streamspace agent`
subprocess with the local backend, so sessions are genuine Xvnc + xterm processes and every
viewer goes browser WebSocket -> control plane -> agent WebSocket -> Xvnc TCP port.

Teardown stops every session through the API, terminates the agent and then scans /proc for
any process that still references the desk's temporary directory (Xvnc's `-auth` path and
the app's HOME live there): those are killed by pid and reported as a leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import update
from websockets.asyncio.client import ClientConnection, connect

from conftest import XVNC_MISSING, AgentProcess, ControlPlane, require, wait_for, wait_state
from streamspace.db.models import Session as SessionRow
from streamspace_testing.rfb import RFBClient, WebSocketTransport

STREAM_PATH = "/api/v1/streams/ws"


@dataclass
class Desk:
    cp: ControlPlane
    admin: httpx.Client
    agent: AgentProcess
    root: Path
    clients: list[httpx.Client] = field(default_factory=list)

    # ---- sessions ---------------------------------------------------------------------------

    def start_session(
        self, client: httpx.Client | None = None, template: str = "xterm", timeout: float = 60
    ) -> dict[str, Any]:
        c = client or self.admin
        r = c.post("/api/v1/sessions", json={"template": template})
        assert r.status_code == 201, r.text
        return wait_state(c, r.json()["id"], "running", timeout)

    def stop_session(self, session_id: str, timeout: float = 30) -> dict[str, Any]:
        r = self.admin.delete(f"/api/v1/sessions/{session_id}")
        assert r.status_code == 202, r.text
        return wait_state(self.admin, session_id, {"stopped", "failed"}, timeout)

    def user(self, name: str, role: str = "user") -> httpx.Client:
        c = self.cp.create_user(name, role=role)
        self.clients.append(c)
        return c

    def set_columns(self, session_id: str, **values: Any) -> None:
        """Write session columns directly (for values the API refuses, e.g. tiny timeouts)."""

        async def apply() -> None:
            async with self.cp.state.db() as db:
                await db.execute(
                    update(SessionRow).where(SessionRow.id == session_id).values(**values)
                )
                await db.commit()

        self.cp.run(apply())

    def row(self, session_id: str) -> SessionRow:
        async def load() -> SessionRow:
            async with self.cp.state.db() as db:
                row = await db.get(SessionRow, session_id)
                assert row is not None
                return row

        return self.cp.run(load())  # type: ignore[no-any-return]

    # ---- streams ----------------------------------------------------------------------------

    def connect(self, session_id: str, client: httpx.Client | None = None) -> dict[str, Any]:
        r = (client or self.admin).post(f"/api/v1/sessions/{session_id}/connect")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def ws_url(self, ticket: str | None, path: str = STREAM_PATH) -> str:
        base = f"ws://127.0.0.1:{self.cp.port}{path}"
        return base if ticket is None else f"{base}?ticket={ticket}"

    async def open_ws(
        self, session_id: str, client: httpx.Client | None = None, **kwargs: Any
    ) -> ClientConnection:
        ticket = self.connect(session_id, client)["ticket"]
        options: dict[str, Any] = {
            "subprotocols": ["binary"],
            "max_size": None,
            "compression": None,
            "open_timeout": 20,
        }
        options.update(kwargs)
        return await connect(self.ws_url(ticket), **options)

    async def open_viewer(
        self, session_id: str, client: httpx.Client | None = None, timeout: float = 20
    ) -> RFBClient:
        ws = await self.open_ws(session_id, client)
        async with asyncio.timeout(timeout):
            return await RFBClient.over(WebSocketTransport(ws))

    # ---- agent-side observations ------------------------------------------------------------

    def agent_log_count(self, event: str) -> int:
        return self.agent.log().count(event)


# ---- setup and teardown ------------------------------------------------------------------------


def agents_online(admin: httpx.Client) -> list[dict[str, Any]]:
    r = admin.get("/api/v1/agents")
    assert r.status_code == 200, r.text
    return [a for a in r.json() if a["status"] == "online"]


@contextlib.contextmanager
def desk(
    root: Path,
    make_control_plane: Any = None,
    templates: list[dict[str, Any]] | None = None,
    **settings: Any,
) -> Iterator[Desk]:
    """A control plane + one local-backend agent; everything is stopped and checked after.

    Without `make_control_plane` the control plane is built here (so module-scoped fixtures
    can share one desk) and stopped on exit.
    """
    require(XVNC_MISSING)
    own = make_control_plane is None
    cp: ControlPlane = (
        ControlPlane(root / "cp", **settings).start() if own else make_control_plane(**settings)
    )
    try:
        admin = cp.login()
        for spec in templates or []:
            r = admin.post("/api/v1/templates", json=spec)
            assert r.status_code == 201, r.text
        r = admin.post("/api/v1/agents/join-tokens", json={})
        assert r.status_code == 201, r.text
        agent = AgentProcess(cp.url, root / "agent", r.json()["token"], "streams").start()
        d = Desk(cp, admin, agent, root)
        try:
            wanted = {"xterm", *(t["name"] for t in templates or [])}

            def ready() -> bool:
                online = agents_online(admin)
                return bool(online) and wanted <= set(online[0]["templates"])

            try:
                wait_for(ready, 30, what="the agent to come online with the xterm templates")
            except AssertionError:
                raise AssertionError(f"agent never came online; log:\n{agent.log()}") from None
            yield d
        finally:
            teardown(d)
    finally:
        if own:
            cp.stop()


def teardown(d: Desk) -> None:
    errors: list[str] = []
    try:
        if d.agent.proc is not None and d.agent.proc.poll() is None:
            r = d.admin.get("/api/v1/sessions", params={"all": "true", "active": "true"})
            ids = [s["id"] for s in r.json()["items"]] if r.status_code == 200 else []
            for sid in ids:
                with contextlib.suppress(Exception):
                    d.admin.delete(f"/api/v1/sessions/{sid}")
            for sid in ids:
                try:
                    wait_state(d.admin, sid, {"stopped", "failed"}, 30)
                except AssertionError as exc:
                    errors.append(str(exc))
    finally:
        d.agent.terminate()
        for c in [d.admin, *d.clients]:
            c.close()
        leaked = kill_processes_under(d.root)
    if leaked:
        errors.append(f"processes left running under {d.root}: {leaked}")
    assert not errors, "; ".join(errors)


def processes_under(root: Path) -> list[tuple[int, str]]:
    """Live processes whose command line or environment mentions `root`."""
    needle = str(root).encode()
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            environ = Path(f"/proc/{name}/environ").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].startswith("Z"):
            continue
        if needle in cmdline or needle in environ:
            found.append((int(name), cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]))
    return found


def kill_processes_under(root: Path) -> list[tuple[int, str]]:
    leaked = processes_under(root)
    for pid, _ in leaked:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if leaked:
        deadline = time.time() + 5
        while processes_under(root) and time.time() < deadline:
            time.sleep(0.1)
    return leaked


def established_to(port: int) -> int:
    """ESTABLISHED TCP connections whose remote end is 127.0.0.1:`port` (client side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "01" and int(parts[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
