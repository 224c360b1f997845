"""The agent runtime against an in-test control-plane double.

`ControlPlaneDouble` is a test double of the hub: a tiny Starlette app under uvicorn on
127.0.0.1:0 answering enrol/catalog over HTTP and accepting the agent's control and stream
WebSockets, each handed to the test to drive frame by frame. (Everything is served by one
uvicorn app because the agent derives all URLs from one base URL, and `websockets`' own server
refuses request bodies, so it cannot answer the enrolment POST.)

`FakeBackend` is an in-memory test double of the Backend ABC: no processes, only bookkeeping,
plus per-session asyncio.Event gates so a test can hold a command mid-flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import streamspace
from streamspace import logs, protocol
from streamspace.agent.backends.base import Backend, BackendError, BackendOptions
from streamspace.agent.runtime import Agent, AgentConfig, AgentError
from streamspace.protocol import (
    Ack,
    Capacity,
    Catalog,
    CatalogEntry,
    Command,
    Endpoint,
    EnrollRequest,
    EnrollResponse,
    ErrorMessage,
    Heartbeat,
    Hello,
    ImageLaunch,
    InventoryItem,
    Isolation,
    LocalLaunch,
    OpenStream,
    Resources,
    Result,
    SessionSpec,
    SessionStatus,
    StreamFailed,
    Welcome,
)

JOIN_TOKEN = "join-token-valid"
EXPIRED_TOKEN = "join-token-expired"
CREDENTIAL = "agent-credential-secret"
AGENT_ID = "agent-0001"
RECV_TIMEOUT = 3.0

OnExit = Callable[[str, str], Awaitable[None]]


# ---- backend test double ---------------------------------------------------------------------


class FakeBackend(Backend):
    """Test double of Backend: sessions live in a dict; `gates` hold start/wake mid-flight."""

    kind = "local"

    def __init__(self, sessions: Iterable[InventoryItem] = ()) -> None:
        self.sessions: dict[str, InventoryItem] = {s.session_id: s for s in sessions}
        self.calls: list[tuple[str, str]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.runnable: set[str] | None = None
        self.health: tuple[bool, str] = (True, "")
        self.on_exit: OnExit | None = None
        self.watch_calls = 0
        self.next_port = 5901

    @classmethod
    def from_options(cls, options: BackendOptions) -> Self:
        return cls()

    def _event(self, table: dict[str, asyncio.Event], session_id: str) -> asyncio.Event:
        return table.setdefault(session_id, asyncio.Event())

    async def _run(self, spec: SessionSpec, action: str) -> Endpoint:
        self.calls.append((action, spec.session_id))
        self._event(self.entered, spec.session_id).set()
        gate = self.gates.get(spec.session_id)
        if gate is not None:
            await gate.wait()
        try:
            if spec.template == "broken":
                raise BackendError("template 'broken' cannot start: xterm not installed")
            if spec.template == "crash":
                raise RuntimeError("backend bug")
            existing = self.sessions.get(spec.session_id)
            if existing is not None and existing.endpoint is not None:
                port = existing.endpoint.port
            else:
                port, self.next_port = self.next_port, self.next_port + 1
            endpoint = Endpoint(port=port)
            self.sessions[spec.session_id] = InventoryItem(
                session_id=spec.session_id,
                state="running",
                endpoint=endpoint,
                user=spec.user,
                template=spec.template,
            )
            return endpoint
        finally:
            self._event(self.finished, spec.session_id).set()

    async def start(self, spec: SessionSpec) -> Endpoint:
        return await self._run(spec, "start")

    async def wake(self, spec: SessionSpec) -> Endpoint:
        return await self._run(spec, "wake")

    async def stop(self, session_id: str) -> None:
        self.calls.append(("stop", session_id))
        self.sessions.pop(session_id, None)

    async def hibernate(self, session_id: str) -> None:
        self.calls.append(("hibernate", session_id))
        item = self.sessions.get(session_id)
        if item is not None:
            self.sessions[session_id] = item.model_copy(update={"state": "hibernated"})

    def isolation(self) -> Isolation:
        return Isolation(mode="uid-sandbox", detail="test double")

    async def status(self, session_id: str) -> InventoryItem:
        return self.sessions.get(session_id) or InventoryItem(
            session_id=session_id, state="unknown"
        )

    async def inventory(self) -> list[InventoryItem]:
        return list(self.sessions.values())

    def runnable_templates(self, catalog: Iterable[CatalogEntry]) -> list[str]:
        return [
            e.name
            for e in catalog
            if e.local is not None and (self.runnable is None or e.name in self.runnable)
        ]

    async def healthy(self) -> tuple[bool, str]:
        return self.health

    async def watch_exits(self, on_exit: OnExit) -> None:
        self.watch_calls += 1
        self.on_exit = on_exit

    def count(self, action: str, session_id: str) -> int:
        return self.calls.count((action, session_id))


# ---- control plane test double -------------------------------------------------------------


class AgentSocket:
    """The server end of one agent WebSocket, driven by the test."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.closed = asyncio.Event()

    async def recv(self, *, skip_heartbeats: bool = True) -> protocol.AgentMessage:
        while True:
            frame = await asyncio.wait_for(self.ws.receive(), RECV_TIMEOUT)
            assert frame["type"] == "websocket.receive", f"agent disconnected: {frame}"
            text = frame.get("text")
            assert text is not None, "control messages must be text frames"
            msg = protocol.parse_agent_message(text)  # exactly one message per frame
            if skip_heartbeats and isinstance(msg, Heartbeat):
                continue
            return msg

    async def recv_nothing(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.recv(), seconds)

    async def send(self, msg: protocol.ServerMessage) -> None:
        await self.ws.send_text(protocol.encode(msg))

    async def send_raw(self, text: str) -> None:
        await self.ws.send_text(text)

    async def close(self, code: int = 1012) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code)
        self.closed.set()


