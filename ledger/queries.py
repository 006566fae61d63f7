"""Listing jobs from the read model: filters, order, paging and counts, as SQL (CONTRACT §3).

No HTTP here. ``api/listing.py`` parses the request and builds conditions with ``condition()``, which checks
the attribute, operator and operand and converts the operand to the column's Python type; ``list_jobs``
turns a ``ListQuery`` into SQL.

Injection safety: attribute names and operators are only ever *keys* into the whitelists below, which map
them to fixed SQL fragments written in this file; every operand travels as a bind parameter. Nothing a
client sends is pasted into SQL text.

Operator semantics follow mature-era Orvos/Arvados:

* ``= null`` is IS NULL and ``!= null`` IS NOT NULL; ``!=`` and ``not in`` also match rows where the
  column is NULL (``x != 'a'`` is true for a NULL ``x``, unlike SQL's three-valued ``<>``).
* ``in``/``not in`` take an array; a null element matches (``in``) or excludes (``not in``) NULL rows.
* ``< <= > >=`` apply to text, integer and timestamp attributes; ``like``/``ilike`` to text attributes.
* Timestamps are RFC 3339 strings; booleans are JSON booleans or ``true/false/t/f/yes/no/y/n/1/0``;
  integers are JSON integers or decimal strings.
* The hash attributes (``script_parameters``, ``resource_limits``) support ``=`` and ``!=`` against an
  object only: jsonb equality, so key order does not matter. Every other operator on them is 422.
* ``kind`` and ``href`` are not stored (they are constant or derived), so they cannot be filtered or ordered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg

from ledger.errors import Invalid
from projections.job import Job
from projections.readmodel import JOB_COLUMNS, row_to_job
from projections.timefmt import parse_ts

ColumnType = Literal["text", "integer", "timestamp", "boolean", "jsonb"]


@dataclass(frozen=True, slots=True)
class Column:
    """A filterable, orderable attribute: its SQL type and whether it can be NULL (see schema.sql)."""

    type: ColumnType
    nullable: bool


_TEXT, _TEXT_NULL = Column("text", False), Column("text", True)
_TIME, _TIME_NULL = Column("timestamp", False), Column("timestamp", True)
# Keys are the only attribute names that ever reach SQL; each is also the column's name in `jobs`.
COLUMNS: Final[dict[str, Column]] = {
    "uuid": _TEXT,
    "owner_uuid": _TEXT,
    "created_at": _TIME,
    "modified_at": _TIME,
    "modified_by_user_uuid": _TEXT,
    "modified_by_client_uuid": _TEXT_NULL,
    "submit_id": _TEXT_NULL,
    "priority": Column("integer", False),
    "resource_limits": Column("jsonb", False),
    "script_name": _TEXT,
    "script_parameters": Column("jsonb", False),
    "script_version": _TEXT,
    "supplied_script_version": _TEXT,
    "cancelled_by_client": _TEXT_NULL,
    "cancelled_by_user": _TEXT_NULL,
    "cancelled_at": _TIME_NULL,
    "started_at": _TIME_NULL,
    "finished_at": _TIME_NULL,
    "running": Column("boolean", False),
    "success": Column("boolean", True),
    "is_locked_by": _TEXT_NULL,
    "state": _TEXT,
    "output": _TEXT_NULL,
    "log": _TEXT_NULL,
    "version": Column("integer", False),
    "etag": _TEXT,
}
assert set(COLUMNS) == set(JOB_COLUMNS), "COLUMNS must describe exactly the read model's job columns"

Operator = Literal["=", "!=", "<", "<=", ">", ">=", "like", "ilike", "in", "not in"]
OPERATORS: Final[frozenset[str]] = frozenset({"=", "!=", "<", "<=", ">", ">=", "like", "ilike", "in", "not in"})
_RANGE_SQL: Final[dict[str, str]] = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}
_LIKE_SQL: Final[dict[str, str]] = {"like": "LIKE", "ilike": "ILIKE"}
# Which operators each column type supports.
_ALLOWED: Final[dict[ColumnType, frozenset[str]]] = {
    "text": OPERATORS,
    "integer": OPERATORS - {"like", "ilike"},
    "timestamp": OPERATORS - {"like", "ilike"},
    "boolean": frozenset({"=", "!=", "in", "not in"}),
    "jsonb": frozenset({"=", "!="}),
}
# Explicit parameter types: the server never has to guess, and integers compare as bigint so an operand
# beyond int4 is a valid (if empty) comparison rather than an encoding error.
_SQL_TYPE: Final[dict[ColumnType, str]] = {
    "text": "text",
    "integer": "bigint",
    "timestamp": "timestamptz",
    "boolean": "boolean",
    "jsonb": "jsonb",
}
_TRUE: Final = frozenset({"true", "t", "yes", "y", "1"})
_FALSE: Final = frozenset({"false", "f", "no", "n", "0"})
_INTEGER: Final = re.compile(r"-?[0-9]{1,19}")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

QUEUE_ORDER: Final[tuple[tuple[str, bool], ...]] = (("priority", True), ("created_at", False))
DEFAULT_ORDER: Final[tuple[tuple[str, bool], ...]] = (("modified_at", True),)
_QUEUED_UNLOCKED: Final = "state = 'Queued' AND is_locked_by IS NULL"  # matches the jobs_queue partial index
_SELECT_COLUMNS: Final = ", ".join(JOB_COLUMNS)


@dataclass(frozen=True, slots=True)
class Condition:
    """One validated filter: a known attribute, a known operator, an operand of the column's type."""

    attribute: str
    operator: Operator
    operand: Any


