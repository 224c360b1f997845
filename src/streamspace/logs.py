"""Structured logs: one event per line, key=value (default) or JSON, every word kept.

An event is a name and fields, passed as fields::

    log = logs.get_logger(__name__)
    log.event("session_stuck", session_id=sid, seconds=60)
    log.warning("agent_lost", agent_id=aid, error=exc)

renders as ``... event=session_stuck session_id=3f2a seconds=60`` in key=value mode and as
``{"ts": ..., "event": "session_stuck", "session_id": "3f2a", "seconds": 60}`` in JSON mode.
A key=value value is either a bare token or a JSON string (``"stuck starting for 60 s"``,
escapes and all), so a parser gets back exactly what was logged; ``true``/``false``/``null``,
numbers, and JSON arrays or objects are what they look like, and a string that would read as
one of those is quoted.

Why not structlog: the product, uvicorn, alembic and SQLAlchemy all log through the standard
library, and pytest's caplog reads standard records. Events here are ordinary
`logging.LogRecord`s (their message is the key=value rendering, the fields ride along on the
record), so one handler formats everybody's lines, caplog keeps working, and no dependency or
second pipeline is added for what fits in one small module.

Records logged the old way (``logging.getLogger(...).info("name key=%s", v)``, and every
library's) still work: key=value mode prints the message as it is, and JSON mode puts the whole
message under ``message`` beside the first word as ``event`` and the ``key=value`` pairs it
can read, so nothing is lost either way.

The keys ``ts level logger event message exc`` belong to the line; a field with one of those
names gets a trailing underscore (``message_``).
"""

from __future__ import annotations

import ast
import datetime as dt
import enum
import json
import logging
import math
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

RESERVED = frozenset({"ts", "level", "logger", "event", "message", "exc"})
_EVENT = "ss_event"
_FIELDS = "ss_fields"
_KEY_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_.\-]")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LEGACY_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.\-]*)=")
_NEXT_KEY = re.compile(r"\s+[A-Za-z_][A-Za-z0-9_.\-]*=")
_QUOTED_REPR = re.compile(r"'(?:[^'\\\n]|\\.)*'")
_JSON = json.JSONDecoder()

# Libraries that narrate routine work at INFO: their INFO lines are shown at DEBUG only.
DEMOTED_TO_DEBUG = ("alembic",)
QUIETED_TO_WARNING = ("uvicorn.access", "httpx", "websockets", "aiosqlite", "sqlalchemy.engine")


