"""Agent <-> control plane messages: the only place their shape is defined.

Both sides import this module; nothing else may describe a message. One JSON message per
WebSocket text frame; stream bytes travel on separate binary-only WebSockets (see streams).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
SUPPORTED_PROTOCOL_VERSIONS = frozenset({1})

BackendKind = Literal["local", "docker", "kubernetes"]
CommandAction = Literal["start", "stop", "hibernate", "wake"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Capacity(_Msg):
    max_sessions: int = Field(ge=0)
    cpu_millis: int = Field(ge=0)
    memory_mb: int = Field(ge=0)


class Resources(_Msg):
    cpu_millis: int = Field(default=1000, ge=100, le=64000)
    memory_mb: int = Field(default=1024, ge=64, le=262144)


class Endpoint(_Msg):
    """Where the session's RFB server listens, as seen from the agent host."""

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)


class LocalLaunch(_Msg):
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)


class ImageLaunch(_Msg):
    image: str = Field(min_length=1)
    command: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)


class Display(_Msg):
    width: int = Field(default=1280, ge=320, le=7680)
    height: int = Field(default=800, ge=200, le=4320)
    depth: Literal[16, 24, 32] = 24
    vnc_port: int = Field(default=5901, ge=1, le=65535)


class SessionSpec(_Msg):
    """Everything a backend needs to run one session; sent with start and wake."""

    session_id: str
    user: str
    template: str
    local: LocalLaunch | None = None
    image: ImageLaunch | None = None
    display: Display = Field(default_factory=Display)
    resources: Resources = Field(default_factory=Resources)
    persistent_home: bool = True


class CatalogEntry(_Msg):
    """A template's launch spec as the agent sees it, to decide what its host can run."""

    name: str
    local: LocalLaunch | None = None
    image: ImageLaunch | None = None


class Catalog(_Msg):
    templates: list[CatalogEntry]


SessionRunState = Literal["running", "hibernated", "stopped", "exited", "unknown"]


class InventoryItem(_Msg):
    session_id: str
    state: SessionRunState
    endpoint: Endpoint | None = None
    user: str | None = None
    template: str | None = None


class Load(_Msg):
    sessions: int = Field(ge=0)
    cpu_millis: int = Field(ge=0)
    memory_mb: int = Field(ge=0)


# ---- agent -> control plane ----------------------------------------------------------------


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    protocol_version: int
    agent_id: str
    cluster_id: str
    cluster_name: str
    region: str = ""
    backend: BackendKind
    capacity: Capacity
    templates: list[str]
    inventory: list[InventoryItem] = Field(default_factory=list)
    version: str = ""


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    load: Load
    healthy: bool = True
    detail: str = ""
    templates: list[str] | None = None


class Ack(_Msg):
    type: Literal["ack"] = "ack"
    command_id: str


class Result(_Msg):
    type: Literal["result"] = "result"
    command_id: str
    ok: bool
    endpoint: Endpoint | None = None
    error: str = ""


class SessionStatus(_Msg):
    """Sent when a session changes behind the control plane's back (app exited, crashed)."""

    type: Literal["session_status"] = "session_status"
    session_id: str
    state: SessionRunState
    reason: str = ""


class StreamFailed(_Msg):
    type: Literal["stream_failed"] = "stream_failed"
    stream_id: str
    error: str


# ---- control plane -> agent ----------------------------------------------------------------


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    agent_id: str
    heartbeat_seconds: float
    keep: list[str] = Field(
        default_factory=list, description="inventory session ids the control plane knows"
    )
    server_time: datetime = Field(default_factory=utcnow)


class Command(_Msg):
    type: Literal["command"] = "command"
    command_id: str
    action: CommandAction
    session_id: str
    spec: SessionSpec | None = None


class OpenStream(_Msg):
    """Ask the agent to dial back a binary WebSocket for one viewer of one session."""

    type: Literal["open_stream"] = "open_stream"
    stream_id: str
    session_id: str
    endpoint: Endpoint
    path: str
    base_url: str = Field(
        default="",
        description="ws(s) base of the replica holding the viewer; empty = the agent's server",
    )


class ErrorMessage(_Msg):
    """Either side's answer to a message it could not accept; the connection stays up."""

    type: Literal["error"] = "error"
    code: str
    message: str


AgentMessage = Annotated[
    Hello | Heartbeat | Ack | Result | SessionStatus | StreamFailed | ErrorMessage,
    Field(discriminator="type"),
]
ServerMessage = Annotated[
    Welcome | Command | OpenStream | ErrorMessage, Field(discriminator="type")
]

_agent_adapter: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)
_server_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


class ProtocolError(ValueError):
    """A frame that is not a valid message; `code` says which way it is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


M = TypeVar("M")


def _parse(adapter: TypeAdapter[M], raw: str | bytes) -> M:
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0] if errors else None
        if first is None:
            raise ProtocolError("invalid_message", str(exc)) from exc
        loc = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", "invalid"))
        code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_message"
        raise ProtocolError(code, f"{loc}: {msg}" if loc else msg) from exc


def parse_agent_message(raw: str | bytes) -> AgentMessage:
    return _parse(_agent_adapter, raw)


def parse_server_message(raw: str | bytes) -> ServerMessage:
    return _parse(_server_adapter, raw)


def encode(msg: _Msg) -> str:
    return msg.model_dump_json()


def check_version(version: int) -> None:
    if version not in SUPPORTED_PROTOCOL_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_PROTOCOL_VERSIONS))
        raise ProtocolError(
            "unsupported_protocol_version",
            f"protocol_version {version} is not supported by this control plane "
            f"(supported: {supported}); upgrade the agent or the control plane",
        )


# ---- HTTP bodies shared by the agent's enrolment client and the control plane -------------


class EnrollRequest(_Msg):
    join_token: str = Field(min_length=8, max_length=256)
    name: str = Field(min_length=1, max_length=128)
    cluster_id: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9._-]+$")
    cluster_name: str = Field(min_length=1, max_length=128)
    region: str = Field(default="", max_length=64)
    backend: BackendKind


class EnrollResponse(_Msg):
    agent_id: str
    credential: str


AGENT_CONNECT_PATH = "/api/v1/agents/connect"
AGENT_ENROLL_PATH = "/api/v1/agents/enroll"
AGENT_CATALOG_PATH = "/api/v1/agents/catalog"
AGENT_STREAM_PATH_PREFIX = "/api/v1/agents/streams/"