@dataclass(frozen=True, slots=True)
class OrderKey:
    """One sort key: a known attribute and a direction."""

    attribute: str
    descending: bool = False


@dataclass(frozen=True, slots=True)
class ListQuery:
    """What to list. ``owner_uuid`` restricts to one owner's jobs (a caller that may not read everything);
    ``queue`` restricts to queued, unlocked jobs and changes the default order to the queue's."""

    conditions: tuple[Condition, ...] = ()
    order: tuple[OrderKey, ...] = ()
    limit: int = 100
    offset: int = 0
    count: bool = True
    owner_uuid: str | None = None
    queue: bool = False


@dataclass(frozen=True, slots=True)
class ListResult:
    """A page of jobs, and how many match in all (None when counting was not asked for)."""

    jobs: list[Job]
    items_available: int | None


# ---------------------------------------------------------------------------------------------------------
# Validation: client values in, typed conditions out. Every refusal is Invalid (422).
# ---------------------------------------------------------------------------------------------------------
def column(attribute: Any, purpose: str = "filter") -> Column:
    """The whitelisted column for ``attribute``, or ``Invalid`` naming it."""
    found = COLUMNS.get(attribute) if isinstance(attribute, str) else None
    if found is None:
        raise Invalid(f"Invalid attribute {_show(attribute)} in {purpose}")
    return found


def normalise_operator(operator: Any) -> Operator:
    """The operator in canonical form (case and inner spacing ignored), or ``Invalid``."""
    text = " ".join(operator.lower().split()) if isinstance(operator, str) else None
    if text not in OPERATORS:
        raise Invalid(f"Invalid operator {_show(operator)} in filter")
    return text  # type: ignore[return-value]


def condition(attribute: Any, operator: Any, operand: Any) -> Condition:
    """Validate one ``[attribute, operator, operand]`` filter and convert its operand (``Invalid`` if bad)."""
    col = column(attribute)
    op = normalise_operator(operator)
    if op not in _ALLOWED[col.type]:
        raise Invalid(f"Invalid operator {op!r} for {col.type} attribute {attribute!r} in filter")
    if op in ("in", "not in"):
        if not isinstance(operand, list):
            raise Invalid(f"Invalid operand type for {op!r} filter on {attribute!r}: expected an array")
        values = tuple(None if item is None else _convert(col, attribute, op, item) for item in operand)
        return Condition(attribute, op, values)
    if operand is None:
        if op not in ("=", "!="):
            raise Invalid(f"Invalid operand null for {op!r} filter on {attribute!r}")
        return Condition(attribute, op, None)
    return Condition(attribute, op, _convert(col, attribute, op, operand))


