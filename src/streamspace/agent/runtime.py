"""The agent process: enrol once, then hold one outbound WebSocket to the control plane.

The agent only ever dials out (control connection and one WebSocket per viewer stream), so
hosts behind NAT or firewalls can join the fleet. Everything the control plane asks for is a
`Command`; the agent acknowledges it at once, runs it in its own task, and answers with a
`Result` that survives reconnects. Sessions are owned by the backend and keep running while the
agent is disconnected; on reconnect the agent reports its inventory and the control plane says
which sessions it still knows (`Welcome.keep`), the rest are stopped.

`Agent` is embeddable: no signal handling, no process exit, no blocking calls, so `streamspace
up` can run it next to the control plane in one event loop. Fatal conditions (revoked
credential, refused enrolment, unsupported protocol) surface as `AgentError`, whose message is
meant for humans.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

import streamspace
from streamspace import protocol
from streamspace.agent.backends.base import Backend, BackendError, VNCStream
from streamspace.agent.state import AgentState, StateError, load_state, save_state, state_path
from streamspace.agent.vnc import ByteStreamReader, ByteStreamWriter
from streamspace.protocol import (
    Ack,
    BackendKind,
    Capacity,
    Catalog,
    CatalogEntry,
    Command,
    EnrollRequest,
    EnrollResponse,
    ErrorMessage,
    Heartbeat,
    Hello,
    InventoryItem,
    Load,
    OpenStream,
    ProtocolError,
    Result,
    SessionSpec,
    SessionStatus,
    StreamFailed,
    Welcome,
)

log = logging.getLogger("streamspace.agent")

FATAL_ERROR_CODES = frozenset({"revoked", "unauthorized", "unsupported_protocol_version"})
"""Server error codes after which retrying cannot help; the agent gives up with AgentError."""
CREDENTIAL_ERROR_CODES = frozenset({"revoked", "unauthorized"})

RESULT_CACHE_SIZE = 1000
STREAM_CHUNK_BYTES = 1024 * 1024
STREAM_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CLOSE_TIMEOUT_SECONDS = 2.0
MIN_HEARTBEAT_SECONDS = 0.01

_Outgoing = Hello | Heartbeat | Ack | Result | SessionStatus | StreamFailed | ErrorMessage
_Reliable = Result | SessionStatus


class AgentError(Exception):
    """A fatal condition: retrying will not help. The message is shown to the operator as is."""


class CredentialRejected(AgentError):
    """The control plane no longer accepts this agent's credential (revoked or rotated)."""


class _TransientError(Exception):
    """A failure worth retrying with backoff (server unreachable, 5xx, dropped handshake)."""


class _HTTPProblem(Exception):
    """A 4xx answer from the control plane; `detail` is the RFC 9457 detail (or title)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _fmt(event: str, **fields: object) -> str:
    """`event key=value ...`: greppable structured logs without a logging dependency."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _default_capacity() -> Capacity:
    return Capacity(max_sessions=10, cpu_millis=8000, memory_mb=16384)


@dataclass
class AgentConfig:
    """How to reach the control plane and what this agent offers it."""

    server: str
    state_dir: Path
    name: str
    cluster_id: str
    cluster_name: str
    region: str = ""
    backend: BackendKind = "local"
    capacity: Capacity = field(default_factory=_default_capacity)
    max_concurrent_commands: int = 8
    join_token: str | None = field(default=None, repr=False)
    reenrol: Callable[[str], Awaitable[str]] | None = field(default=None, repr=False)
    """Only for an agent embedded in its control plane (`streamspace up`): given the identity
    whose credential was rejected, a fresh join token to enrol again with, instead of giving
    up. A separate agent never re-enrols on its own: its operator decides."""
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 10.0
    handshake_timeout_seconds: float = 15.0
    http_timeout_seconds: float = 15.0
    tcp_connect_timeout_seconds: float = 10.0