def plain(value: object) -> Any:
    """`value` as JSON-able data: scalars as they are, containers element by element,
    exceptions as their repr (a bare str() of many exceptions is empty), the rest as str()."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, BaseException):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [plain(v) for v in items]
    return str(value)


def _key(name: str) -> str:
    key = name if _KEY_OK.fullmatch(name) else _KEY_BAD.sub("_", name)
    if not _KEY_OK.fullmatch(key):
        key = "_" + key
    while key in RESERVED:
        key += "_"
    return key


def _fields(fields: Mapping[str, object]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields.items():
        key = _key(name)
        while key in out:
            key += "_"
        out[key] = plain(value)
    return out


def _bare_ok(text: str) -> bool:
    """Whether `text` can stand unquoted and still read back as this same string."""
    return (
        text != ""
        and text.isprintable()
        and not any(c.isspace() or c in '"\\=' for c in text)
        and text[0] not in "[{'"
        and text not in ("true", "false", "null")
        and _NUMBER.fullmatch(text) is None
    )


def kv_value(value: Any) -> str:
    """One (already plain) value as a key=value token."""
    if isinstance(value, str):
        return value if _bare_ok(value) else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def render_kv(event: str, fields: Mapping[str, Any]) -> str:
    """`event key=value ...`; the event name is quoted too if it is no bare token."""
    return " ".join([kv_value(event), *(f"{k}={kv_value(v)}" for k, v in fields.items())])


def _legacy_fields(rest: str) -> dict[str, str]:
    """The `key=value` pairs of an old-style message, for JSON mode.

    A value is a JSON string, a Python repr of a string (``%r``), or everything up to the next
    `` key=`` (so ``pids=[1, 2]`` stays whole). Words that are no pair are skipped; the whole
    message is logged beside these anyway."""
    found: dict[str, str] = {}
    pos, end = 0, len(rest)
    while pos < end:
        while pos < end and rest[pos].isspace():
            pos += 1
        match = _LEGACY_KEY.match(rest, pos)
        if match is None:
            while pos < end and not rest[pos].isspace():
                pos += 1
            continue
        key, pos = match.group(1), match.end()
        value: str | None = None
        if rest.startswith('"', pos):
            try:
                decoded, stop = _JSON.raw_decode(rest, pos)
            except ValueError:
                decoded = None
            if isinstance(decoded, str) and (stop == end or rest[stop].isspace()):
                value, pos = decoded, stop
        elif rest.startswith("'", pos):
            quoted = _QUOTED_REPR.match(rest, pos)
            if quoted is not None and (quoted.end() == end or rest[quoted.end()].isspace()):
                try:
                    value = str(ast.literal_eval(quoted.group()))
                    pos = quoted.end()
                except (ValueError, SyntaxError):
                    value = None
        if value is None:
            nxt = _NEXT_KEY.search(rest, pos)
            stop = nxt.start() if nxt else end
            value, pos = rest[pos:stop], stop
        found[_key(key)] = value
    return found


def _timestamp(record: logging.LogRecord) -> str:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{ts}.{int(record.msecs):03d}Z"


class KVFormatter(logging.Formatter):
    """``ts=... level=... logger=... event=<name> key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        if hasattr(record, _EVENT):
            message = record.getMessage()
        else:
            message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        line = (
            f"ts={_timestamp(record)} level={record.levelname.lower()} "
            f"logger={record.name} event={message}"
        )
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line: the line's own keys, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        name = getattr(record, _EVENT, None)
        if name is not None:
            body["event"] = name
            body.update(getattr(record, _FIELDS, {}))
        else:
            message = record.getMessage()
            first, _, rest = message.strip().partition(" ")
            body["event"] = first
            body["message"] = message
            for key, value in _legacy_fields(rest).items():
                body.setdefault(key, value)
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body)


class EventLogger:
    """A `logging.Logger` spoken to in events: ``log.event(name, **fields)`` at INFO, and
    ``debug``/``warning``/``error``/``exception`` (ERROR with the current traceback) alike.

    There is no ``info``: the old ``info("name k=%s", v)`` style does not type-check here."""

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def _log(
        self, level: int, name: str, fields: Mapping[str, object], exc: bool | BaseException
    ) -> None:
        if not self.logger.isEnabledFor(level):
            return
        values = _fields(fields)
        self.logger.log(
            level,
            render_kv(name, values),
            exc_info=exc,
            extra={_EVENT: name, _FIELDS: values},
            stacklevel=3,
        )

    def debug(self, name: str, /, **fields: object) -> None:
        self._log(logging.DEBUG, name, fields, False)

    def event(self, name: str, /, **fields: object) -> None:
        self._log(logging.INFO, name, fields, False)

    def warning(self, name: str, /, **fields: object) -> None:
        self._log(logging.WARNING, name, fields, False)

    def error(
        self, name: str, /, *, exc_info: BaseException | None = None, **fields: object
    ) -> None:
        """With `exc_info`, the traceback of that exception (caught elsewhere, e.g. a finished
        task's) goes under `exc`, as `exception` does for the one being handled."""
        self._log(logging.ERROR, name, fields, exc_info if exc_info is not None else False)

    def exception(self, name: str, /, **fields: object) -> None:
        self._log(logging.ERROR, name, fields, True)


def get_logger(name: str) -> EventLogger:
    return EventLogger(logging.getLogger(name))


class _DemoteInfo(logging.Filter):
    """INFO records of `DEMOTED_TO_DEBUG` loggers become DEBUG ones, dropped below DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not any(
            record.name == p or record.name.startswith(p + ".") for p in DEMOTED_TO_DEBUG
        ):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def formatter(fmt: str) -> logging.Formatter:
    return JSONFormatter() if fmt == "json" else KVFormatter()


def configure(level: str = "INFO", fmt: str = "kv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(_DemoteInfo())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in QUIETED_TO_WARNING:
        logging.getLogger(noisy).setLevel(logging.WARNING)