def order_key(attribute: Any, descending: bool) -> OrderKey:
    """A validated sort key (``Invalid`` for an attribute that cannot be ordered by)."""
    column(attribute, "order")
    return OrderKey(attribute, descending)


def _convert(col: Column, attribute: str, op: str, value: Any) -> Any:
    converted = _CONVERTERS[col.type](value)
    if converted is None:
        raise Invalid(f"Invalid operand {_show(value)} for {op!r} filter on {col.type} attribute {attribute!r}")
    return converted


def _as_text(value: Any) -> str | None:
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded: refuse them here as bad operands
    # rather than let the driver fail.
    if not isinstance(value, str) or "\x00" in value:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value


def _as_integer(value: Any) -> int | None:
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not _INT64_MIN <= value <= _INT64_MAX:
        return None
    return value


def _as_timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_ts(value)
    except (ValueError, OverflowError):  # OverflowError: a valid year 1 or 9999 time that UTC pushes out of range
        return None


def _as_boolean(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    return True if text in _TRUE else False if text in _FALSE else None


def _as_object(value: Any) -> dict[str, Any] | None:
    # jsonb cannot hold NUL in any string either: walk the whole document (iteratively: it may be deep).
    if not isinstance(value, dict):
        return None
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and _as_text(item) is None:
            return None
    return value


_CONVERTERS: Final = {
    "text": _as_text,
    "integer": _as_integer,
    "timestamp": _as_timestamp,
    "boolean": _as_boolean,
    "jsonb": _as_object,
}


def _show(value: Any) -> str:
    """A client value quoted for an error message, truncated so a huge value does not echo back whole."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------------
# SQL: fixed fragments from the whitelists, operands as $n.
# ---------------------------------------------------------------------------------------------------------
class _Params:
    """Collects bind values and hands out their ``$n`` placeholders."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any, sql_type: str) -> str:
        self.values.append(value)
        return f"${len(self.values)}::{sql_type}"


def _condition_sql(cond: Condition, params: _Params) -> str:
    col = column(cond.attribute)  # re-checked: only whitelisted names are ever written into the SQL
    name, sql_type, op, operand = cond.attribute, _SQL_TYPE[col.type], cond.operator, cond.operand
    if op in ("in", "not in"):
        return _membership_sql(name, col, sql_type, op == "in", operand, params)
    if operand is None:
        return f"{name} IS NULL" if op == "=" else f"{name} IS NOT NULL"
    placeholder = params.add(operand, sql_type)
    if op == "=":
        return f"{name} = {placeholder}"
    if op == "!=":
        # Orvos: != also matches NULL, where SQL's <> would give unknown and drop the row.
        return f"({name} <> {placeholder} OR {name} IS NULL)" if col.nullable else f"{name} <> {placeholder}"
    if op in _LIKE_SQL:
        return f"{name} {_LIKE_SQL[op]} {placeholder}"
    return f"{name} {_RANGE_SQL[op]} {placeholder}"


def _membership_sql(
    name: str, col: Column, sql_type: str, inside: bool, operand: Sequence[Any], params: _Params
) -> str:
    values = [value for value in operand if value is not None]
    has_null = len(values) != len(operand)
    placeholder = params.add(values, sql_type + "[]")
    if inside:
        test = f"{name} = ANY({placeholder})"
        return f"({test} OR {name} IS NULL)" if has_null and col.nullable else test
    test = f"{name} <> ALL({placeholder})"
    if not col.nullable:
        return test
    # `not in` matches NULL rows unless null itself is listed; <> ALL of an empty array is true even for
    # NULL, so the NULL case is always spelled out.
    return f"({test} AND {name} IS NOT NULL)" if has_null else f"({test} OR {name} IS NULL)"


def _where_sql(query: ListQuery, params: _Params) -> str:
    clauses = [_condition_sql(cond, params) for cond in query.conditions]
    if query.owner_uuid is not None:
        clauses.append(f"owner_uuid = {params.add(query.owner_uuid, 'text')}")
    if query.queue:
        clauses.append(_QUEUED_UNLOCKED)
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _order_sql(query: ListQuery, table: str = "") -> str:
    keys = [(key.attribute, key.descending) for key in query.order]
    if not keys:
        keys = list(QUEUE_ORDER if query.queue else DEFAULT_ORDER)
    seen: set[str] = set()
    parts = []
    for attribute, descending in [*keys, ("uuid", False)]:  # uuid last: a total order, so paging is stable
        column(attribute, "order")
        if attribute not in seen:
            seen.add(attribute)
            parts.append(f"{table}{attribute} {'DESC' if descending else 'ASC'}")
    return " ORDER BY " + ", ".join(parts)


def build_sql(query: ListQuery) -> tuple[str, str | None, list[Any]]:
    """The page query, the count query (None when not counting) and their shared bind values.

    The page query has two more parameters than the count query (limit and offset, last), so both can be
    run with prefixes of the same value list.
    """
    params = _Params()
    where = _where_sql(query, params)
    count_sql = f"SELECT count(*) FROM jobs{where}" if query.count else None
    limit = params.add(query.limit, "bigint")
    offset = params.add(query.offset, "bigint")
    page_sql = f"SELECT {_SELECT_COLUMNS} FROM jobs{where}{_order_sql(query)} LIMIT {limit} OFFSET {offset}"
    return page_sql, count_sql, params.values


def counted_page_sql(query: ListQuery) -> tuple[str, list[Any]]:
    """The page and its ``items_available`` as one statement, with its bind values.

    One row per job of the page, each carrying the count; an empty page is one row whose job columns are all
    NULL. One statement is one snapshot, so the count and the page agree without a transaction around them.
    The outer ORDER BY repeats the page's: SQL promises no row order from a join, whatever the plan does.
    """
    page_sql, count_sql, values = build_sql(query)
    assert count_sql is not None
    sql = (
        f"SELECT c.items_available, p.* FROM ({count_sql.replace('count(*)', 'count(*) AS items_available', 1)}) c "
        f"LEFT JOIN LATERAL ({page_sql}) p ON true{_order_sql(query, 'p.')}"
    )
    return sql, values


async def list_jobs(pool: asyncpg.Pool, query: ListQuery) -> ListResult:
    """One page of the jobs matching ``query``, and (if ``query.count``) how many match in all.

    A separate COUNT beat ``count(*) OVER ()`` on 100k rows (the window forces every matching row to be read
    and sorted before the first is returned, where the page alone can stop after LIMIT + OFFSET index
    entries). The count and the page travel as one statement (``counted_page_sql``): one round trip, where a
    transaction around two statements took four (BEGIN, page, count, COMMIT), each costing the service and
    the server CPU.
    """
    try:
        if query.count:
            sql, values = counted_page_sql(query)
            rows = await pool.fetch(sql, *values)
            total = rows[0]["items_available"]
            jobs = [row_to_job(row) for row in rows if row["uuid"] is not None]
        else:
            page_sql, _, values = build_sql(query)
            rows, total = await pool.fetch(page_sql, *values), None
            jobs = [row_to_job(row) for row in rows]
    except asyncpg.DataError as exc:
        # An operand PostgreSQL cannot represent (the checks above should have caught it): still the client's
        # value, so 422 rather than a server error.
        raise Invalid(f"Invalid operand in filters: {exc.__class__.__name__}") from None
    return ListResult(jobs, total)


async def queue_size(pool: asyncpg.Pool) -> int:
    """How many jobs are queued and unlocked (everyone's: the dispatch backlog)."""
    return await pool.fetchval(f"SELECT count(*) FROM jobs WHERE {_QUEUED_UNLOCKED}")