def _ws_base(server: str) -> tuple[str, str]:
    """(http base, ws base) for the server URL; both keep any path prefix, no trailing slash."""
    parts = urlsplit(server.strip())
    schemes = {"http": "ws", "https": "wss"}
    if parts.scheme not in schemes or not parts.netloc:
        raise AgentError(
            f"invalid server URL {server!r}: expected http(s)://host[:port], e.g. "
            "https://streamspace.example.com"
        )
    path = parts.path.rstrip("/")
    http = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    ws = urlunsplit((schemes[parts.scheme], parts.netloc, path, "", ""))
    return http, ws


def _problem_detail(response: httpx.Response) -> str:
    """The human part of an RFC 9457 problem body, falling back to the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("detail", "title"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


@dataclass
class _SessionTurn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class _Connection:
    """One control connection, its outgoing queue and its single writer.

    Only `write_loop` calls `ws.send` for JSON, so frames never interleave and each frame carries
    exactly one message. `in_flight` lets the agent salvage a reliable message whose send was
    interrupted by a disconnect (at-least-once; the control plane deduplicates by command_id).
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self.in_flight: _Outgoing | None = None

    def send(self, msg: _Outgoing) -> None:
        self.queue.put_nowait(msg)

    async def write_loop(self) -> None:
        while True:
            msg = await self.queue.get()
            self.in_flight = msg
            await self.ws.send(protocol.encode(msg))
            self.in_flight = None

    def unsent(self) -> list[_Outgoing]:
        items: list[_Outgoing] = [self.in_flight] if self.in_flight is not None else []
        self.in_flight = None
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