class ControlPlaneDouble:
    """Test double of the hub's agent endpoints (enrol, catalog, connect, streams)."""

    def __init__(self) -> None:
        self.enrolments: list[EnrollRequest] = []
        self.catalog_requests = 0
        self.reject_ws = False
        self.catalog = Catalog(
            templates=[
                CatalogEntry(name="xterm", local=LocalLaunch(command=["xterm"])),
                CatalogEntry(name="gedit", local=LocalLaunch(command=["gedit"])),
                CatalogEntry(name="firefox", image=ImageLaunch(image="firefox:latest")),
            ]
        )
        self.connections: asyncio.Queue[AgentSocket] = asyncio.Queue()
        self.streams: asyncio.Queue[tuple[str, AgentSocket]] = asyncio.Queue()
        self._sockets: list[AgentSocket] = []
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.url = ""

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(protocol.AGENT_ENROLL_PATH, self._enroll, methods=["POST"]),
                Route(protocol.AGENT_CATALOG_PATH, self._catalog, methods=["GET"]),
                WebSocketRoute(protocol.AGENT_CONNECT_PATH, self._connect),
                WebSocketRoute(protocol.AGENT_STREAM_PATH_PREFIX + "{stream_id}", self._stream),
            ]
        )

    @staticmethod
    def _problem(status: int, title: str, detail: str) -> Response:
        body = {"type": "about:blank", "title": title, "detail": detail, "status": status}
        return Response(json.dumps(body), status, media_type="application/problem+json")

    async def _enroll(self, request: Request) -> Response:
        body = EnrollRequest.model_validate_json(await request.body())
        if body.join_token == EXPIRED_TOKEN:
            return self._problem(401, "Unauthorized", "join token expired")
        if body.join_token != JOIN_TOKEN:
            return self._problem(401, "Unauthorized", "unknown join token")
        self.enrolments.append(body)
        return JSONResponse(
            EnrollResponse(agent_id=AGENT_ID, credential=CREDENTIAL).model_dump(mode="json")
        )

    async def _catalog(self, request: Request) -> Response:
        self.catalog_requests += 1
        if request.headers.get("authorization") != f"Bearer {CREDENTIAL}":
            return self._problem(401, "Unauthorized", "invalid agent credential")
        return JSONResponse(self.catalog.model_dump(mode="json"))

    async def _accept(self, ws: WebSocket) -> AgentSocket | None:
        if self.reject_ws or ws.headers.get("authorization") != f"Bearer {CREDENTIAL}":
            await ws.close(code=1008)  # before accept: uvicorn answers HTTP 403
            return None
        await ws.accept()
        sock = AgentSocket(ws)
        self._sockets.append(sock)
        return sock

    async def _connect(self, ws: WebSocket) -> None:
        sock = await self._accept(ws)
        if sock is not None:
            await self.connections.put(sock)
            await sock.closed.wait()

    async def _stream(self, ws: WebSocket) -> None:
        sock = await self._accept(ws)
        if sock is not None:
            await self.streams.put((ws.path_params["stream_id"], sock))
            await sock.closed.wait()

    async def next_connection(self) -> AgentSocket:
        return await asyncio.wait_for(self.connections.get(), RECV_TIMEOUT)

    async def next_stream(self) -> tuple[str, AgentSocket]:
        return await asyncio.wait_for(self.streams.get(), RECV_TIMEOUT)

    async def handshake(
        self, *, keep: Iterable[str] = (), heartbeat_seconds: float = 30.0
    ) -> tuple[AgentSocket, Hello]:
        sock = await self.next_connection()
        hello = await sock.recv()
        assert isinstance(hello, Hello)
        await sock.send(
            Welcome(agent_id=hello.agent_id, heartbeat_seconds=heartbeat_seconds, keep=list(keep))
        )
        return sock, hello

    async def start(self) -> None:
        config = uvicorn.Config(
            self._app(),
            host="127.0.0.1",
            port=0,
            lifespan="off",
            log_level="warning",
            ws="websockets-sansio",
            timeout_graceful_shutdown=2,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.005)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        for sock in self._sockets:
            sock.closed.set()
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 5)


