"""Log lines parse back to exactly what was logged, in key=value and in JSON mode.

The key=value reader here is written from the format's description in streamspace.logs (bare
tokens, JSON strings, JSON literals), not from its code, so a renderer bug cannot hide behind
a matching parser bug."""

from __future__ import annotations

import datetime as dt
import enum
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from streamspace import logs
from streamspace.config import Settings
from streamspace.controlplane.authcache import AuthCache
from streamspace.controlplane.events import EventBus
from streamspace.controlplane.hub import Hub
from streamspace.controlplane.peers import InProcessPeers
from streamspace.controlplane.revocation import Revocations
from streamspace.controlplane.transitions import Transitions
from streamspace.db.models import Session as SessionRow

_DECODER = json.JSONDecoder()
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

AWKWARD: dict[str, object] = {
    "spaces": "stuck starting for 60 s",
    "quotes": "he said \"stop\" and 'left'",
    "equals": "a=b c==d",
    "newlines": "line one\nline two\r\n\ttabbed",
    "backslash": "C:\\path\\n not a newline",
    "unicode": "café \u2028 separator",
    "empty": "",
    "looks_numeric": "60",
    "looks_literal": "null",
    "brackets": "[not json",
    "count": 60,
    "ratio": 0.25,
    "flag": False,
    "nothing": None,
    "items": [1, "two words", {"k": "v=w"}],
}


class Colour(enum.StrEnum):
    RED = "dark red"


class Step(enum.IntEnum):
    TWO = 2


def test_values_become_plain_data() -> None:
    when = dt.datetime(2026, 12, 2, 1, 2, 3, tzinfo=dt.UTC)
    got = [
        logs.plain(v)
        for v in (Colour.RED, Step.TWO, when, Path("/a b"), {3, 1}, float("nan"), KeyError("k"))
    ]
    assert got == [
        "dark red",
        2,
        "2026-12-02T01:02:03+00:00",
        "/a b",
        [1, 3],
        "nan",
        "KeyError('k')",
    ]
    assert [type(v) for v in got[:2]] == [str, int]


def parse_kv(line: str) -> dict[str, Any]:
    """`key=value` tokens: a value is a JSON string, a JSON array/object, a JSON literal or
    number, or else a bare string running to the next space."""
    out: dict[str, Any] = {}
    pos = 0
    while pos < len(line):
        eq = line.index("=", pos)
        key = line[pos:eq]
        assert key and " " not in key, (key, line)
        pos = eq + 1
        value: Any
        if line[pos : pos + 1] in ('"', "[", "{"):
            value, pos = _DECODER.raw_decode(line, pos)
        else:
            end = line.find(" ", pos)
            end = len(line) if end < 0 else end
            token, pos = line[pos:end], end
            if token in ("true", "false", "null") or _NUMBER.fullmatch(token):
                value = json.loads(token)
            else:
                value = token
        out[key] = value
        if pos < len(line):
            assert line[pos] == " ", line
            pos += 1
    return out


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """Everything the root logger writes, for one test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield io.StringIO()
    root.handlers[:] = handlers
    root.setLevel(level)


def capture(stream: io.StringIO, fmt: str, level: str = "DEBUG") -> None:
    logs.configure(level, fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def test_kv_round_trip(output: io.StringIO) -> None:
    capture(output, "kv")
    logs.get_logger("streamspace.test").event("awkward_values", **AWKWARD)
    [line] = lines(output)
    parsed = parse_kv(line)
    assert parsed.pop("level") == "info"
    assert parsed.pop("logger") == "streamspace.test"
    assert parsed.pop("event") == "awkward_values"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed.pop("ts"))
    assert parsed == AWKWARD


def test_json_round_trip(output: io.StringIO) -> None:
    capture(output, "json")
    logs.get_logger("streamspace.test").warning("awkward_values", **AWKWARD)
    [line] = lines(output)
    parsed = json.loads(line)
    assert isinstance(parsed.pop("ts"), float)
    assert parsed.pop("level") == "warning"
    assert parsed.pop("logger") == "streamspace.test"
    assert parsed.pop("event") == "awkward_values"
    assert parsed == AWKWARD


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_both_modes_carry_the_same_fields(output: io.StringIO, fmt: str) -> None:
    capture(output, fmt)
    log = logs.get_logger("streamspace.test")
    log.event("one", session_id="s-1", seconds=60, note="two words")
    log.error("two", agent_id="a-1", error=ConnectionResetError(104, "reset by peer"))
    first, second = lines(output)
    read = json.loads if fmt == "json" else parse_kv
    assert {k: v for k, v in read(first).items() if k not in ("ts", "level", "logger")} == {
        "event": "one",
        "session_id": "s-1",
        "seconds": 60,
        "note": "two words",
    }
    assert read(second)["error"] == "ConnectionResetError(104, 'reset by peer')"
    assert read(second)["level"] == "error"


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_line_keys_are_not_overwritten_by_fields(output: io.StringIO, fmt: str) -> None:
    capture(output, fmt)
    logs.get_logger("streamspace.test").event(
        "clash", level="x", logger="y", event="z", message="m", ts=1, exc="e"
    )
    [line] = lines(output)
    parsed = json.loads(line) if fmt == "json" else parse_kv(line)
    assert (parsed["level"], parsed["logger"], parsed["event"]) == (
        "info",
        "streamspace.test",
        "clash",
    )
    assert {k: parsed[k] for k in ("level_", "logger_", "event_", "message_", "ts_", "exc_")} == {
        "level_": "x",
        "logger_": "y",
        "event_": "z",
        "message_": "m",
        "ts_": 1,
        "exc_": "e",
    }


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_exception_traceback_is_one_field(output: io.StringIO, fmt: str) -> None:
    capture(output, fmt)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logs.get_logger("streamspace.test").exception("failed", step="parse it")
    [line] = lines(output)
    parsed = json.loads(line) if fmt == "json" else parse_kv(line)
    assert parsed["step"] == "parse it"
    assert parsed["exc"].startswith("Traceback (most recent call last):\n")
    assert parsed["exc"].endswith("ValueError: bad\nvalue")


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_error_carries_the_traceback_of_an_exception_caught_elsewhere(
    output: io.StringIO, fmt: str
) -> None:
    """A finished task's exception is no longer being handled; its traceback still goes under
    `exc`, like `exception`'s, not into a field of its own."""
    capture(output, fmt)
    try:
        raise KeyError("gone")
    except KeyError as caught:
        failure = caught
    logs.get_logger("streamspace.test").error("task_failed", task="reader", exc_info=failure)
    [line] = lines(output)
    parsed = json.loads(line) if fmt == "json" else parse_kv(line)
    assert parsed["level"] == "error" and parsed["task"] == "reader"
    assert parsed["exc"].startswith("Traceback (most recent call last):\n")
    assert parsed["exc"].endswith("KeyError: 'gone'")


