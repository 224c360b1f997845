"""Agent <-> control plane messages: the only place their shape is defined.

Both sides import this module; nothing else may describe a message. One JSON message per
WebSocket text frame; stream bytes travel on separate binary-only WebSockets (see streams).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

PROTOCOL_VERSION = 2
SUPPORTED_PROTOCOL_VERSIONS = frozenset({2})
"""Version 2: sessions carry their owner's immutable id and home limit, agents report their
isolation, and an agent reaches a session's VNC server through its own backend (which holds the
per-session secret) instead of an address the control plane names. A version-1 agent would run
sessions as its own user, so it is refused rather than served."""

BackendKind = Literal["local", "docker", "kubernetes"]
CommandAction = Literal["start", "stop", "hibernate", "wake"]
ViewerPurpose = Literal["vnc", "audio", "microphone"]
"""What a browser's viewer socket carries: the RFB byte stream, the session's sound (Opus
packets, framed as in docs/streaming.md#sound), or the browser's microphone into the session
(the same framing, the other way: docs/streaming.md#microphone)."""
IsolationMode = Literal["uid-sandbox", "userns-sandbox", "container", "insecure-shared-user"]
"""How sessions are kept from the agent and from each other (see docs/security.md):
`uid-sandbox` a Unix uid per user plus bubblewrap; `userns-sandbox` bubblewrap in a user
namespace under the agent's own uid; `container` one non-root container per session;
`insecure-shared-user` the explicit opt-out: sessions run as the agent's user, unsandboxed."""

NAME_MAX = 128
"""Bound of every name and id in agent frames: a hello can no longer carry megabytes."""
DETAIL_MAX = 512
PROGRESS_MAX = 512
MAX_TEMPLATES = 1000
MAX_INVENTORY = 10_000


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
    """Where the session's RFB server listens, as seen from the agent host: a TCP address or a
    Unix socket. Informational for the control plane; only the agent's backend connects."""

    host: str = Field(default="127.0.0.1", max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    unix_path: str | None = Field(default=None, max_length=4096)

    @model_validator(mode="after")
    def _one_address(self) -> Endpoint:
        if (self.port is None) == (self.unix_path is None):
            raise ValueError("an endpoint has either a port or a unix_path")
        return self

    def describe(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


class LocalLaunch(_Msg):
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)


class ImageLaunch(_Msg):
    image: str = Field(min_length=1)
    command: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)


class Toleration(_Msg):
    """A Kubernetes toleration, in the API's terms (kubernetes backend only)."""

    key: str = Field(default="", max_length=316)
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str = Field(default="", max_length=63)
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    toleration_seconds: int | None = Field(default=None, ge=0)

    def manifest(self) -> dict[str, str | int]:
        """As it goes into a pod spec: camelCase, empty fields left out."""
        out: dict[str, str | int] = {"operator": self.operator}
        for name, value in (("key", self.key), ("value", self.value), ("effect", self.effect)):
            if value:
                out[name] = value
        if self.toleration_seconds is not None:
            out["tolerationSeconds"] = self.toleration_seconds
        return out


class Display(_Msg):
    width: int = Field(default=1280, ge=320, le=7680)
    height: int = Field(default=800, ge=200, le=4320)
    depth: Literal[16, 24, 32] = 24
    vnc_port: int = Field(default=5901, ge=1, le=65535)
    resizable: bool = Field(
        default=True,
        description="the viewer may resize the remote desktop to its window (RFB "
        "ExtendedDesktopSize); false pins width x height and the viewer scales instead",
    )


class Clipboard(_Msg):
    """Which way text may cross between the viewer and the session; the session's VNC server
    enforces it (TigerVNC's AcceptCutText / SendCutText), so no client can get around it."""

    copy_in: bool = Field(default=True, description="the viewer's text may reach the session")
    copy_out: bool = Field(default=True, description="the session's text may reach the viewer")


class SessionSpec(_Msg):
    """Everything a backend needs to run one session; sent with start and wake.

    `user_id` is the owner's immutable id: homes, Unix identities and volumes are keyed by it, so
    a user deleted and re-created under the same name never inherits the old one's files.
    `user` (the name) is for labels and logs only."""

    session_id: str = Field(max_length=NAME_MAX)
    user_id: str = Field(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")
    user: str = Field(max_length=NAME_MAX)
    template: str = Field(max_length=NAME_MAX)
    local: LocalLaunch | None = None
    image: ImageLaunch | None = None
    display: Display = Field(default_factory=Display)
    resources: Resources = Field(default_factory=Resources)
    persistent_home: bool = True
    network: bool = Field(
        default=False, description="the app may use the network (browsers); otherwise none"
    )
    home_limit_mb: int | None = Field(
        default=None, ge=1, description="size limit of the persistent home; None: no limit"
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="the template's node labels its pods need (kubernetes backend only)",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="the template's taints its pods tolerate (kubernetes backend only)",
    )
    clipboard: Clipboard = Field(default_factory=Clipboard)


class CatalogEntry(_Msg):
    """A template's launch spec as the agent sees it, to decide what its host can run."""

    name: str
    local: LocalLaunch | None = None
    image: ImageLaunch | None = None


class Catalog(_Msg):
    templates: list[CatalogEntry]


SessionRunState = Literal["running", "hibernated", "stopped", "exited", "unknown"]


class InventoryItem(_Msg):
    session_id: str = Field(max_length=NAME_MAX)
    state: SessionRunState
    endpoint: Endpoint | None = None
    user: str | None = Field(default=None, max_length=NAME_MAX)
    template: str | None = Field(default=None, max_length=NAME_MAX)


class Isolation(_Msg):
    """What the agent enforces, shown to admins (an insecure agent in red)."""

    mode: IsolationMode
    detail: str = Field(default="", max_length=DETAIL_MAX)
    limits_enforced: bool = Field(
        default=False, description="CPU and memory limits are applied to each session"
    )


class Load(_Msg):
    sessions: int = Field(ge=0)
    cpu_millis: int = Field(ge=0)
    memory_mb: int = Field(ge=0)


# ---- agent -> control plane ----------------------------------------------------------------


TemplateName = Annotated[str, Field(max_length=NAME_MAX)]


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    protocol_version: int
    agent_id: str = Field(max_length=NAME_MAX)
    cluster_id: str = Field(max_length=64)
    cluster_name: str = Field(max_length=NAME_MAX)
    region: str = Field(default="", max_length=64)
    backend: BackendKind
    capacity: Capacity
    templates: list[TemplateName] = Field(max_length=MAX_TEMPLATES)
    inventory: list[InventoryItem] = Field(default_factory=list, max_length=MAX_INVENTORY)
    version: str = Field(default="", max_length=32)
    isolation: Isolation
    legacy_homes: list[Annotated[str, Field(max_length=NAME_MAX)]] = Field(
        default_factory=list,
        max_length=MAX_INVENTORY,
        description="owner names of homes still keyed by name (kept from protocol version 1)",
    )


class Heartbeat(_Msg):
    type: Literal["heartbeat"] = "heartbeat"
    load: Load
    healthy: bool = True
    detail: str = Field(default="", max_length=DETAIL_MAX)
    templates: list[TemplateName] | None = Field(default=None, max_length=MAX_TEMPLATES)


class Ack(_Msg):
    type: Literal["ack"] = "ack"
    command_id: str = Field(max_length=NAME_MAX)


class Result(_Msg):
    type: Literal["result"] = "result"
    command_id: str = Field(max_length=NAME_MAX)
    ok: bool
    endpoint: Endpoint | None = None
    error: str = Field(default="", max_length=4096)


class SessionStatus(_Msg):
    """Sent when a session changes behind the control plane's back (app exited, crashed)."""

    type: Literal["session_status"] = "session_status"
    session_id: str = Field(max_length=NAME_MAX)
    state: SessionRunState
    reason: str = Field(default="", max_length=4096)


class SessionProgress(_Msg):
    """A start milestone a backend just passed ("scheduled on node n1", "pulling image …",
    "VNC ready"), sent as it happens so a slow start says where it is. Best effort: only
    on the live connection, recorded as a session event while the session is starting."""

    type: Literal["session_progress"] = "session_progress"
    session_id: str = Field(max_length=NAME_MAX)
    message: str = Field(min_length=1, max_length=PROGRESS_MAX)


class StreamFailed(_Msg):
    type: Literal["stream_failed"] = "stream_failed"
    stream_id: str = Field(max_length=NAME_MAX)
    error: str = Field(max_length=4096)


# ---- control plane -> agent ----------------------------------------------------------------


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    agent_id: str
    heartbeat_seconds: float
    keep: list[str] = Field(
        default_factory=list, description="inventory session ids the control plane knows"
    )
    home_owners: dict[str, str] = Field(
        default_factory=dict,
        description="for each name in hello.legacy_homes that a user has now: that user's id",
    )
    server_time: datetime = Field(default_factory=utcnow)


class Command(_Msg):
    type: Literal["command"] = "command"
    command_id: str
    action: CommandAction
    session_id: str
    spec: SessionSpec | None = None


StreamPurpose = Literal[
    "vnc", "audio", "microphone", "thumbnail", "files_list", "files_read", "files_write"
]
"""What a dialled-back stream carries: `vnc` the viewer's RFB bytes; `audio` the session's
sound for one listener; `microphone` one browser's microphone into the session (ViewerPurpose:
all three are a browser's viewer socket); `thumbnail` one binary
frame, a JPEG of the session's screen at most THUMBNAIL_WIDTH wide, then the close; `files_*`
one file operation on the session's home (see FileReply and docs/files.md). Add a purpose here
and a handler on the agent's side for each new kind of stream."""

THUMBNAIL_WIDTH = 320
THUMBNAIL_MAX_BYTES = 512 * 1024
"""A thumbnail larger than this is refused by the control plane (a JPEG of 320 px is ~20 KiB)."""

HOME_PATH_MAX = 4096
HOME_NAME_MAX = 255


class OpenStream(_Msg):
    """Ask the agent to dial back a binary WebSocket for one viewer of one session.

    No address: the agent's backend knows how to reach (and authenticate to) its session."""

    type: Literal["open_stream"] = "open_stream"
    stream_id: str
    session_id: str
    path: str
    purpose: StreamPurpose = "vnc"
    base_url: str = Field(
        default="",
        description="ws(s) base of the replica holding the viewer; empty = the agent's server",
    )
    file_path: str = Field(
        default="",
        max_length=HOME_PATH_MAX,
        description="files_*: the path relative to the session's home ('' = the home)",
    )
    max_bytes: int | None = Field(
        default=None, ge=0, description="files_write: the most bytes the upload may have"
    )
    home_limit_mb: int | None = Field(
        default=None, ge=1, description="files_write: the home's size limit; None: no limit"
    )


FileErrorCode = Literal[
    "invalid_path", "not_found", "not_a_directory", "is_a_directory", "forbidden",
    "too_large", "quota", "unsupported", "failed",
]  # fmt: skip
FileType = Literal["file", "dir", "symlink", "other"]
MAX_LISTING = 10_000


class FileEntry(_Msg):
    name: str = Field(max_length=HOME_NAME_MAX * 4)
    type: FileType
    size: int = Field(ge=0)
    mtime: datetime


class FileReply(_Msg):
    """The agent's text frames on a files_* stream.

    files_list: one reply with `entries`. files_read: a reply with `kind` (a folder comes as a
    zip) and `size` (files), then binary frames, then a reply with `done`. files_write: a reply
    (ready, or the refusal), then the control plane's binary frames ended by an empty one, then
    a reply with `done` and `size`. A stream that closes without `done` was cut short."""

    type: Literal["file_reply"] = "file_reply"
    ok: bool
    error: FileErrorCode | None = None
    message: str = Field(default="", max_length=DETAIL_MAX)
    kind: Literal["file", "dir"] | None = None
    size: int | None = Field(default=None, ge=0)
    entries: list[FileEntry] | None = Field(default=None, max_length=MAX_LISTING)
    truncated: bool = False
    done: bool = False


class HomePathError(ValueError):
    """A path that does not name something inside the home."""


def home_path_parts(path: str) -> list[str]:
    """The components of a path relative to a session's home; '' or '.' is the home itself.

    Both sides check: the control plane to answer 400 early, the agent because it trusts no
    path it is given. Absolute paths, `..`, NUL bytes and over-long names are refused; the
    agent still opens every component without following symlinks."""
    if len(path) > HOME_PATH_MAX:
        raise HomePathError(f"path is longer than {HOME_PATH_MAX} characters")
    if "\x00" in path:
        raise HomePathError("path contains a NUL byte")
    if path.startswith("/") or path.startswith("~"):
        raise HomePathError("paths are relative to the session's home; absolute paths are refused")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise HomePathError("'..' is not allowed in a path")
        if len(part.encode()) > HOME_NAME_MAX:
            raise HomePathError(f"a path component is longer than {HOME_NAME_MAX} bytes")
    return parts


class ErrorMessage(_Msg):
    """Either side's answer to a message it could not accept; the connection stays up."""

    type: Literal["error"] = "error"
    code: str = Field(max_length=64)
    message: str = Field(max_length=4096)


AgentMessage = Annotated[
    Hello
    | Heartbeat
    | Ack
    | Result
    | SessionStatus
    | SessionProgress
    | StreamFailed
    | ErrorMessage,
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


def parse_file_reply(raw: str | bytes) -> FileReply:
    try:
        return FileReply.model_validate_json(raw)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", str(exc.errors()[:1])) from exc


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