class _QuietServer(uvicorn.Server):
    """uvicorn without signal handlers: it shares pytest's event loop and process."""

    def capture_signals(self) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return contextlib.nullcontext()


# ---- helpers --------------------------------------------------------------------------------


@pytest.fixture
async def cp() -> AsyncIterator[ControlPlaneDouble]:
    double = ControlPlaneDouble()
    await double.start()
    try:
        yield double
    finally:
        await double.close()


def make_config(cp: ControlPlaneDouble, state_dir: Path, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "server": cp.url,
        "state_dir": state_dir,
        "name": "host-1",
        "cluster_id": "eu-1",
        "cluster_name": "Europe 1",
        "region": "eu-west",
        "backend": "local",
        "capacity": Capacity(max_sessions=4, cpu_millis=8000, memory_mb=16384),
        "join_token": JOIN_TOKEN,
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 0.5,
        "handshake_timeout_seconds": 3.0,
    }
    values.update(overrides)
    return AgentConfig(**values)


@contextlib.asynccontextmanager
async def running(
    cp: ControlPlaneDouble,
    state_dir: Path,
    backend: Backend | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[Agent, asyncio.Task[None]]]:
    agent = Agent(make_config(cp, state_dir, **overrides), backend or FakeBackend())
    task = asyncio.create_task(agent.run())
    try:
        yield agent, task
    finally:
        await asyncio.wait_for(agent.stop(), 5)
        await asyncio.gather(task, return_exceptions=True)