class Agent:
    """Runs one agent identity against one control plane until `stop()` or a fatal error."""

    def __init__(self, config: AgentConfig, backend: Backend) -> None:
        if config.backend != backend.kind:
            raise ValueError(
                f"config.backend={config.backend!r} but the backend is {backend.kind!r}"
            )
        if config.max_concurrent_commands < 1:
            raise ValueError("max_concurrent_commands must be at least 1")
        self._config = config
        self._backend = backend
        self._http_base, self._ws_base = _ws_base(config.server)
        self._state: AgentState | None = None
        self._stop_event = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._attempt = 0
        # Set only between Welcome and disconnect: before Welcome nothing but Hello may be sent.
        self._conn: _Connection | None = None
        self._outbox: deque[_Reliable] = deque()
        self._semaphore = asyncio.Semaphore(config.max_concurrent_commands)
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._results: OrderedDict[str, Result] = OrderedDict()
        self._session_turns: dict[str, _SessionTurn] = {}
        # Running sessions -> the spec that started them (None: adopted from the inventory).
        self._sessions: dict[str, SessionSpec | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._monitor_task: asyncio.Task[None] | None = None
        self._chained_on_exit: Callable[[str, str], Awaitable[None]] | None = None
        self._catalog: list[CatalogEntry] = []
        self._last_templates: list[str] = []

    # ---- public API ----------------------------------------------------------------------

    @property
    def agent_id(self) -> str | None:
        """The enrolled identity, known once `run()` has loaded or obtained it."""
        return self._state.agent_id if self._state is not None else None

    @property
    def connected(self) -> bool:
        """True between the control plane's Welcome and the next disconnect."""
        return self._conn is not None

    async def run(self) -> None:
        """Enrol if needed, then stay connected (reconnecting with backoff) until stopped.

        Returns after `stop()`; raises AgentError on a fatal condition. A stop requested before
        `run()` makes it return at once.
        """
        if self._running:
            raise RuntimeError("Agent.run() is already running")
        self._running = True
        self._done.clear()
        try:
            await self._main()
        finally:
            await self._shutdown()
            self._running = False
            self._stop_event.clear()
            self._done.set()

    async def stop(self) -> None:
        """Disconnect and wait for `run()` to return; sessions keep running in the backend."""
        self._stop_event.set()
        if self._running:
            await self._done.wait()

    # ---- main loop -----------------------------------------------------------------------

    async def _main(self) -> None:
        self._attempt = 0
        while not self._stop_event.is_set():
            try:
                if self._state is None:
                    self._state = await self._ensure_enrolled()
                if self._monitor_task is None:
                    self._start_monitor()
                await self._connect_once(self._state)
            except CredentialRejected as exc:
                if self._config.reenrol is None or self._state is None:
                    raise
                await self._prepare_reenrolment(self._state, exc)
                continue
            except _TransientError as exc:
                log.warning(_fmt("control_plane_unavailable", agent_id=self.agent_id, error=exc))
            except (AgentError, asyncio.CancelledError):
                raise
            except Exception:
                # A bug (ours or the backend's) must not take the agent down: its sessions keep
                # running and still need a control connection. Log loudly and retry.
                log.exception(_fmt("connection_attempt_crashed", agent_id=self.agent_id))
            if self._stop_event.is_set():
                break
            delay = self._backoff(self._attempt)
            self._attempt += 1
            log.info(_fmt("reconnecting", agent_id=self.agent_id, delay=f"{delay:.2f}s"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), timeout=delay)

    async def _prepare_reenrolment(self, state: AgentState, why: CredentialRejected) -> None:
        assert self._config.reenrol is not None
        log.warning(_fmt("reenrolling", agent_id=state.agent_id, reason=str(why)))
        self._config.join_token = await self._config.reenrol(state.agent_id)
        await asyncio.to_thread(state_path(self._config.state_dir).unlink, missing_ok=True)
        self._state = None
        self._outbox.clear()  # results and statuses for the old identity's commands

    async def adopt_credential(self, credential: str) -> None:
        """Use a credential rotated by the control plane this agent is embedded in: stored
        first, so the reconnect after the rotation's disconnect presents it."""
        if self._state is None:
            raise AgentError("not enrolled yet")
        state = self._state.model_copy(update={"credential": credential})
        await asyncio.to_thread(save_state, self._config.state_dir, state)
        self._state = state
        log.info(_fmt("credential_adopted", agent_id=state.agent_id))

    def _backoff(self, attempt: int) -> float:
        """Exponential with jitter so a fleet does not reconnect in lockstep after an outage."""
        base = min(
            self._config.backoff_max_seconds,
            self._config.backoff_initial_seconds * (2 ** min(attempt, 30)),
        )
        return random.uniform(base / 2, base)

    async def _shutdown(self) -> None:
        tasks: list[asyncio.Task[None]] = [*self._inflight.values(), *self._tasks]
        if self._monitor_task is not None:
            tasks.append(self._monitor_task)
            self._monitor_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._conn = None
        log.info(_fmt("agent_stopped", agent_id=self.agent_id))

    # ---- enrolment and HTTP --------------------------------------------------------------

    async def _ensure_enrolled(self) -> AgentState:
        cfg = self._config
        try:
            state = await asyncio.to_thread(load_state, cfg.state_dir)
        except StateError as exc:
            raise AgentError(str(exc)) from exc
        if state is not None:
            if cfg.join_token:
                log.info(
                    _fmt(
                        "join_token_ignored_already_enrolled",
                        agent_id=state.agent_id,
                        state_file=state_path(cfg.state_dir),
                    )
                )
            self._warn_on_drift(state)
            return state
        if not cfg.join_token:
            raise AgentError(
                f"not enrolled: {state_path(cfg.state_dir)} does not exist and no join token "
                "was given (create one in the admin UI: Clusters -> Add agent)"
            )
        try:
            request = EnrollRequest(
                join_token=cfg.join_token,
                name=cfg.name,
                cluster_id=cfg.cluster_id,
                cluster_name=cfg.cluster_name,
                region=cfg.region,
                backend=self._backend.kind,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise AgentError(f"invalid agent settings: {where}: {first['msg']}") from exc
        try:
            raw = await self._http(
                "POST", protocol.AGENT_ENROLL_PATH, content=protocol.encode(request)
            )
        except _HTTPProblem as exc:
            raise AgentError(f"enrolment refused: {exc.detail}") from exc
        try:
            response = EnrollResponse.model_validate_json(raw)
        except ValidationError as exc:
            raise _TransientError("control plane sent an invalid enrolment response") from exc
        state = AgentState(
            agent_id=response.agent_id,
            credential=response.credential,
            server=cfg.server,
            cluster_id=cfg.cluster_id,
            cluster_name=cfg.cluster_name,
            region=cfg.region,
            backend=self._backend.kind,
            name=cfg.name,
        )
        path = await asyncio.to_thread(save_state, cfg.state_dir, state)
        log.info(
            _fmt(
                "enrolled",
                agent_id=state.agent_id,
                cluster_id=state.cluster_id,
                state_file=path,
            )
        )
        return state

    def _warn_on_drift(self, state: AgentState) -> None:
        """The stored identity wins over the config; say so when they disagree."""
        cfg = self._config
        for key, configured in (
            ("server", cfg.server),
            ("cluster_id", cfg.cluster_id),
            ("cluster_name", cfg.cluster_name),
            ("region", cfg.region),
            ("name", cfg.name),
        ):
            stored = getattr(state, key)
            if configured and configured != stored:
                log.warning(
                    _fmt(
                        "config_differs_from_enrolment",
                        agent_id=state.agent_id,
                        setting=key,
                        configured=configured,
                        enrolled=stored,
                        hint="the enrolled value is used; remove agent.json to re-enrol",
                    )
                )

    async def _http(
        self, method: str, path: str, *, content: str | None = None, credential: str | None = None
    ) -> bytes:
        headers = {"Accept": "application/json", "User-Agent": self._user_agent()}
        if content is not None:
            headers["Content-Type"] = "application/json"
        if credential is not None:
            headers["Authorization"] = f"Bearer {credential}"
        url = self._http_base + path
        try:
            async with httpx.AsyncClient(timeout=self._config.http_timeout_seconds) as client:
                response = await client.request(method, url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise _TransientError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise _TransientError(f"{method} {url}: {_problem_detail(response)}")
        if response.status_code >= 400:
            raise _HTTPProblem(response.status_code, _problem_detail(response))
        return response.content

    async def _fetch_catalog(self, state: AgentState) -> Catalog:
        try:
            raw = await self._http("GET", protocol.AGENT_CATALOG_PATH, credential=state.credential)
        except _HTTPProblem as exc:
            if exc.status in (401, 403):
                raise CredentialRejected(
                    f"agent credential rejected (revoked?): {exc.detail}"
                ) from exc
            raise AgentError(f"cannot fetch the template catalog: {exc.detail}") from exc
        try:
            return Catalog.model_validate_json(raw)
        except ValidationError as exc:
            raise _TransientError("control plane sent an invalid catalog") from exc

    def _user_agent(self) -> str:
        return f"streamspace-agent/{streamspace.__version__}"

    def _auth_headers(self) -> dict[str, str]:
        assert self._state is not None
        return {"Authorization": f"Bearer {self._state.credential}"}

    # ---- control connection --------------------------------------------------------------

    async def _connect_once(self, state: AgentState) -> None:
        catalog = await self._fetch_catalog(state)
        self._catalog = list(catalog.templates)
        templates = self._backend.runnable_templates(self._catalog)
        try:
            inventory = await self._backend.inventory()
            legacy_homes = await self._backend.legacy_home_names()
        except Exception as exc:
            raise _TransientError(f"backend inventory failed: {type(exc).__name__}: {exc}") from exc
        hello = Hello(
            protocol_version=protocol.PROTOCOL_VERSION,
            agent_id=state.agent_id,
            cluster_id=state.cluster_id,
            cluster_name=state.cluster_name,
            region=state.region,
            backend=self._backend.kind,
            capacity=self._config.capacity,
            templates=templates,
            inventory=inventory,
            version=streamspace.__version__,
            isolation=self._backend.isolation(),
            legacy_homes=legacy_homes,
        )
        url = self._ws_base + protocol.AGENT_CONNECT_PATH
        try:
            ws = await connect(
                url,
                additional_headers=self._auth_headers(),
                user_agent_header=self._user_agent(),
                open_timeout=self._config.handshake_timeout_seconds,
                close_timeout=CLOSE_TIMEOUT_SECONDS,
            )
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise CredentialRejected("agent credential rejected (revoked?)") from exc
            raise _TransientError(str(exc)) from exc
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise _TransientError(f"cannot connect to {url}: {exc}") from exc

        conn = _Connection(ws)
        writer = asyncio.create_task(conn.write_loop(), name="agent-writer")
        try:
            conn.send(hello)
            welcome = await self._await_welcome(conn)
            if legacy_homes:
                # Before any command is read: a start must find its home where it now belongs.
                moved = await self._backend.migrate_homes(welcome.home_owners)
                log.info(_fmt("homes_migrated", agent_id=self.agent_id, homes=len(moved)))
            self._on_welcome(conn, welcome, inventory, templates)
            await self._serve(conn, writer, welcome)
        finally:
            self._detach(conn)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await ws.close()

    async def _await_welcome(self, conn: _Connection) -> Welcome:
        try:
            async with asyncio.timeout(self._config.handshake_timeout_seconds):
                while True:
                    raw = await conn.ws.recv()
                    try:
                        msg = protocol.parse_server_message(raw)
                    except ProtocolError as exc:
                        conn.send(ErrorMessage(code=exc.code, message=exc.message))
                        continue
                    if isinstance(msg, Welcome):
                        return msg
                    if isinstance(msg, ErrorMessage):
                        self._raise_if_fatal(msg)
                        raise _TransientError(
                            f"control plane refused hello: {msg.code}: {msg.message}"
                        )
                    log.warning(
                        _fmt(
                            "message_before_welcome_ignored", agent_id=self.agent_id, type=msg.type
                        )
                    )
        except TimeoutError as exc:
            raise _TransientError("no welcome from the control plane in time") from exc
        except ConnectionClosed as exc:
            raise _TransientError(f"connection closed during handshake: {exc}") from exc

    def _raise_if_fatal(self, msg: ErrorMessage) -> None:
        if msg.code in FATAL_ERROR_CODES:
            log.error(
                _fmt(
                    "agent_refused",
                    agent_id=self.agent_id,
                    code=msg.code,
                    message=msg.message,
                )
            )
            error = CredentialRejected if msg.code in CREDENTIAL_ERROR_CODES else AgentError
            raise error(f"control plane refused the agent ({msg.code}): {msg.message}")

    def _on_welcome(
        self,
        conn: _Connection,
        welcome: Welcome,
        inventory: list[InventoryItem],
        templates: list[str],
    ) -> None:
        if welcome.agent_id != self.agent_id:
            log.warning(
                _fmt(
                    "welcome_agent_id_mismatch",
                    agent_id=self.agent_id,
                    welcome_agent_id=welcome.agent_id,
                )
            )
        keep = set(welcome.keep)
        running = {i.session_id for i in inventory if i.state == "running"}
        for session_id in running & keep:
            self._sessions.setdefault(session_id, None)
        for session_id in list(self._sessions):
            if session_id not in running and session_id not in self._session_turns:
                self._sessions.pop(session_id, None)
        orphans = [i.session_id for i in inventory if i.session_id not in keep]
        if orphans:
            self._spawn(self._stop_orphans(orphans), "agent-orphans")
        self._last_templates = templates
        self._attempt = 0
        # Order matters: results produced while disconnected go out before anything new.
        while self._outbox:
            conn.send(self._outbox.popleft())
        self._conn = conn
        log.info(
            _fmt(
                "connected",
                agent_id=self.agent_id,
                server=self._config.server,
                sessions=len(inventory),
                kept=len(keep),
                heartbeat_seconds=welcome.heartbeat_seconds,
            )
        )

    def _detach(self, conn: _Connection) -> None:
        """Forget the connection and move its undelivered Results/statuses back to the outbox."""
        if self._conn is conn:
            self._conn = None
            log.info(
                _fmt(
                    "disconnected",
                    agent_id=self.agent_id,
                    code=conn.ws.close_code,
                    reason=conn.ws.close_reason or None,
                )
            )
        salvage = [m for m in conn.unsent() if isinstance(m, Result | SessionStatus)]
        self._outbox.extendleft(reversed(salvage))

    async def _serve(self, conn: _Connection, writer: asyncio.Task[None], welcome: Welcome) -> None:
        reader = asyncio.create_task(self._read_loop(conn), name="agent-reader")
        heartbeat = asyncio.create_task(
            self._heartbeat_loop(conn, max(welcome.heartbeat_seconds, MIN_HEARTBEAT_SECONDS)),
            name="agent-heartbeat",
        )
        stopper = asyncio.create_task(self._stop_event.wait(), name="agent-stop")
        watched: set[asyncio.Task[Any]] = {reader, writer, heartbeat, stopper}
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, heartbeat, stopper):
                task.cancel()
            await asyncio.gather(reader, heartbeat, stopper, return_exceptions=True)
        for task in done:
            if task is stopper or task.cancelled():
                continue
            exc = task.exception()
            if isinstance(exc, AgentError):
                raise exc
            if exc is not None and not isinstance(exc, ConnectionClosed):
                log.error(
                    _fmt("control_connection_failed", agent_id=self.agent_id),
                    exc_info=exc,
                )

    async def _read_loop(self, conn: _Connection) -> None:
        async for raw in conn.ws:
            self._handle_frame(conn, raw)

    def _handle_frame(self, conn: _Connection, raw: str | bytes) -> None:
        """Dispatch one frame without awaiting anything: slow work always goes to a task."""
        try:
            msg = protocol.parse_server_message(raw)
        except ProtocolError as exc:
            log.warning(
                _fmt(
                    "malformed_frame",
                    agent_id=self.agent_id,
                    code=exc.code,
                    error=exc.message,
                )
            )
            conn.send(ErrorMessage(code=exc.code, message=exc.message))
            return
        if isinstance(msg, Command):
            self._on_command(conn, msg)
        elif isinstance(msg, OpenStream):
            self._spawn(self._run_stream(msg), f"agent-stream-{msg.stream_id}")
        elif isinstance(msg, ErrorMessage):
            self._raise_if_fatal(msg)
            log.warning(
                _fmt(
                    "server_error",
                    agent_id=self.agent_id,
                    code=msg.code,
                    message=msg.message,
                )
            )
        else:
            log.warning(_fmt("unexpected_message", agent_id=self.agent_id, type=msg.type))

    async def _heartbeat_loop(self, conn: _Connection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                healthy, detail = await self._backend.healthy()
            except Exception as exc:
                healthy, detail = False, f"health check failed: {type(exc).__name__}: {exc}"
            templates: list[str] | None = None
            try:
                current = self._backend.runnable_templates(self._catalog)
            except Exception:
                log.exception(_fmt("runnable_templates_failed", agent_id=self.agent_id))
                current = self._last_templates
            if current != self._last_templates:
                templates = self._last_templates = current
            conn.send(
                Heartbeat(load=self._load(), healthy=healthy, detail=detail, templates=templates)
            )

    def _load(self) -> Load:
        specs = [s for s in self._sessions.values() if s is not None]
        return Load(
            sessions=len(self._sessions),
            cpu_millis=sum(s.resources.cpu_millis for s in specs),
            memory_mb=sum(s.resources.memory_mb for s in specs),
        )

    def _send_reliable(self, msg: _Reliable) -> None:
        """Queue on the live connection, or keep it for the next one (flushed after Welcome)."""
        if self._conn is not None:
            self._conn.send(msg)
        else:
            self._outbox.append(msg)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                _fmt("background_task_failed", agent_id=self.agent_id, task=task.get_name()),
                exc_info=exc,
            )

    # ---- commands ------------------------------------------------------------------------

    def _on_command(self, conn: _Connection, cmd: Command) -> None:
        conn.send(Ack(command_id=cmd.command_id))
        cached = self._results.get(cmd.command_id)
        if cached is not None:
            log.info(
                _fmt(
                    "duplicate_command_result_resent",
                    agent_id=self.agent_id,
                    command_id=cmd.command_id,
                    session_id=cmd.session_id,
                )
            )
            self._send_reliable(cached)
            return
        if cmd.command_id in self._inflight:
            log.info(
                _fmt(
                    "duplicate_command_still_running",
                    agent_id=self.agent_id,
                    command_id=cmd.command_id,
                    session_id=cmd.session_id,
                )
            )
            return
        self._inflight[cmd.command_id] = asyncio.create_task(
            self._run_command(cmd), name=f"agent-command-{cmd.command_id}"
        )

    @contextlib.asynccontextmanager
    async def _session_turn(self, session_id: str) -> AsyncIterator[None]:
        """Serialise work on one session (a stop must not race the start before it)."""
        turn = self._session_turns.setdefault(session_id, _SessionTurn())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if turn.users == 0:
                self._session_turns.pop(session_id, None)

    async def _run_command(self, cmd: Command) -> None:
        try:
            async with self._session_turn(cmd.session_id), self._semaphore:
                result = await self._execute(cmd)
        finally:
            self._inflight.pop(cmd.command_id, None)
        self._results[cmd.command_id] = result
        while len(self._results) > RESULT_CACHE_SIZE:
            self._results.popitem(last=False)
        self._send_reliable(result)

    async def _execute(self, cmd: Command) -> Result:
        fields = {
            "agent_id": self.agent_id,
            "command_id": cmd.command_id,
            "action": cmd.action,
            "session_id": cmd.session_id,
        }
        log.info(_fmt("command_started", **fields))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            endpoint = None
            if cmd.action in ("start", "wake"):
                spec = cmd.spec
                if spec is None:
                    raise BackendError(f"{cmd.action} command without a session spec")
                if spec.session_id != cmd.session_id:
                    raise BackendError(
                        f"spec is for session {spec.session_id}, command for {cmd.session_id}"
                    )
                run = self._backend.start if cmd.action == "start" else self._backend.wake
                endpoint = await run(spec)
                self._sessions[cmd.session_id] = spec
            elif cmd.action == "stop":
                await self._backend.stop(cmd.session_id)
                self._sessions.pop(cmd.session_id, None)
            else:
                await self._backend.hibernate(cmd.session_id)
                self._sessions.pop(cmd.session_id, None)
        except BackendError as exc:
            error = str(exc) or type(exc).__name__
            log.warning(_fmt("command_failed", **fields, error=error))
            return Result(command_id=cmd.command_id, ok=False, error=error)
        except Exception as exc:
            log.exception(_fmt("command_crashed", **fields))
            return Result(command_id=cmd.command_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        log.info(
            _fmt(
                "command_succeeded",
                **fields,
                endpoint=endpoint.describe() if endpoint else None,
                duration=f"{loop.time() - started:.3f}s",
            )
        )
        return Result(command_id=cmd.command_id, ok=True, endpoint=endpoint)

    async def _stop_orphans(self, session_ids: list[str]) -> None:
        """Stop sessions the control plane no longer knows: nobody could ever reach them."""
        for session_id in session_ids:
            if session_id in self._session_turns:
                continue  # a command for it arrived meanwhile: the control plane knows it now
            async with self._session_turn(session_id):
                log.info(
                    _fmt(
                        "stopping_unknown_session",
                        agent_id=self.agent_id,
                        session_id=session_id,
                    )
                )
                try:
                    await self._backend.stop(session_id)
                except Exception as exc:
                    log.warning(
                        _fmt(
                            "unknown_session_stop_failed",
                            agent_id=self.agent_id,
                            session_id=session_id,
                            error=f"{type(exc).__name__}: {exc}",
                        )
                    )
                self._sessions.pop(session_id, None)

    # ---- backend exit notifications ------------------------------------------------------

    def _start_monitor(self) -> None:
        """Hook the backend's exit monitor if it has one (optional beyond the Backend ABC).

        Two shapes are supported: `start_monitor(on_exit)`, and (LocalBackend) an `on_exit`
        attribute plus an argument-less, idempotent `start_monitor()`. Either may return at once
        (monitor runs in the backend) or run until cancelled (it then lives in our task).
        """
        start_monitor = getattr(self._backend, "start_monitor", None)
        if not callable(start_monitor):
            return
        try:
            takes_callback = bool(inspect.signature(start_monitor).parameters)
        except (TypeError, ValueError):
            takes_callback = False
        if not takes_callback:
            previous = getattr(self._backend, "on_exit", None)
            if previous is not None and previous != self._on_session_exit:
                self._chained_on_exit = previous
            self._backend.on_exit = self._on_session_exit  # type: ignore[attr-defined]

        async def monitor() -> None:
            try:
                if takes_callback:
                    await start_monitor(self._on_session_exit)
                else:
                    await start_monitor()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(_fmt("exit_monitor_failed", agent_id=self.agent_id))

        self._monitor_task = asyncio.create_task(monitor(), name="agent-monitor")

    async def _on_session_exit(self, session_id: str, reason: str) -> None:
        self._sessions.pop(session_id, None)
        log.info(
            _fmt("session_exited", agent_id=self.agent_id, session_id=session_id, reason=reason)
        )
        self._send_reliable(SessionStatus(session_id=session_id, state="exited", reason=reason))
        if self._chained_on_exit is not None:
            # Whoever set the backend's callback before us still gets told.
            await self._chained_on_exit(session_id, reason)

    # ---- viewer streams ------------------------------------------------------------------

    def _stream_failed(self, msg: OpenStream, error: str) -> None:
        log.warning(
            _fmt(
                "stream_failed",
                agent_id=self.agent_id,
                stream_id=msg.stream_id,
                session_id=msg.session_id,
                error=error,
            )
        )
        if self._conn is not None:
            self._conn.send(StreamFailed(stream_id=msg.stream_id, error=error))

    async def open_session(self, session_id: str) -> VNCStream:
        """A connection to a session's VNC server for one viewer, through the backend (which
        knows where the server is and holds its per-session secret).

        Called for dialled-back streams and directly by a control plane embedding this agent
        (`streamspace up`), whose viewers then need no loopback WebSocket hop.
        """
        log.info(_fmt("vnc_open", agent_id=self.agent_id, session_id=session_id))
        try:
            return await self._backend.open_vnc(
                session_id, connect_timeout=self._config.tcp_connect_timeout_seconds
            )
        except BackendError as exc:
            raise ConnectionError(str(exc)) from exc

    async def _run_stream(self, msg: OpenStream) -> None:
        """Bridge one viewer: a fresh binary WebSocket to the control plane <-> the RFB port."""
        if not msg.path.startswith("/"):
            self._stream_failed(msg, f"invalid stream path {msg.path!r}")
            return
        url = (msg.base_url.rstrip("/") or self._ws_base) + msg.path
        if not url.startswith(("ws://", "wss://")):
            self._stream_failed(msg, f"invalid stream base URL {msg.base_url!r}")
            return
        try:
            reader, writer = await self.open_session(msg.session_id)
        except (OSError, TimeoutError) as exc:
            # Before dialling back, so the viewer gets the reason instead of a bare close.
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            self._stream_failed(msg, f"cannot connect to the session: {reason}")
            return
        try:
            ws = await connect(
                url,
                additional_headers=self._auth_headers(),
                user_agent_header=self._user_agent(),
                open_timeout=self._config.handshake_timeout_seconds,
                close_timeout=CLOSE_TIMEOUT_SECONDS,
                compression=None,
                max_size=STREAM_MAX_MESSAGE_BYTES,
            )
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            writer.close()
            self._stream_failed(msg, f"cannot dial the stream websocket: {exc}")
            return
        try:
            log.info(
                _fmt(
                    "stream_open",
                    agent_id=self.agent_id,
                    stream_id=msg.stream_id,
                    session_id=msg.session_id,
                )
            )
            try:
                await _pump(ws, reader, writer)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            log.info(
                _fmt(
                    "stream_closed",
                    agent_id=self.agent_id,
                    stream_id=msg.stream_id,
                    session_id=msg.session_id,
                )
            )
        finally:
            await ws.close()


async def _pump(ws: ClientConnection, reader: ByteStreamReader, writer: ByteStreamWriter) -> None:
    """Copy bytes both ways until either side closes.

    Each direction awaits its sink (`drain`, `ws.send`) before reading more, so memory stays
    bounded by one chunk plus the transports' own buffers whatever the speed mismatch.
    """

    async def ws_to_tcp() -> None:
        async for data in ws:
            if isinstance(data, str):
                await ws.close(code=1003, reason="stream websockets carry binary frames only")
                return
            writer.write(data)
            await writer.drain()

    async def tcp_to_ws() -> None:
        while data := await reader.read(STREAM_CHUNK_BYTES):
            await ws.send(data)

    tasks = [
        asyncio.create_task(ws_to_tcp(), name="stream-ws-to-tcp"),
        asyncio.create_task(tcp_to_ws(), name="stream-tcp-to-ws"),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in results:
        if isinstance(outcome, Exception) and not isinstance(outcome, ConnectionClosed | OSError):
            raise outcome