def test_old_style_message_keeps_every_word_in_json(output: io.StringIO) -> None:
    """The JSON mode used to split on spaces: `message='stuck starting for 60 s'` came out as
    `"message": "'stuck"`. Old-style call sites keep their whole text and their ids."""
    capture(output, "json")
    old = logging.getLogger("streamspace.old")
    old.info(
        "session_event session_id=%s kind=%s message=%r", "s-1", "stuck", "stuck starting for 60 s"
    )
    old.warning("session_processes_survived session_id=%s pids=%s", "s-2", [11, 12])
    old.info("vnc_open agent_id=a-1 user_id=u-1 note=%s", json.dumps('say "hi" = fine'))
    old.info("Started server process [%d]", 4242)
    first, second, third, fourth = (json.loads(line) for line in lines(output))
    assert first["message"] == (
        "session_event session_id=s-1 kind=stuck message='stuck starting for 60 s'"
    )
    assert (first["event"], first["session_id"], first["kind"], first["message_"]) == (
        "session_event",
        "s-1",
        "stuck",
        "stuck starting for 60 s",
    )
    assert (second["session_id"], second["pids"]) == ("s-2", "[11, 12]")
    assert (third["agent_id"], third["user_id"], third["note"]) == ("a-1", "u-1", 'say "hi" = fine')
    assert (fourth["event"], fourth["message"]) == ("Started", "Started server process [4242]")


def test_control_plane_events_carry_their_fields_in_json(output: io.StringIO) -> None:
    """Real control-plane events, through the product's JSON formatter: each field is its own
    typed key (`closed` a number, the message whole), with no pre-rendered `message` beside
    them, which a %-style call could only produce by having its text re-parsed."""
    capture(output, "json")
    peers = InProcessPeers("r1")
    db = async_sessionmaker()  # never used: neither event touches the database
    hub = Hub(db=db, settings=Settings(), replica_id="r1", peers=peers)
    transitions = Transitions(settings=Settings(), events=EventBus(peers=peers), hub=hub)
    transitions.event(AsyncSession(), SessionRow(id="s-1"), "stuck", "stuck starting for 60 s")
    revocations = Revocations(auth_cache=AuthCache(0), db=db, peers=peers)
    closed: list[str] = []
    with revocations.track("u-1", 1, "stream", closed.append):
        revocations.apply("u-1", "signed out: password changed")
    assert closed == ["signed out: password changed"]

    def fields(line: str) -> dict[str, Any]:
        parsed = json.loads(line)
        return {k: v for k, v in parsed.items() if k not in ("ts", "level", "logger")}

    session_event, revoked = lines(output)
    assert fields(session_event) == {
        "event": "session_event",
        "session_id": "s-1",
        "kind": "stuck",
        "message_": "stuck starting for 60 s",
    }
    assert fields(revoked) == {
        "event": "connections_revoked",
        "user_id": "u-1",
        "closed": 1,
        "reason": "signed out: password changed",
    }


def test_old_style_message_unchanged_in_kv(output: io.StringIO) -> None:
    capture(output, "kv")
    logging.getLogger("streamspace.old").info("stream_closed stream_id=%s session_id=%s", "t", "s")
    logging.getLogger("streamspace.old").info("two\nlines")
    first, second = lines(output)
    assert first.endswith(" event=stream_closed stream_id=t session_id=s")
    assert second.endswith(" event=two\\nlines")


def test_caplog_sees_the_key_value_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamspace.test")
    logs.get_logger("streamspace.test").event("stream_open", stream_id="t-1", note="a b")
    [record] = caplog.records
    assert record.getMessage() == 'stream_open stream_id=t-1 note="a b"'


def test_disabled_level_renders_nothing(output: io.StringIO) -> None:
    capture(output, "kv", level="WARNING")

    class Loud:
        def __str__(self) -> str:
            raise AssertionError("rendered although INFO is off")

    logs.get_logger("streamspace.test").event("quiet", value=Loud())
    assert output.getvalue() == ""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_alembic_chatter_is_debug(output: io.StringIO, level: str) -> None:
    capture(output, "kv", level=level)
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate")
    logging.getLogger("alembic.runtime.migration").warning("a real problem")
    logging.getLogger("alembicish").info("not alembic")
    got = [(parse_kv(line.split(" event=")[0])["level"], line) for line in lines(output)]
    levels = [lvl for lvl, _ in got]
    if level == "INFO":
        assert levels == ["warning", "info"]
    else:
        assert levels == ["debug", "debug", "warning", "info"]