async def eventually(predicate: Callable[[], bool], timeout: float = RECV_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def spec(session_id: str, template: str = "xterm", **kwargs: Any) -> SessionSpec:
    return SessionSpec(
        session_id=session_id, user_id="a11ce", user="alice", template=template, **kwargs
    )


def start(command_id: str, session_id: str, template: str = "xterm", **kwargs: Any) -> Command:
    return Command(
        command_id=command_id,
        action="start",
        session_id=session_id,
        spec=spec(session_id, template, **kwargs),
    )


# ---- enrolment and hello -------------------------------------------------------------------


async def test_enrolment_stores_credential_and_restart_reuses_it(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    async with running(cp, tmp_path) as (agent, _):
        _, hello = await cp.handshake()
        await eventually(lambda: agent.connected)
        assert agent.agent_id == AGENT_ID
    assert hello.agent_id == AGENT_ID
    assert len(cp.enrolments) == 1
    enrol = cp.enrolments[0]
    assert (enrol.name, enrol.cluster_id, enrol.cluster_name, enrol.region, enrol.backend) == (
        "host-1",
        "eu-1",
        "Europe 1",
        "eu-west",
        "local",
    )

    path = tmp_path / "agent.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["agent_id"] == AGENT_ID
    assert stored["credential"] == CREDENTIAL
    assert stored["server"] == cp.url
    assert (stored["cluster_id"], stored["backend"], stored["name"]) == ("eu-1", "local", "host-1")

    # Restart: the stored credential wins; the (now stale) join token is ignored.
    async with running(cp, tmp_path, join_token=EXPIRED_TOKEN) as (agent2, _):
        _, hello2 = await cp.handshake()
        await eventually(lambda: agent2.connected)
    assert hello2.agent_id == AGENT_ID
    assert len(cp.enrolments) == 1


async def test_hello_content(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    backend = FakeBackend(
        [
            InventoryItem(session_id="s-1", state="running", endpoint=Endpoint(port=5901)),
            InventoryItem(session_id="s-2", state="hibernated"),
        ]
    )
    async with running(cp, tmp_path, backend):
        _, hello = await cp.handshake(keep=["s-1", "s-2"])
    assert hello.protocol_version == protocol.PROTOCOL_VERSION
    assert hello.agent_id == AGENT_ID
    assert (hello.cluster_id, hello.cluster_name, hello.region) == ("eu-1", "Europe 1", "eu-west")
    assert hello.backend == "local"
    assert hello.capacity == Capacity(max_sessions=4, cpu_millis=8000, memory_mb=16384)
    assert hello.templates == ["xterm", "gedit"]  # firefox is image-only: not runnable here
    assert hello.inventory == await backend.inventory()
    assert hello.version == streamspace.__version__
    assert cp.catalog_requests == 1


async def test_enrolment_refused_raises_server_detail(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    agent = Agent(make_config(cp, tmp_path, join_token=EXPIRED_TOKEN), FakeBackend())
    with pytest.raises(AgentError, match="join token expired"):
        await asyncio.wait_for(agent.run(), RECV_TIMEOUT)
    assert not (tmp_path / "agent.json").exists()


async def test_not_enrolled_without_join_token(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    agent = Agent(make_config(cp, tmp_path, join_token=None), FakeBackend())
    with pytest.raises(AgentError, match="no join token"):
        await asyncio.wait_for(agent.run(), RECV_TIMEOUT)


# ---- commands -------------------------------------------------------------------------------


async def test_two_commands_run_concurrently(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    backend = FakeBackend()
    backend.gates = {"s-1": asyncio.Event(), "s-2": asyncio.Event()}
    async with running(cp, tmp_path, backend):
        sock, _ = await cp.handshake()
        await sock.send(start("c-1", "s-1"))
        await sock.send(start("c-2", "s-2"))
        assert await sock.recv() == Ack(command_id="c-1")
        assert await sock.recv() == Ack(command_id="c-2")
        # Both are inside the backend at once: neither blocks the other or the read loop.
        await asyncio.wait_for(backend._event(backend.entered, "s-1").wait(), RECV_TIMEOUT)
        await asyncio.wait_for(backend._event(backend.entered, "s-2").wait(), RECV_TIMEOUT)
        await sock.recv_nothing(0.1)
        backend.gates["s-2"].set()
        r2 = await sock.recv()
        backend.gates["s-1"].set()
        r1 = await sock.recv()
    assert r2 == Result(command_id="c-2", ok=True, endpoint=Endpoint(port=5901))
    assert r1 == Result(command_id="c-1", ok=True, endpoint=Endpoint(port=5902))


async def test_concurrency_is_bounded_by_max_concurrent_commands(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    backend = FakeBackend()
    backend.gates = {"s-1": asyncio.Event(), "s-2": asyncio.Event()}
    async with running(cp, tmp_path, backend, max_concurrent_commands=1):
        sock, _ = await cp.handshake()
        await sock.send(start("c-1", "s-1"))
        await sock.send(start("c-2", "s-2"))
        assert await sock.recv() == Ack(command_id="c-1")
        assert await sock.recv() == Ack(command_id="c-2")
        await asyncio.wait_for(backend._event(backend.entered, "s-1").wait(), RECV_TIMEOUT)
        await asyncio.sleep(0.05)
        assert ("start", "s-2") not in backend.calls
        backend.gates["s-1"].set()
        backend.gates["s-2"].set()
        results = {(await sock.recv()).command_id for _ in range(2)}  # type: ignore[union-attr]
    assert results == {"c-1", "c-2"}


async def test_duplicate_command_is_not_executed_twice(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    backend = FakeBackend()
    backend.gates = {"s-1": asyncio.Event()}
    async with running(cp, tmp_path, backend):
        sock, _ = await cp.handshake()
        cmd = start("c-1", "s-1")
        await sock.send(cmd)
        assert await sock.recv() == Ack(command_id="c-1")
        await asyncio.wait_for(backend._event(backend.entered, "s-1").wait(), RECV_TIMEOUT)
        await sock.send(cmd)  # duplicate while running: acked again, not run again
        assert await sock.recv() == Ack(command_id="c-1")
        backend.gates["s-1"].set()
        result = await sock.recv()
        assert isinstance(result, Result) and result.ok
        await sock.send(cmd)  # duplicate after completion: the cached result is resent
        assert await sock.recv() == Ack(command_id="c-1")
        assert await sock.recv() == result
        await sock.recv_nothing(0.05)
    assert backend.count("start", "s-1") == 1


async def test_all_actions_and_failures(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    backend = FakeBackend()
    async with running(cp, tmp_path, backend):
        sock, _ = await cp.handshake()
        commands: list[Command] = [
            start("c-1", "s-1"),
            Command(command_id="c-2", action="hibernate", session_id="s-1"),
            Command(command_id="c-3", action="wake", session_id="s-1", spec=spec("s-1")),
            Command(command_id="c-4", action="stop", session_id="s-1"),
            start("c-5", "s-2", template="broken"),
            start("c-6", "s-3", template="crash"),
            Command(command_id="c-7", action="start", session_id="s-4"),
        ]
        results: dict[str, Result] = {}
        for cmd in commands:
            await sock.send(cmd)
            assert await sock.recv() == Ack(command_id=cmd.command_id)
            res = await sock.recv()
            assert isinstance(res, Result)
            results[res.command_id] = res
    assert results["c-1"] == Result(command_id="c-1", ok=True, endpoint=Endpoint(port=5901))
    assert results["c-2"] == Result(command_id="c-2", ok=True)
    assert results["c-3"] == Result(command_id="c-3", ok=True, endpoint=Endpoint(port=5901))
    assert results["c-4"] == Result(command_id="c-4", ok=True)
    assert results["c-5"] == Result(
        command_id="c-5", ok=False, error="template 'broken' cannot start: xterm not installed"
    )
    assert results["c-6"] == Result(command_id="c-6", ok=False, error="RuntimeError: backend bug")
    assert not results["c-7"].ok and "spec" in results["c-7"].error
    assert backend.calls[:4] == [
        ("start", "s-1"),
        ("hibernate", "s-1"),
        ("wake", "s-1"),
        ("stop", "s-1"),
    ]


async def test_unknown_inventory_sessions_are_stopped(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    backend = FakeBackend(
        [
            InventoryItem(session_id="s-keep", state="running", endpoint=Endpoint(port=5901)),
            InventoryItem(session_id="s-orphan", state="running", endpoint=Endpoint(port=5902)),
            InventoryItem(session_id="s-sleepy", state="hibernated"),
        ]
    )
    async with running(cp, tmp_path, backend):
        _, hello = await cp.handshake(keep=["s-keep"])
        await eventually(lambda: set(backend.sessions) == {"s-keep"})
    assert {i.session_id for i in hello.inventory} == {"s-keep", "s-orphan", "s-sleepy"}
    assert sorted(c for c in backend.calls if c[0] == "stop") == [
        ("stop", "s-orphan"),
        ("stop", "s-sleepy"),
    ]


# ---- connection behaviour -------------------------------------------------------------------


async def test_garbage_frame_gets_error_and_connection_stays(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    async with running(cp, tmp_path) as (agent, _):
        sock, _ = await cp.handshake()
        await sock.send_raw("this is { not json")
        err = await sock.recv()
        assert isinstance(err, ErrorMessage) and err.code == "invalid_json"
        await sock.send_raw('{"type": "launch_missiles"}')
        err = await sock.recv()
        assert isinstance(err, ErrorMessage) and err.code == "invalid_message"
        await sock.send(start("c-1", "s-1"))
        assert await sock.recv() == Ack(command_id="c-1")
        res = await sock.recv()
        assert isinstance(res, Result) and res.ok
        assert agent.connected
        assert cp.connections.empty()  # same connection throughout


async def test_reconnect_sends_fresh_hello_and_delivers_outage_result(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    backend = FakeBackend()
    backend.gates = {"s-1": asyncio.Event()}
    async with running(cp, tmp_path, backend) as (agent, _):
        sock1, hello1 = await cp.handshake()
        assert hello1.inventory == []
        await sock1.send(start("c-1", "s-1"))
        assert await sock1.recv() == Ack(command_id="c-1")
        await asyncio.wait_for(backend._event(backend.entered, "s-1").wait(), RECV_TIMEOUT)

        await sock1.close()
        await eventually(lambda: not agent.connected)
        # The command finishes while the agent is disconnected.
        backend.gates["s-1"].set()
        await asyncio.wait_for(backend._event(backend.finished, "s-1").wait(), RECV_TIMEOUT)
        await asyncio.sleep(0.02)

        sock2 = await cp.next_connection()
        hello2 = await sock2.recv()
        assert isinstance(hello2, Hello)
        assert [(i.session_id, i.state) for i in hello2.inventory] == [("s-1", "running")]
        assert not agent.connected
        await sock2.recv_nothing(0.1)  # nothing but Hello before Welcome
        await sock2.send(Welcome(agent_id=AGENT_ID, heartbeat_seconds=30, keep=["s-1"]))
        res = await sock2.recv()
        assert res == Result(command_id="c-1", ok=True, endpoint=Endpoint(port=5901))
        await eventually(lambda: agent.connected)
    assert backend.count("start", "s-1") == 1
    assert ("stop", "s-1") not in backend.calls


async def test_revoked_error_is_fatal(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    agent = Agent(make_config(cp, tmp_path), FakeBackend())
    task = asyncio.create_task(agent.run())
    sock = await cp.next_connection()
    assert isinstance(await sock.recv(), Hello)
    await sock.send(ErrorMessage(code="revoked", message="agent agent-0001 was revoked"))
    with pytest.raises(AgentError, match="revoked"):
        await asyncio.wait_for(task, RECV_TIMEOUT)
    assert not agent.connected
    assert cp.connections.empty()


async def test_revoked_while_connected_is_fatal(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    agent = Agent(make_config(cp, tmp_path), FakeBackend())
    task = asyncio.create_task(agent.run())
    sock, _ = await cp.handshake()
    await eventually(lambda: agent.connected)
    await sock.send(ErrorMessage(code="revoked", message="revoked by admin"))
    with pytest.raises(AgentError, match="revoked by admin"):
        await asyncio.wait_for(task, RECV_TIMEOUT)


async def test_other_error_during_handshake_retries(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    async with running(cp, tmp_path) as (agent, task):
        sock = await cp.next_connection()
        assert isinstance(await sock.recv(), Hello)
        await sock.send(ErrorMessage(code="overloaded", message="try again later"))
        _, hello = await cp.handshake()
        assert hello.agent_id == AGENT_ID
        await eventually(lambda: agent.connected)
        assert not task.done()


async def test_rejected_websocket_handshake_is_fatal(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    cp.reject_ws = True
    agent = Agent(make_config(cp, tmp_path), FakeBackend())
    with pytest.raises(AgentError, match=r"agent credential rejected \(revoked\?\)"):
        await asyncio.wait_for(agent.run(), RECV_TIMEOUT)


async def test_stop_before_connect_returns(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    agent = Agent(make_config(cp, tmp_path, server="http://127.0.0.1:9"), FakeBackend())
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(0.05)
    await asyncio.wait_for(agent.stop(), RECV_TIMEOUT)
    await asyncio.wait_for(task, RECV_TIMEOUT)  # returns normally, no exception


async def test_heartbeat_reports_load_health_and_template_changes(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    backend = FakeBackend(
        [InventoryItem(session_id="s-adopted", state="running", endpoint=Endpoint(port=5900))]
    )
    async with running(cp, tmp_path, backend):
        sock, _ = await cp.handshake(keep=["s-adopted"], heartbeat_seconds=0.05)
        await sock.send(start("c-1", "s-1", resources=Resources(cpu_millis=1500, memory_mb=2048)))
        assert await sock.recv() == Ack(command_id="c-1")
        assert isinstance(await sock.recv(), Result)

        async def next_heartbeat() -> Heartbeat:
            while True:
                msg = await sock.recv(skip_heartbeats=False)
                if isinstance(msg, Heartbeat):
                    return msg

        hb = await next_heartbeat()
        while hb.load.sessions != 2:  # a heartbeat may predate the start
            hb = await next_heartbeat()
        assert (hb.load.cpu_millis, hb.load.memory_mb) == (1500, 2048)
        assert hb.healthy and hb.templates is None

        backend.runnable = {"gedit"}
        backend.health = (False, "disk full")
        hb = await next_heartbeat()
        while hb.healthy:
            hb = await next_heartbeat()
        assert hb.detail == "disk full"
        assert hb.templates == ["gedit"]
        hb = await next_heartbeat()
        assert hb.templates is None  # only sent when it changes


async def test_backend_exit_is_reported(cp: ControlPlaneDouble, tmp_path: Path) -> None:
    backend = FakeBackend()
    async with running(cp, tmp_path, backend):
        sock, _ = await cp.handshake()
        await eventually(lambda: backend.on_exit is not None)
        assert backend.on_exit is not None
        await backend.on_exit("s-9", "exit code 3")
        assert await sock.recv() == SessionStatus(
            session_id="s-9", state="exited", reason="exit code 3"
        )
    assert backend.watch_calls == 1


class FlakyWatchBackend(FakeBackend):
    """Its exit watch fails the first time it is asked for."""

    async def watch_exits(self, on_exit: OnExit) -> None:
        self.watch_calls += 1
        if self.watch_calls == 1:
            raise RuntimeError("exit watch not ready")
        self.on_exit = on_exit


async def test_a_failed_exit_watch_is_asked_for_again_on_the_next_connection(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    backend = FlakyWatchBackend()
    async with running(cp, tmp_path, backend) as (agent, _):
        sock1, _ = await cp.handshake()
        await eventually(lambda: agent.connected)  # serving sessions without the watch
        assert (backend.watch_calls, backend.on_exit) == (1, None)
        await sock1.close()
        sock2, _ = await cp.handshake()
        await eventually(lambda: backend.on_exit is not None)
        assert backend.on_exit is not None
        await backend.on_exit("s-3", "app exited with code 1")
        assert await sock2.recv() == SessionStatus(
            session_id="s-3", state="exited", reason="app exited with code 1"
        )
    assert backend.watch_calls == 2


async def test_exit_during_outage_is_delivered_after_reconnect(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    backend = FakeBackend()
    async with running(cp, tmp_path, backend) as (agent, _):
        sock1, _ = await cp.handshake()
        await eventually(lambda: agent.connected and backend.on_exit is not None)
        await sock1.close()
        await eventually(lambda: not agent.connected)
        assert backend.on_exit is not None
        await backend.on_exit("s-1", "app exited with code 0")
        sock2, _ = await cp.handshake()
        assert await sock2.recv() == SessionStatus(
            session_id="s-1", state="exited", reason="app exited with code 0"
        )


# ---- streams --------------------------------------------------------------------------------


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_open_stream_pumps_bytes_unmodified(
    cp: ControlPlaneDouble, tmp_path: Path, echo_port: int
) -> None:
    total = 5 * 1024 * 1024
    rng = random.Random(42)
    payload = rng.randbytes(total)
    backend = FakeBackend(
        [InventoryItem(session_id="s-1", state="running", endpoint=Endpoint(port=echo_port))]
    )
    async with running(cp, tmp_path, backend):
        sock, _ = await cp.handshake(keep=["s-1"])
        path = protocol.AGENT_STREAM_PATH_PREFIX + "st-1"
        await sock.send(OpenStream(stream_id="st-1", session_id="s-1", path=path))
        stream_id, stream = await cp.next_stream()
        assert stream_id == "st-1"

        async def send_all() -> None:
            offset = 0
            while offset < total:
                size = rng.randint(1, 200_000)
                await stream.ws.send_bytes(payload[offset : offset + size])
                offset += size

        async def recv_all() -> bytes:
            digest, received = hashlib.sha256(), 0
            while received < total:
                frame = await asyncio.wait_for(stream.ws.receive(), RECV_TIMEOUT)
                data = frame.get("bytes")
                assert data is not None, f"expected a binary frame, got {frame}"
                digest.update(data)
                received += len(data)
            assert received == total
            return digest.digest()

        sender = asyncio.create_task(send_all())
        received_digest = await recv_all()
        await sender
        assert received_digest == hashlib.sha256(payload).digest()
        await stream.close(1000)
        await sock.recv_nothing(0.05)  # no StreamFailed for a normal close


async def test_open_stream_tcp_failure_reports_stream_failed(
    cp: ControlPlaneDouble, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    backend = FakeBackend(
        [InventoryItem(session_id="s-1", state="running", endpoint=Endpoint(port=dead_port))]
    )
    async with running(cp, tmp_path, backend):
        sock, _ = await cp.handshake(keep=["s-1"])
        await sock.send(
            OpenStream(
                stream_id="st-2",
                session_id="s-1",
                path=protocol.AGENT_STREAM_PATH_PREFIX + "st-2",
            )
        )
        failed = await sock.recv()
        assert isinstance(failed, StreamFailed) and failed.stream_id == "st-2"
        assert "cannot connect to the session" in failed.error
        # The session port is tried first, so no stream socket is dialled back at all.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cp.next_stream(), 0.5)


# ---- logs -----------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged during the test, as the agent writes it with ``--log-format json``."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("INFO", "json")
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def _events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [{k: v for k, v in e.items() if k != "ts"} for e in found if e["event"] == name]


async def test_agent_events_carry_their_fields_as_fields_in_json_mode(
    cp: ControlPlaneDouble, tmp_path: Path, json_log: io.StringIO
) -> None:
    """Typed fields, no `message` to re-parse, and the module's logger: the old
    `log.info(fmt(...))` lines reached JSON mode as one string with every value a string."""
    async with running(cp, tmp_path):
        sock, _ = await cp.handshake(heartbeat_seconds=12.5)
        await eventually(lambda: bool(_events(json_log, "connected")))
        await sock.send(start("c-9", "s-9", template="broken"))
        assert await sock.recv() == Ack(command_id="c-9")
        assert isinstance(await sock.recv(), Result)
    assert _events(json_log, "connected") == [
        {
            "level": "info",
            "logger": "streamspace.agent.connection",
            "event": "connected",
            "agent_id": AGENT_ID,
            "server": cp.url,
            "sessions": 0,
            "kept": 0,
            "heartbeat_seconds": 12.5,
        }
    ]
    assert _events(json_log, "command_failed") == [
        {
            "level": "warning",
            "logger": "streamspace.agent.commands",
            "event": "command_failed",
            "agent_id": AGENT_ID,
            "command_id": "c-9",
            "action": "start",
            "session_id": "s-9",
            "error": "template 'broken' cannot start: xterm not installed",
        }
    ]
