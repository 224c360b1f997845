"""Write a small unit of work in one PostgreSQL statement instead of one per table.

Why: a lifecycle transition is an UPDATE of the session row plus INSERTs of its agent command,
session event and audit row. Flushed by the ORM that is one round trip per table before COMMIT,
and under load each round trip is one more wait for a database backend and for the event loop,
all before the agent may be told. A data-modifying ``WITH`` writes them in one round trip.

The statement text is built once per shape (tables, columns, row counts) and reused, so it
costs no compilation after the first time and asyncpg serves it from its prepared-statement
cache. Anything this does not cover (SQLite, deletes, inheritance, version counters,
database-side column defaults, larger batches) is left to the ORM's own flush, the only other
path.

Inside a transaction the statement does what the ORM's flush would (an UPDATE that matches no
row raises `StaleDataError`). In a session without one (`engine.write_session_factory`, which
spares the BEGIN and COMMIT round trips) it is the whole write, so each UPDATE is a
compare-and-set: it matches only while every column it changes still holds the value this
session read, and the INSERTs happen only if every UPDATE matched. Otherwise nothing is written
and `StaleDataError` is raised: someone else changed the row in between (a user's stop racing a
placement of the same session, say), and the caller reads again and decides again.

After the statement, new objects are expunged (they keep the values written, including
Python-side defaults, but database-generated keys are not read back) and updated objects have
their changes marked as committed, so the ORM's flush at COMMIT has nothing left to write.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, inspect, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.schema import Column

ONE_STATEMENT_ONLY = "streamspace.one_statement_only"
"""Session.info key of sessions without a transaction (engine.write_session_factory)."""

MAX_ROWS = 12
"""Larger units (placement rounds of many sessions) vary too much in shape to be worth a
prepared statement each; the ORM batches those well enough."""


@dataclass(frozen=True)
class _Part:
    """One sub-statement: an UPDATE of one row (``key`` names the primary key column; ``guards``
    the columns whose read value it checks) or an INSERT of one row."""

    table: Table
    columns: tuple[str, ...]
    key: str = ""
    guards: tuple[str, ...] = ()


@dataclass
class _Plan:
    parts: list[_Part]
    params: dict[str, Any]
    updated: list[tuple[Any, dict[str, Any]]]
    inserted: list[tuple[Any, dict[str, Any]]]


def _default(column: Column[Any], kind: str) -> tuple[bool, Any]:
    default = column.default if kind == "insert" else column.onupdate
    if default is None:
        return False, None
    if getattr(default, "is_callable", False):
        return True, default.arg(None)  # type: ignore[attr-defined]
    if getattr(default, "is_scalar", False):
        return True, default.arg  # type: ignore[attr-defined]
    raise _Unsupported


class _Unsupported(Exception):
    """The unit of work has something this module does not write; the ORM will."""


class _Nothing(Exception):
    """Nothing to write."""


def _simple_mapper(obj: Any) -> Mapper[Any]:
    mapper: Mapper[Any] = inspect(obj).mapper
    if mapper.inherits is not None or mapper.version_id_col is not None:
        raise _Unsupported
    if not isinstance(mapper.local_table, Table):
        raise _Unsupported
    return mapper


def _columns(table: Table) -> list[Column[Any]]:
    for col in table.columns:
        if col.server_onupdate is not None or col.computed is not None:
            raise _Unsupported
    return list(table.columns)


def _insert_values(table: Table, given: Mapping[str, Any]) -> dict[str, Any]:
    """Column values as the ORM would insert them: a value that is None counts as not given,
    so the column's default (or NULL) applies; autoincrement keys are left to the database."""
    values: dict[str, Any] = {}
    for col in _columns(table):
        value = given.get(col.name)
        if value is not None:
            values[col.name] = value
            continue
        has, default = _default(col, "insert")
        if has:
            values[col.name] = default
        elif col.server_default is not None and not col.primary_key:
            raise _Unsupported
    return values


def _plan_update(obj: Any, plan: _Plan, guard: bool) -> None:
    mapper = _simple_mapper(obj)
    table = mapper.local_table
    assert isinstance(table, Table)
    state = inspect(obj)
    if state.key is None or len(mapper.primary_key) != 1:
        raise _Unsupported
    changed: dict[str, Any] = {}
    read: dict[str, Any] = {}
    for attr in mapper.column_attrs:
        if len(attr.columns) != 1:
            raise _Unsupported
        col = attr.columns[0]
        history = state.attrs[attr.key].history
        if history.has_changes():
            if col.primary_key or (guard and len(history.deleted) != 1):
                raise _Unsupported  # the value read is unknown: nothing to compare against
            changed[col.name] = getattr(obj, attr.key)
            if guard:
                read[col.name] = history.deleted[0]
    if not changed:
        return
    for col in _columns(table):
        if col.name not in changed:
            has, value = _default(col, "update")
            if has:
                changed[col.name] = value
    key = mapper.primary_key[0].name
    names = tuple(sorted(changed))
    guards = tuple(sorted(read))
    plan.parts.append(_Part(table, names, key, guards))
    prefix = f"p{len(plan.parts) - 1}_"
    plan.params.update({prefix + name: changed[name] for name in names})
    plan.params.update({f"{prefix}was_{name}": read[name] for name in guards})
    plan.params[prefix + key] = state.identity[0]
    attrs = {mapper.get_property_by_column(table.c[n]).key: changed[n] for n in names}
    plan.updated.append((obj, attrs))


