"""The shared agent <-> control plane message module: every shape round-trips, bad frames fail
with the documented ProtocolError codes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streamspace import protocol
from streamspace.protocol import (
    Ack,
    Capacity,
    Catalog,
    CatalogEntry,
    Command,
    Display,
    Endpoint,
    EnrollRequest,
    EnrollResponse,
    ErrorMessage,
    Heartbeat,
    Hello,
    ImageLaunch,
    InventoryItem,
    Isolation,
    Load,
    LocalLaunch,
    OpenStream,
    ProtocolError,
    Resources,
    Result,
    SessionProgress,
    SessionSpec,
    SessionStatus,
    StreamFailed,
    Welcome,
)


def _spec() -> SessionSpec:
    return SessionSpec(
        session_id="s-1",
        user_id="0f3a9c",
        user="alice",
        template="xterm",
        local=LocalLaunch(command=["xterm", "-fa", "Mono"], env={"LANG": "C.UTF-8"}),
        image=ImageLaunch(image="ghcr.io/x/xterm:1", command=["xterm"], env={"A": "b"}),
        display=Display(width=1920, height=1080, depth=32, vnc_port=5902),
        resources=Resources(cpu_millis=1500, memory_mb=2048),
        persistent_home=False,
        network=True,
        home_limit_mb=512,
    )


AGENT_MESSAGES: list[protocol.AgentMessage] = [
    Hello(
        protocol_version=protocol.PROTOCOL_VERSION,
        agent_id="a-1",
        cluster_id="eu-1",
        cluster_name="Europe",
        region="eu-west",
        backend="docker",
        capacity=Capacity(max_sessions=4, cpu_millis=8000, memory_mb=16384),
        templates=["xterm", "firefox"],
        inventory=[
            InventoryItem(
                session_id="s-1",
                state="running",
                endpoint=Endpoint(host="10.0.0.2", port=5901),
                user="alice",
                template="xterm",
            ),
            InventoryItem(
                session_id="s-3", state="running", endpoint=Endpoint(unix_path="/run/x/vnc.sock")
            ),
            InventoryItem(session_id="s-2", state="hibernated"),
        ],
        version="0.1.0",
        isolation=Isolation(mode="container", detail="non-root", limits_enforced=True),
        legacy_homes=["carol"],
    ),
    Hello(
        protocol_version=1,
        agent_id="a-1",
        cluster_id="c",
        cluster_name="C",
        backend="local",
        capacity=Capacity(max_sessions=0, cpu_millis=0, memory_mb=0),
        templates=[],
        isolation=Isolation(mode="insecure-shared-user"),
    ),
    Heartbeat(load=Load(sessions=2, cpu_millis=2000, memory_mb=2048)),
    Heartbeat(
        load=Load(sessions=0, cpu_millis=0, memory_mb=0),
        healthy=False,
        detail="docker engine unreachable",
        templates=["xterm"],
    ),
    Ack(command_id="c-1"),
    Result(command_id="c-1", ok=True, endpoint=Endpoint(port=5901)),
    Result(command_id="c-2", ok=False, error="image not found"),
    SessionStatus(session_id="s-1", state="exited", reason="exit code 1"),
    SessionProgress(session_id="s-1", message="pulling image localhost/streamspace/xterm"),
    StreamFailed(stream_id="st-1", error="connection refused"),
    ErrorMessage(code="invalid_json", message="bad frame"),
]

SERVER_MESSAGES: list[protocol.ServerMessage] = [
    Welcome(agent_id="a-1", heartbeat_seconds=10.0),
    Welcome(
        agent_id="a-1",
        heartbeat_seconds=2.5,
        keep=["s-1", "s-2"],
        home_owners={"carol": "c4a0"},
        server_time=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    ),
    Command(command_id="c-1", action="start", session_id="s-1", spec=_spec()),
    Command(command_id="c-2", action="wake", session_id="s-1", spec=_spec()),
    Command(command_id="c-3", action="stop", session_id="s-1"),
    Command(command_id="c-4", action="hibernate", session_id="s-1"),
    OpenStream(
        stream_id="st-1",
        session_id="s-1",
        path=protocol.AGENT_STREAM_PATH_PREFIX + "st-1",
    ),
    OpenStream(
        stream_id="st-2",
        session_id="s-1",
        path=protocol.AGENT_STREAM_PATH_PREFIX + "st-2",
        purpose="thumbnail",
    ),
    ErrorMessage(code="revoked", message="agent revoked by an administrator"),
]


@pytest.mark.parametrize("msg", AGENT_MESSAGES, ids=lambda m: m.type)
def test_agent_messages_round_trip(msg: protocol.AgentMessage) -> None:
    raw = protocol.encode(msg)
    parsed = protocol.parse_agent_message(raw)
    assert parsed == msg
    assert type(parsed) is type(msg)
    assert protocol.parse_agent_message(raw.encode()) == msg


@pytest.mark.parametrize("msg", SERVER_MESSAGES, ids=lambda m: m.type)
def test_server_messages_round_trip(msg: protocol.ServerMessage) -> None:
    raw = protocol.encode(msg)
    parsed = protocol.parse_server_message(raw)
    assert parsed == msg
    assert type(parsed) is type(msg)


def test_every_message_type_is_covered() -> None:
    agent_types = {m.type for m in AGENT_MESSAGES}
    server_types = {m.type for m in SERVER_MESSAGES}
    assert agent_types == {
        "hello",
        "heartbeat",
        "ack",
        "result",
        "session_status",
        "session_progress",
        "stream_failed",
        "error",
    }
    assert server_types == {"welcome", "command", "open_stream", "error"}


@pytest.mark.parametrize(
    "body",
    [
        EnrollRequest(
            join_token="jt-abcdefgh",
            name="host-1",
            cluster_id="eu-1.a_b",
            cluster_name="Europe",
            region="eu",
            backend="kubernetes",
        ),
        EnrollResponse(agent_id="a-1", credential="secret-credential"),
        Catalog(
            templates=[
                CatalogEntry(name="xterm", local=LocalLaunch(command=["xterm"])),
                CatalogEntry(name="firefox", image=ImageLaunch(image="firefox:latest")),
            ]
        ),
    ],
    ids=lambda b: type(b).__name__,
)
def test_http_bodies_round_trip(body: protocol.EnrollRequest) -> None:
    raw = protocol.encode(body)
    assert type(body).model_validate_json(raw) == body


@pytest.mark.parametrize("parse", [protocol.parse_agent_message, protocol.parse_server_message])
@pytest.mark.parametrize("raw", ["{not json", "", b"\xff\xfe", '{"type": "ack",'])
def test_malformed_json_is_invalid_json(parse: object, raw: str | bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(raw)  # type: ignore[operator]
    assert info.value.code == "invalid_json"
    assert info.value.message


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "bogus"}',
        '{"command_id": "c-1"}',
        '{"type": "ack"}',
        "[]",
        '"ack"',
        '{"type": "welcome", "agent_id": "a", "heartbeat_seconds": 1}',  # wrong direction
    ],
)
def test_unknown_or_incomplete_agent_message_is_invalid_message(raw: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_agent_message(raw)
    assert info.value.code == "invalid_message"


def test_unknown_server_message_type_is_invalid_message() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_server_message('{"type": "hello"}')
    assert info.value.code == "invalid_message"


def test_extra_field_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_agent_message('{"type": "ack", "command_id": "c-1", "sneaky": true}')
    assert info.value.code == "invalid_message"
    assert "sneaky" in info.value.message
    with pytest.raises(ProtocolError):
        protocol.parse_server_message(
            '{"type": "command", "command_id": "c", "action": "stop", "session_id": "s",'
            ' "spec": null, "priority": 1}'
        )


def test_nested_extra_field_is_refused() -> None:
    raw = protocol.encode(Result(command_id="c-1", ok=True, endpoint=Endpoint(port=5901))).replace(
        '"port":5901', '"port":5901,"tls":true'
    )
    with pytest.raises(ProtocolError) as info:
        protocol.parse_agent_message(raw)
    assert info.value.code == "invalid_message"


def test_invalid_enum_value_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_server_message(
            '{"type": "command", "command_id": "c", "action": "reboot", "session_id": "s"}'
        )
    assert info.value.code == "invalid_message"
    assert "action" in info.value.message


def test_check_version_accepts_current() -> None:
    protocol.check_version(protocol.PROTOCOL_VERSION)


def test_check_version_rejects_unknown_with_clear_message() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.check_version(99)
    assert info.value.code == "unsupported_protocol_version"
    assert "99" in info.value.message
    assert "supported: 2" in info.value.message
    assert "upgrade" in info.value.message


def test_protocol_error_is_a_value_error() -> None:
    err = ProtocolError("invalid_json", "boom")
    assert isinstance(err, ValueError)
    assert str(err) == "boom"


def test_version_1_agents_are_refused() -> None:
    """A version-1 agent runs sessions as its own user and knows no VNC secrets."""
    with pytest.raises(ProtocolError) as info:
        protocol.check_version(1)
    assert info.value.code == "unsupported_protocol_version"


def test_endpoint_is_a_port_or_a_unix_socket_never_both() -> None:
    assert Endpoint(port=5901).describe() == "127.0.0.1:5901"
    assert Endpoint(unix_path="/run/s/vnc.sock").describe() == "unix:/run/s/vnc.sock"
    with pytest.raises(ValueError, match="either a port or a unix_path"):
        Endpoint(port=5901, unix_path="/run/s/vnc.sock")
    with pytest.raises(ValueError, match="either a port or a unix_path"):
        Endpoint()


def _hello(**fields: object) -> str:
    base: dict[str, object] = {
        "type": "hello",
        "protocol_version": 2,
        "agent_id": "a-1",
        "cluster_id": "c",
        "cluster_name": "C",
        "backend": "local",
        "capacity": {"max_sessions": 1, "cpu_millis": 1, "memory_mb": 1},
        "templates": [],
        "isolation": {"mode": "uid-sandbox"},
    }
    base.update(fields)
    import json

    return json.dumps(base)


@pytest.mark.parametrize(
    "fields",
    [
        {"templates": [f"t{i}" for i in range(15_000)]},
        {"templates": ["x" * 5000]},
        {"cluster_name": "c" * 10_000},
        {"version": "v" * 1000},
        {"isolation": {"mode": "uid-sandbox", "detail": "d" * 100_000}},
    ],
    ids=["15000-templates", "long-template-name", "long-cluster-name", "long-version", "detail"],
)
def test_oversized_hello_fields_are_refused(fields: dict[str, object]) -> None:
    """The probe stored a 15 MiB hello with 15,000 template names; now it is invalid."""
    assert protocol.parse_agent_message(_hello())  # the baseline is valid
    with pytest.raises(ProtocolError) as info:
        protocol.parse_agent_message(_hello(**fields))
    assert info.value.code == "invalid_message"


def test_user_ids_cannot_carry_the_volume_separator_or_a_path() -> None:
    for bad in ("a_b", "../x", "a/b", ""):
        with pytest.raises(ValueError):
            SessionSpec(session_id="s", user_id=bad, user="u", template="t")


def test_a_progress_message_is_bounded_and_not_empty() -> None:
    for message in ("", "x" * (protocol.PROGRESS_MAX + 1)):
        raw = SessionProgress.model_construct(session_id="s-1", message=message)
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_agent_message(protocol.encode(raw))