def _plan_insert(table: Table, values: dict[str, Any], plan: _Plan) -> None:
    names = tuple(sorted(values))
    plan.parts.append(_Part(table, names))
    prefix = f"p{len(plan.parts) - 1}_"
    plan.params.update({prefix + name: values[name] for name in names})


@functools.lru_cache(maxsize=64)
def _statement(parts: tuple[_Part, ...], dialect: Dialect) -> TextClause:
    quote = dialect.identifier_preparer.quote
    table_name = dialect.identifier_preparer.format_table
    ctes: list[str] = []
    counts: list[str] = []
    binds = []
    updates = [f"w{i}" for i, part in enumerate(parts) if part.key]
    for i, part in enumerate(parts):
        p = f"p{i}_"
        if part.key:
            sets = ", ".join(f"{quote(c)} = :{p}{c}" for c in part.columns)
            checks = "".join(
                f" AND {quote(c)} IS NOT DISTINCT FROM :{p}was_{c}" for c in part.guards
            )
            sql = (
                f"UPDATE {table_name(part.table)} SET {sets} "
                f"WHERE {quote(part.key)} = :{p}{part.key}{checks} RETURNING 1"
            )
            counts.append(f"(SELECT count(*) FROM w{i})")
            binds.append(bindparam(p + part.key, type_=part.table.c[part.key].type))
            binds += [bindparam(f"{p}was_{c}", type_=part.table.c[c].type) for c in part.guards]
        else:
            cols = ", ".join(quote(c) for c in part.columns)
            vals = ", ".join(f":{p}{c}" for c in part.columns)
            only_if = f" FROM {', '.join(updates)}" if updates else ""
            sql = f"INSERT INTO {table_name(part.table)} ({cols}) SELECT {vals}{only_if}"
        ctes.append(f"w{i} AS ({sql})")
        binds += [bindparam(p + c, type_=part.table.c[c].type) for c in part.columns]
    select = "SELECT " + (", ".join(counts) if counts else "0")
    return text(f"WITH {', '.join(ctes)} {select}").bindparams(*binds)


def _plan(
    db: AsyncSession, extra: Sequence[tuple[Table, Sequence[Mapping[str, Any]]]], guard: bool
) -> _Plan:
    sync = db.sync_session
    if sync.deleted:
        raise _Unsupported
    plan = _Plan([], {}, [], [])
    dirty = sorted(
        (obj for obj in sync.dirty if sync.is_modified(obj)),
        key=lambda obj: (type(obj).__name__, inspect(obj).identity or ()),
    )
    new = list(sync.new)
    rows = len(dirty) + len(new) + sum(len(r) for _, r in extra)
    if rows == 0:
        raise _Nothing
    if rows > MAX_ROWS:
        raise _Unsupported
    for obj in dirty:
        _plan_update(obj, plan, guard)
    for obj in new:
        mapper = _simple_mapper(obj)
        table = mapper.local_table
        assert isinstance(table, Table)
        given = {attr.columns[0].name: obj.__dict__.get(attr.key) for attr in mapper.column_attrs}
        values = _insert_values(table, given)
        _plan_insert(table, values, plan)
        plan.inserted.append(
            (obj, {mapper.get_property_by_column(table.c[n]).key: v for n, v in values.items()})
        )
    for table, table_rows in extra:
        for row in table_rows:
            _plan_insert(table, _insert_values(table, row), plan)
    if not plan.parts:
        raise _Nothing
    return plan


async def write_pending(
    db: AsyncSession, extra: Sequence[tuple[Table, Sequence[Mapping[str, Any]]]] = ()
) -> bool:
    """Write the session's pending changes, plus ``extra`` rows for plain tables, in one
    statement. False (and nothing written) when there is nothing to write or the unit of work
    is not one this covers; in a session without a transaction the latter is an error."""
    bind = db.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    alone = bool(db.info.get(ONE_STATEMENT_ONLY))
    try:
        plan = _plan(db, extra, guard=alone)
    except _Nothing:
        return False
    except _Unsupported:
        if alone:
            raise RuntimeError(
                "this write does not fit one statement and the session has no transaction"
            ) from None
        return False
    stmt = _statement(tuple(plan.parts), bind.dialect)
    with db.no_autoflush:  # the statement is the flush
        counts = (await db.execute(stmt, plan.params)).one()
    updates = [i for i, part in enumerate(plan.parts) if part.key]
    for n, i in zip(counts if updates else (), updates, strict=True):
        if n != 1:
            table = plan.parts[i].table.name
            raise StaleDataError(
                f"{table} row changed or gone since it was read; nothing was written"
            )
    sync = db.sync_session
    for obj, _ in plan.inserted:
        sync.expunge(obj)
    for obj, values in plan.inserted + plan.updated:
        for key, value in values.items():
            set_committed_value(obj, key, value)
    return True
